"""Backends turn a chat's incoming message into the reply text."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from .base import Backend, BackendError
from .echo import EchoBackend

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["Backend", "BackendError", "EchoBackend", "open_backend"]


@asynccontextmanager
async def open_backend(settings: Settings) -> AsyncIterator[Backend]:
    """The configured backend, for the ``async with`` block (it may hold connections)."""
    from .. import __version__

    user_agent = f"surfaces-bot/{__version__}"
    if settings.backend == "model" and settings.model is not None:
        from .model import ModelBackend

        async with ModelBackend(settings.model, user_agent=user_agent) as model:
            yield model
    elif settings.backend == "webhook" and settings.webhook is not None:
        from .webhook import WebhookBackend

        async with WebhookBackend(settings.webhook, user_agent=user_agent) as webhook:
            yield webhook
    else:
        yield EchoBackend()
