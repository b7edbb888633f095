"""The one seam between the bot and whatever produces replies."""

from __future__ import annotations

from typing import Protocol

from ..chats import Chat
from ..messages import IncomingMessage

__all__ = ["Backend", "BackendError"]


class BackendError(Exception):
    """The backend could not produce a reply; ``user_message`` is safe to show."""

    def __init__(
        self, message: str, *, user_message: str = "The assistant is unavailable."
    ) -> None:
        super().__init__(message)
        self.user_message = user_message


class Backend(Protocol):
    """Produces the reply to a message.

    The handler gives each reply ``backend_timeout_s``. A backend whose reply waits
    on nothing (no I/O: computed at once, like echo) may say so with a class
    attribute ``instant = True``, and is then called without a timeout.
    """

    name: str

    async def reply(self, chat: Chat, message: IncomingMessage) -> str:
        """The reply to ``message`` in ``chat``; raises `BackendError` when it cannot."""
        ...
