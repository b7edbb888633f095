"""Encrypted rooms: the bot cannot read them yet, says so, and offers a way out.

It never pretends to have read an encrypted message. The way out is an unencrypted
chat for the user, in their Space, made once per encrypted room and linked each
time the subject comes up.
"""

from __future__ import annotations

from dataclasses import replace

import structlog

from matrix_api import MatrixAPIError, MatrixClient
from matrix_api.models import EventID, RoomID

from .chats import write_marker
from .commands import Reply
from .messages import escape
from .provisioning import create_chat, matrix_to
from .store_api import BotStore

__all__ = ["ENCRYPTED_NOTICE", "offer_unencrypted_chat"]

log = structlog.get_logger("bot.encryption")

ENCRYPTED_NOTICE = (
    "This room is end-to-end encrypted, and I cannot read encrypted messages yet, so I "
    "have not read what was written here. Invite me to an unencrypted room instead."
)


async def offer_unencrypted_chat(
    client: MatrixClient,
    store: BotStore,
    room_id: RoomID,
    user_id: str,
    server_name: str,
    *,
    request: EventID | None = None,
) -> Reply:
    """The notice for an encrypted room, with a link to an unencrypted chat for
    ``user_id`` (created the first time, reused afterwards). ``request`` is the
    inbox event being answered (see `bot.provisioning.create_chat`).

    Never raises for the homeserver: if the way out cannot be made, the notice says
    so without a link, at once, rather than after the dispatcher's retries. (With a
    ``request``, a retry would be safe: the rooms made for it are recorded. Without
    one, as for an invite's greeting, a retry could make a second room.)
    """
    try:
        return await _offer(client, store, room_id, user_id, server_name, request)
    except MatrixAPIError as exc:
        log.warning("unencrypted_offer_failed", room_id=room_id, error=str(exc))
        return Reply(ENCRYPTED_NOTICE)


async def _offer(
    client: MatrixClient,
    store: BotStore,
    room_id: RoomID,
    user_id: str,
    server_name: str,
    request: EventID | None,
) -> Reply:
    # The way out is recorded in the encrypted room's own marker (its successor),
    # so a lost store still finds it and never makes a second one.
    encrypted_chat = store.chat_for_room(room_id)
    chat = None
    if encrypted_chat is not None and encrypted_chat.successor is not None:
        chat = store.chat_by_id(encrypted_chat.successor)
    if chat is None:
        chat = await create_chat(
            client, store, user_id, "Unencrypted chat", server_name, request=request
        )
        if encrypted_chat is not None:
            marked = replace(encrypted_chat, successor=chat.chat_id)
            await write_marker(client, marked)
            await store.apply_chats(put=[marked])
    link = matrix_to(chat.room_id, server_name)
    text = (
        "This room is end-to-end encrypted, and I cannot read encrypted messages yet, "
        "so I have not read what was written here."
    )
    return Reply(
        f"{text} Talk to me in this unencrypted chat instead: {link}",
        f'{escape(text)} Talk to me in <a href="{escape(link)}">this unencrypted chat</a> instead.',
    )
