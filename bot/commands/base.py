"""What every command gets and gives back."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from matrix_api import MatrixClient
from matrix_api.models import EventID, RoomID

from ..chats import Chat
from ..config import Settings
from ..store_api import BotStore

__all__ = ["Command", "CommandContext", "Reply"]


@dataclass(frozen=True, slots=True)
class Reply:
    """A command's answer: plain ``body``; ``html`` must already be escaped."""

    body: str
    html: str | None = None


@dataclass(frozen=True, slots=True)
class CommandContext:
    client: MatrixClient
    store: BotStore
    settings: Settings
    backend_name: str
    room_id: RoomID
    sender: str
    chat: Chat | None
    """The chat of the room the command was sent in (None outside managed rooms)."""
    event_id: EventID | None = None
    """The command's own event: what a command that makes rooms keys its work by."""
    thread: EventID | None = None
    """The thread the command was sent in (its root), None in the main timeline."""

    def may_change(self, chat: Chat) -> bool:
        """Only a chat's owner and the bot's admins may change it (`Chat.changeable_by`)."""
        return chat.changeable_by(self.sender, self.settings.admins)

    def command(self, name: str) -> str:
        return f"{self.settings.command_prefix}{name}"


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    usage: str
    """Arguments, as shown by help: ``"<title>"``, ``"[title]"`` or ``""``."""
    summary: str
    run: Callable[[CommandContext, str], Awaitable[Reply]]
