"""Handling one inbox item: route it, ask the backend, reply, record.

The reply's transaction id is derived from the event it answers, and the item
leaves the inbox only after the reply is recorded: a crash anywhere in between
re-handles the item and the server de-duplicates the re-sent reply.
"""

from __future__ import annotations

import structlog
from structlog.contextvars import bound_contextvars

from matrix_api import MatrixAPIError, MatrixClient
from matrix_api.models import EventID, RoomID

from .backends import Backend, BackendError
from .config import Settings
from .invites import InviteHandler
from .messages import notice, parse_incoming, reply_txn_id
from .reconcile import reconcile_single_room
from .router import is_unregistered, resolve_chat_id
from .store import InboxItem, Outcome, Store

__all__ = ["REPAIR_FAILED_NOTICE", "MessageHandler"]

log = structlog.get_logger("bot.handler")

REPAIR_FAILED_NOTICE = (
    "I could not restore this chat's local state automatically, so I cannot answer "
    "here yet. Please ask the bot's operator to restart it (or to reset its local "
    "store); if this room was never a chat, invite me to a new room instead."
)
FAILED_NOTICE = "Sorry, I could not handle that message. Please try again later."


class MessageHandler:
    """The `bot.dispatch.JobHandler` of the bot: invites and messages."""

    def __init__(
        self,
        client: MatrixClient,
        store: Store,
        settings: Settings,
        backend: Backend,
    ) -> None:
        self._client = client
        self._store = store
        self._settings = settings
        self._backend = backend
        self._invites = InviteHandler(client, store, settings)
        self._bot = settings.user_id

    async def handle(self, item: InboxItem) -> None:
        with bound_contextvars(room_id=item.room_id, event_id=item.event_id):
            if item.kind == "invite":
                await self._invites.handle(item)
            else:
                await self._handle_message(item)

    async def _handle_message(self, item: InboxItem) -> None:
        message = parse_incoming(item.event, self._bot)
        if message is None:
            await self._store.finish(item, "ignored")
            return
        if not self._settings.allowed.allows(message.sender):
            log.info("message_ignored", sender=message.sender, reason="sender not allowed")
            await self._store.finish(item, "ignored")
            return

        chat_id = resolve_chat_id(self._store, item.room_id, message.sender)
        if is_unregistered(chat_id):
            report = await reconcile_single_room(
                self._client, self._store, item.room_id, message.sender
            )
            if not report.ok or report.chat_id is None:
                log.warning(
                    "chat_repair_failed",
                    sender=message.sender,
                    chat_id=chat_id,
                    repair=report.log_fields(),
                )
                await self._reply(item, REPAIR_FAILED_NOTICE, "notified", purpose="repair")
                return
            log.info("chat_repaired", sender=message.sender, chat_id=report.chat_id)
            chat_id = report.chat_id

        chat = self._store.chat_by_id(chat_id)
        with bound_contextvars(chat_id=chat_id):
            if chat is None or chat.archived:
                await self._store.finish(item, "ignored")
                return
            if message.origin_server_ts < chat.created_ts:
                # History from before the room became a chat (a newly joined room's
                # timeline and gap carry it): not for the bot to answer.
                await self._store.finish(item, "ignored")
                return
            try:
                text = await self._backend.reply(chat, message)
            except BackendError as exc:
                log.warning("backend_failed", backend=self._backend.name, error=str(exc))
                await self._reply(item, exc.user_message, "failed")
                return
            await self._reply(item, text, "replied")
            log.info("message_handled", backend=self._backend.name)

    async def _reply(
        self, item: InboxItem, text: str, outcome: Outcome, *, purpose: str = "reply"
    ) -> EventID:
        reply_id = await self._client.send_event(
            item.room_id,
            "m.room.message",
            notice(text, reply_to=item.event_id),
            txn_id=reply_txn_id(item.event_id, purpose),
        )
        await self._store.finish(item, outcome, reply_id)
        return reply_id

    async def give_up(self, item: InboxItem, error: Exception) -> None:
        with bound_contextvars(room_id=item.room_id, event_id=item.event_id):
            log.error("job_given_up", error=str(error))
            if item.kind == "invite":
                await self._store.discard(item)
                return
            try:
                await self._reply(item, FAILED_NOTICE, "failed", purpose="failure")
            except MatrixAPIError:
                await self._store.finish(item, "failed")

    async def mark_read(self, room_id: str, event_id: str) -> None:
        if event_id.startswith("invite:"):
            return
        await self._client.send_receipt(RoomID(room_id), EventID(event_id))
