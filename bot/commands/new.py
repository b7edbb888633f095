"""``!new [title]``: a new chat room for the sender, in their Space.

A user may have at most ``bot.max_chats_per_user`` chats that are not archived
(admins too, unless ``bot.limits_exempt_admins``). Archived chats do not count:
archiving is how a user makes room (there is no command that deletes a chat), and an
archived chat costs the bot nothing, as it is never answered (``!unarchive`` is held
to the same cap). `bot.handler` runs one ``!new`` per user at a time, so two at once
cannot both pass the cap.
"""

from __future__ import annotations

import json
from typing import Any

from ..e2ee.sending import EncryptingClient
from ..messages import escape
from ..provisioning import create_chat, matrix_to
from .base import Command, CommandContext, Reply
from .parser import clean_title

DEFAULT_TITLE = "New chat"


async def run(ctx: CommandContext, args: str) -> Reply:
    title = clean_title(args) if args else DEFAULT_TITLE
    refusal = await _over_the_cap(ctx)
    if refusal is not None:
        return refusal
    had_space = ctx.store.space_for(ctx.sender) is not None
    chat = await create_chat(
        ctx.client,
        ctx.store,
        ctx.sender,
        title,
        ctx.settings.server_name,
        request=ctx.event_id,
        encryption=_encryption_asked(ctx),
    )
    link = matrix_to(chat.room_id, ctx.settings.server_name)
    text = f"Created the chat “{title}”: {link} (you are invited)."
    html = f'Created the chat <a href="{escape(link)}">{escape(title)}</a> (you are invited).'
    if not had_space and chat.space_id is not None:
        # The first chat made this way also made the user's Space: a second invite
        # arrives, and the user should know what it is.
        space = matrix_to(chat.space_id, ctx.settings.server_name)
        text += f" It is in your new Space, where your chats are kept: {space} (invited too)."
        html += (
            f' It is in your new <a href="{escape(space)}">Space</a>, where your chats are'
            " kept (invited too)."
        )
    return Reply(text, html)


def _encryption_asked(ctx: CommandContext) -> dict[str, Any] | None:
    """A chat asked for from an encrypted room is encrypted too (with the same
    settings), when the bot reads encrypted rooms; otherwise it is not."""
    content = ctx.store.room_encryption(ctx.room_id)
    reads_encrypted = isinstance(ctx.client, EncryptingClient) and ctx.client.encrypts
    if content is None or not reads_encrypted:
        return None
    settings = json.loads(content)
    return settings if isinstance(settings, dict) else None


async def _over_the_cap(ctx: CommandContext) -> Reply | None:
    # A run that resumes one an earlier run left unfinished finishes the room already
    # made, cap or not: that room is counted already.
    if ctx.event_id is not None and (await ctx.store.provisioned(ctx.event_id)).room is not None:
        return None
    refusal = chat_cap_refusal(ctx, ctx.sender)
    return None if refusal is None else Reply(refusal)


def chat_cap_refusal(ctx: CommandContext, owner: str) -> str | None:
    """Why ``owner`` may not have one more unarchived chat, or None if they may."""
    settings = ctx.settings
    if settings.limits_exempt_admins and ctx.sender in settings.admins:
        return None
    active = sum(1 for chat in ctx.store.chats() if chat.owner == owner and not chat.archived)
    cap = settings.max_chats_per_user
    if active < cap:
        return None
    whose = "You have" if owner == ctx.sender else f"{owner} has"
    return (
        f"{whose} {active} chats, and {cap} is the most one may have at once. To make room, "
        f"send {ctx.command('archive')} in a chat no longer needed (archived chats do not "
        f"count; {ctx.command('unarchive')} brings one back). {ctx.command('chats')} lists them."
    )


COMMAND = Command("new", "[title]", "create a new chat room in your Space", run)
