"""Encrypted rooms: the bot cannot read them yet, says so, and offers a way out.

It never pretends to have read an encrypted message. The way out is an unencrypted
chat for the user, in their Space, made once per encrypted room and linked each
time the subject comes up.
"""

from __future__ import annotations

from matrix_api import MatrixClient
from matrix_api.models import RoomID

from .commands import Reply
from .messages import escape
from .provisioning import create_chat, matrix_to
from .store import Store

__all__ = ["ENCRYPTED_NOTICE", "offer_unencrypted_chat"]

ENCRYPTED_NOTICE = (
    "This room is end-to-end encrypted, and I cannot read encrypted messages yet, so I "
    "have not read what was written here. Invite me to an unencrypted room instead."
)

_OFFERED = "encrypted_offer:"


async def offer_unencrypted_chat(
    client: MatrixClient, store: Store, room_id: RoomID, user_id: str, server_name: str
) -> Reply:
    """The notice for an encrypted room, with a link to an unencrypted chat for
    ``user_id`` (created the first time, reused afterwards)."""
    chat = None
    offered = await store.get_meta(_OFFERED + room_id)
    if offered is not None:
        chat = store.chat_by_id(offered)
    if chat is None:
        chat = await create_chat(client, store, user_id, "Unencrypted chat", server_name)
        await store.set_meta(_OFFERED + room_id, chat.chat_id)
    link = matrix_to(chat.room_id, server_name)
    text = (
        "This room is end-to-end encrypted, and I cannot read encrypted messages yet, "
        "so I have not read what was written here."
    )
    return Reply(
        f"{text} Talk to me in this unencrypted chat instead: {link}",
        f'{escape(text)} Talk to me in <a href="{escape(link)}">this unencrypted chat</a> instead.',
    )
