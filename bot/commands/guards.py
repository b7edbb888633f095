"""Checks shared by the commands that change a chat."""

from __future__ import annotations

from ..chats import Chat
from .base import CommandContext
from .parser import CommandError


def changeable_chat(ctx: CommandContext) -> Chat:
    """The current chat, if the sender may change it; `CommandError` otherwise."""
    if ctx.chat is None:
        raise CommandError("This room is not a chat.")
    if not ctx.may_change(ctx.chat):
        raise CommandError("Sorry, only the owner of this chat can do that.")
    return ctx.chat
