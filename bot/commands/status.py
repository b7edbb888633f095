"""``!status``: what the bot knows about this chat."""

from __future__ import annotations

from .. import __version__
from ..messages import escape
from .base import Command, CommandContext, Reply


async def run(ctx: CommandContext, args: str) -> Reply:
    chat = ctx.chat
    if chat is None:
        return Reply(f"This room is not a chat. surfaces-bot {__version__}.")
    facts = [
        ("Chat", chat.chat_id),
        ("Title", chat.title),
        ("Owner", chat.owner),
        ("Archived", "yes" if chat.archived else "no"),
        ("Backend", ctx.backend_name),
        ("Version", __version__),
    ]
    return Reply(
        "\n".join(f"{key}: {value}" for key, value in facts),
        "<ul>"
        + "".join(f"<li><b>{key}</b>: {escape(value)}</li>" for key, value in facts)
        + "</ul>",
    )


COMMAND = Command("status", "", "show this chat's id, owner, backend and the bot's version", run)
