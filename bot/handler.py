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
from .chats import Chat
from .commands import CommandContext, CommandError, Reply, parse_command, run_command
from .config import Settings
from .encryption import ENCRYPTED_NOTICE, offer_unencrypted_chat
from .invites import InviteHandler
from .messages import (
    IncomingMessage,
    is_encryption_event,
    notice,
    parse_incoming,
    reply_txn_id,
)
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
        event = item.event
        encrypted = is_encryption_event(event, self._bot)
        message = None if encrypted else parse_incoming(event, self._bot)
        if message is None and not encrypted:
            await self._store.finish(item, "ignored")
            return
        sender = event.sender
        if self._store.is_space(item.room_id):
            await self._store.finish(item, "ignored")  # a Space is not a chat
            return
        if not self._settings.allowed.allows(sender):
            log.info("message_ignored", sender=sender, reason="sender not allowed")
            await self._store.finish(item, "ignored")
            return
        chat = await self._chat_of(item, sender)
        if chat is None:
            return
        with bound_contextvars(chat_id=chat.chat_id):
            if event.origin_server_ts < chat.created_ts:
                # History from before the room became a chat (a newly joined room's
                # timeline and gap carry it): not for the bot to answer.
                await self._store.finish(item, "ignored")
                return
            if encrypted:
                try:
                    reply = await offer_unencrypted_chat(
                        self._client, self._store, item.room_id, sender, self._settings.server_name
                    )
                except MatrixAPIError as exc:
                    # Not retried: creating the way-out room twice would be worse.
                    log.warning("unencrypted_offer_failed", error=str(exc))
                    reply = Reply(ENCRYPTED_NOTICE)
                await self._reply(item, reply, "notified", purpose="encrypted")
                return
            assert message is not None
            await self._answer(item, chat, message)

    async def _chat_of(self, item: InboxItem, sender: str) -> Chat | None:
        """The room's chat, repaired from the server if need be; None when it cannot
        be (the user has then been told, and the item recorded)."""
        chat_id = resolve_chat_id(self._store, item.room_id, sender)
        if is_unregistered(chat_id):
            report = await reconcile_single_room(self._client, self._store, item.room_id, sender)
            if not report.ok or report.chat_id is None:
                log.warning(
                    "chat_repair_failed", sender=sender, chat_id=chat_id, repair=report.log_fields()
                )
                await self._reply(item, Reply(REPAIR_FAILED_NOTICE), "notified", purpose="repair")
                return None
            log.info("chat_repaired", sender=sender, chat_id=report.chat_id)
            chat_id = report.chat_id
        chat = self._store.chat_by_id(chat_id)
        if chat is None:  # removed between the two lines above by a concurrent repair
            await self._store.finish(item, "ignored")
        return chat

    async def _answer(self, item: InboxItem, chat: Chat, message: IncomingMessage) -> None:
        try:
            command = parse_command(message.body, self._settings.command_prefix)
        except CommandError as exc:
            await self._reply(item, Reply(str(exc)), "replied", purpose="command")
            return
        if command is not None:
            context = CommandContext(
                client=self._client,
                store=self._store,
                settings=self._settings,
                backend_name=self._backend.name,
                room_id=item.room_id,
                sender=message.sender,
                chat=chat,
            )
            reply = await run_command(context, command)
            await self._reply(item, reply, "replied", purpose="command")
            log.info("command_handled", command=command.name)
            return
        if chat.archived:
            await self._store.finish(item, "ignored")
            return
        try:
            text = await self._backend.reply(chat, message)
        except BackendError as exc:
            log.warning("backend_failed", backend=self._backend.name, error=str(exc))
            await self._reply(item, Reply(exc.user_message), "failed")
            return
        await self._reply(item, Reply(text), "replied")
        log.info("message_handled", backend=self._backend.name)

    async def _reply(
        self, item: InboxItem, reply: Reply, outcome: Outcome, *, purpose: str = "reply"
    ) -> EventID:
        reply_id = await self._client.send_event(
            item.room_id,
            "m.room.message",
            notice(reply.body, reply_to=item.event_id, formatted_body=reply.html),
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
                await self._reply(item, Reply(FAILED_NOTICE), "failed", purpose="failure")
            except MatrixAPIError:
                await self._store.finish(item, "failed")

    async def mark_read(self, room_id: str, event_id: str) -> None:
        if event_id.startswith("invite:"):
            return
        await self._client.send_receipt(RoomID(room_id), EventID(event_id))
