"""``!chats``: the sender's chats."""

from __future__ import annotations

from ..messages import escape
from ..provisioning import matrix_to
from .base import Command, CommandContext, Reply


async def run(ctx: CommandContext, args: str) -> Reply:
    mine = sorted(
        (chat for chat in ctx.store.chats() if chat.owner == ctx.sender),
        key=lambda chat: chat.created_ts,
    )
    if not mine:
        return Reply(f"You have no chats yet. Send {ctx.command('new')} to start one.")
    lines = []
    items = []
    for chat in mine:
        link = matrix_to(chat.room_id, ctx.settings.server_name)
        state = " (archived)" if chat.archived else ""
        lines.append(f"• {chat.title}{state}: {link}")
        items.append(f'<li><a href="{escape(link)}">{escape(chat.title)}</a>{state}</li>')
    return Reply(
        f"Your chats ({len(mine)}):\n" + "\n".join(lines),
        f"<p>Your chats ({len(mine)}):</p><ul>" + "".join(items) + "</ul>",
    )


COMMAND = Command("chats", "", "list your chats", run)
