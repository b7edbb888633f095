"""``!rename <title>``: rename the current chat (store, marker, room name)."""

from __future__ import annotations

from ..chats import write_marker
from ..messages import escape
from .base import Command, CommandContext, Reply
from .guards import changeable_chat
from .parser import CommandError, clean_title


async def run(ctx: CommandContext, args: str) -> Reply:
    chat = changeable_chat(ctx)
    if not args:
        raise CommandError(f"Give the new title: {ctx.command('rename')} <title>")
    title = clean_title(args)
    renamed = chat.with_title(title)
    # The room first: if the homeserver refuses (the bot may lack the power), the
    # marker and the store keep the old title and all three still agree.
    await ctx.client.put_state_event(chat.room_id, "m.room.name", {"name": title})
    await write_marker(ctx.client, renamed)
    await ctx.store.apply_chats(put=[renamed])
    return Reply(f"Renamed to “{title}”.", f"Renamed to <b>{escape(title)}</b>.")


COMMAND = Command("rename", "<title>", "rename this chat", run)
