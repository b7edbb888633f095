"""``!archive`` and ``!unarchive``: stop and resume a chat; the room stays."""

from __future__ import annotations

from dataclasses import replace

from ..chats import write_marker
from ..provisioning import link_to_space, unlink_from_space
from .base import Command, CommandContext, Reply
from .guards import changeable_chat
from .new import chat_cap_refusal


async def _set_archived(ctx: CommandContext, archived: bool) -> Reply:
    chat = changeable_chat(ctx)
    if chat.archived == archived:
        state = "already archived" if archived else "not archived"
        return Reply(f"This chat is {state}.")
    if not archived:
        # Otherwise archive, !new, unarchive would get past the cap on chats.
        refusal = chat_cap_refusal(ctx, chat.owner)
        if refusal is not None:
            return Reply(refusal)
    changed = replace(chat, archived=archived)
    # The Space first (it may be refused), then the marker, then the store, so a
    # failure leaves them agreeing. Only a room that belongs to a Space is moved.
    if chat.space_id is not None:
        if archived:
            await unlink_from_space(ctx.client, chat.space_id, chat.room_id)
        else:
            await link_to_space(ctx.client, chat.space_id, chat.room_id, ctx.settings.server_name)
    await write_marker(ctx.client, changed)
    await ctx.store.apply_chats(put=[changed])
    if archived:
        return Reply(
            f"Archived. I will not answer here any more; {ctx.command('unarchive')} undoes it."
        )
    return Reply("Unarchived: I am listening again.")


async def archive(ctx: CommandContext, args: str) -> Reply:
    return await _set_archived(ctx, True)


async def unarchive(ctx: CommandContext, args: str) -> Reply:
    return await _set_archived(ctx, False)


ARCHIVE = Command("archive", "", "archive this chat (no more answers; the room stays)", archive)
UNARCHIVE = Command("unarchive", "", "bring an archived chat back", unarchive)
