"""Invites: join rooms that allowed users invite the bot to, and make them chats.

The marker is written before the join, so a crash at any point is completed at the
next start: before the join, the invite is still pending (and shown again by the
full-state sync) and the marker already names the chat id to reuse; after the
join, reconciliation restores the chat from the marker.
"""

from __future__ import annotations

import structlog

from matrix_api import Forbidden, MatrixClient, NotFound
from matrix_api.models import RoomID

from .chats import (
    CHAT_MARKER,
    Chat,
    MarkerError,
    chat_from_marker,
    created_now_ms,
    new_chat_id,
    write_marker,
)
from .commands import Reply
from .config import Settings
from .encryption import offer_unencrypted_chat
from .messages import notice, reply_txn_id
from .store import InboxItem, Store

__all__ = ["InviteHandler"]

log = structlog.get_logger("bot.invites")

GREETING = (
    "Hello! This room is now a chat with the assistant. Write a message and I will answer here."
)


class InviteHandler:
    def __init__(self, client: MatrixClient, store: Store, settings: Settings) -> None:
        self._client = client
        self._store = store
        self._settings = settings

    async def handle(self, item: InboxItem) -> None:
        """Accept or decline the invite in ``item``; takes it out of the inbox."""
        room_id = item.room_id
        inviter = item.event.sender
        if not self._settings.allowed.allows(inviter):
            log.warning("invite_declined", room_id=room_id, inviter=inviter, reason="not allowed")
            await self._client.leave_room(room_id, reason="This bot serves allowed users only.")
            await self._store.discard(item)
            return

        chat = self._store.chat_for_room(room_id) or await self._marked_chat(room_id)
        if chat is None:
            chat = Chat(
                chat_id=new_chat_id(),
                room_id=room_id,
                owner=inviter,
                title=f"Chat with {inviter}",
                created_ts=created_now_ms(self._client),
            )
            await write_marker(self._client, chat)
        await self._client.join_room(room_id)
        await self._store.apply_chats(put=[chat])
        greeting = Reply(GREETING)
        if item.event.content.get("encrypted") is True:
            greeting = await offer_unencrypted_chat(
                self._client, self._store, room_id, inviter, self._settings.server_name
            )
        await self._client.send_event(
            room_id,
            "m.room.message",
            notice(greeting.body, formatted_body=greeting.html),
            txn_id=reply_txn_id(f"{room_id}/{chat.chat_id}", "greeting"),
        )
        await self._store.discard(item)
        log.info("invite_accepted", room_id=room_id, inviter=inviter, chat_id=chat.chat_id)

    async def _marked_chat(self, room_id: RoomID) -> Chat | None:
        """The chat an earlier, interrupted acceptance already recorded, if any."""
        try:
            content = await self._client.get_room_account_data(room_id, CHAT_MARKER)
        except (NotFound, Forbidden):
            return None
        try:
            return chat_from_marker(room_id, content)
        except MarkerError as exc:
            log.warning("invite_marker_unreadable", room_id=room_id, error=str(exc))
            return None
