"""``!new [title]``: a new chat room for the sender, in their Space."""

from __future__ import annotations

from ..messages import escape
from ..provisioning import create_chat, matrix_to
from .base import Command, CommandContext, Reply
from .parser import clean_title

DEFAULT_TITLE = "New chat"


async def run(ctx: CommandContext, args: str) -> Reply:
    title = clean_title(args) if args else DEFAULT_TITLE
    chat = await create_chat(
        ctx.client,
        ctx.store,
        ctx.sender,
        title,
        ctx.settings.server_name,
        request=ctx.event_id,
    )
    link = matrix_to(chat.room_id, ctx.settings.server_name)
    return Reply(
        f"Created the chat “{title}”: {link} (you are invited).",
        f'Created the chat <a href="{escape(link)}">{escape(title)}</a> (you are invited).',
    )


COMMAND = Command("new", "[title]", "create a new chat room in your Space", run)
