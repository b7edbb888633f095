"""Backends turn a chat's incoming message into the reply text."""

from __future__ import annotations

from .base import Backend, BackendError
from .echo import EchoBackend

__all__ = ["Backend", "BackendError", "EchoBackend", "make_backend"]


def make_backend(name: str) -> Backend:
    """The backend configured as ``name`` (validated in `bot.config`)."""
    if name == "echo":
        return EchoBackend()
    raise ValueError(f"unknown backend {name!r}")
