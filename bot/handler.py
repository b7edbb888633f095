"""Handling one inbox item: route it, ask the backend, reply, record.

The reply's transaction id is derived from the event it answers, and the item
leaves the inbox only after the reply is recorded: a crash anywhere in between
re-handles the item and the server de-duplicates the re-sent reply.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import cast

import structlog
import trio

from matrix_api import MatrixAPIError, MatrixClient
from matrix_api.models import EventID, RoomEvent, RoomID
from matrix_crypto.errors import CryptoError, DecryptionError, MissingRoomKey

from .attachments import AttachmentRefused, read_for_backend
from .backend_settings.model import ModelSettings
from .backends import Backend, BackendError
from .backends.context import Role, Turn, trim_context
from .backends.streaming import ReplyOverrides, StreamingBackend
from .chats import Chat
from .commands import CommandContext, CommandError, Reply, parse_command, run_command
from .config import Settings
from .dispatch import LeftUnfinishedTooOften
from .e2ee.crypto import BotCrypto
from .e2ee.decrypting import BACKUP_WAIT_S, decrypted_event, decrypted_now
from .encryption import offer_unencrypted_chat
from .invites import InviteHandler
from .logging import log_context
from .messages import (
    IncomingMessage,
    is_encryption_event,
    notice,
    parse_incoming,
    reply_txn_id,
    thread_root,
)
from .ops.metrics import BotMetrics
from .quarantine import failure_reason, log_quarantined
from .reconcile import RepairReport, reconcile_single_room
from .replies.history import FAILED_KEY, Decrypt, load_room_turns, load_thread_turns
from .router import is_unregistered, resolve_chat_id
from .store import InboxItem, Outcome, redaction_target
from .store_api import BotStore
from .user_limits import UserLimiter, Verdict

__all__ = ["REPAIR_FAILED_NOTICE", "MessageHandler"]

log = structlog.get_logger("bot.handler")

REPAIR_FAILED_NOTICE = (
    "I could not restore this chat's local state automatically, so I cannot answer "
    "here yet. Please ask the bot's operator to restart it (or to reset its local "
    "store); if this room was never a chat, invite me to a new room instead."
)
UNDECRYPTABLE_NO_KEY_NOTICE = (
    "I could not decrypt your message: its key never reached me. Please send it again."
)
UNDECRYPTABLE_NOTICE = (
    "I could not decrypt your message (it did not come from a device I can verify, or "
    "it was damaged). Please send it again."
)
FAILED_NOTICE = "Sorry, I could not handle that message. Please try again later."
BACKEND_TIMEOUT_NOTICE = "Sorry, the assistant took too long to answer. Please try again."
# The reason recorded with a message the per-user limit left unanswered.
RATE_LIMITED = "rate_limited"


# A room whose chat cannot be repaired gets one notice per this many seconds.
REPAIR_NOTICE_QUIET_S = 600.0
# Rooms told recently are kept until this many, then the ones whose quiet period is
# over are dropped.
_REPAIR_TOLD_PRUNE_AT = 256
# The estimate of the server's clock may be up to a second behind it (`ServerClock`).
_CLOCK_SLACK_MS = 2_000


class MessageHandler:
    """The `bot.dispatch.JobHandler` of the bot: invites and messages."""

    def __init__(
        self,
        client: MatrixClient,
        store: BotStore,
        settings: Settings,
        backend: Backend,
        *,
        metrics: BotMetrics | None = None,
    ) -> None:
        self._client = client
        # Outcomes, backend calls and answer latency, for the operator (`bot.ops`).
        self._metrics = metrics if metrics is not None else BotMetrics()
        self._store = store
        self._settings = settings
        self._backend = backend
        # Decided once: a runtime-checkable Protocol's isinstance is slow.
        self._streaming = backend if isinstance(backend, StreamingBackend) else None
        # A timeout is a cancel scope per message, about 7% of an echoed message's
        # instructions; a backend that waits on nothing (see `Backend`) goes without.
        self._instant = bool(getattr(backend, "instant", False))
        # Shared by every room's lane, served in turn (trio's limiter is first come,
        # first served): rooms with work take turns at the backend, and nothing else
        # (commands, notices, Matrix sends) waits for it. An instant backend waits on
        # nothing and takes no slot.
        self._answer_slots = trio.CapacityLimiter(settings.max_concurrent_answers)
        # Per user, in memory: after a restart every user starts with a full burst
        # (the durable part is the inbox, and nothing in it is lost by this).
        self._limits = UserLimiter(settings.user_messages_burst, settings.user_messages_per_s)
        # One `!new` at a time per user, so that two rooms' `!new` at once cannot both
        # pass the chat cap; an entry lives only while a `!new` of its user runs.
        self._creating: dict[str, trio.Lock] = {}
        self._repair_told: dict[str, float] = {}
        self._invites = InviteHandler(client, store, settings)
        self._bot = settings.user_id
        self.crypto: BotCrypto | None = None
        """Set by `attach_crypto`; None: encrypted rooms get the way out."""

    def attach_crypto(self, crypto: BotCrypto) -> None:
        """End-to-end encryption is up: encrypted rooms are chats like any other."""
        self.crypto = crypto
        self._invites.reads_encrypted = True

    async def handle(self, item: InboxItem) -> bool:
        """Handle ``item``; True when a reply answers it (see `bot.dispatch.JobHandler`)."""
        with log_context(room_id=item.room_id, event_id=item.event_id):
            if item.kind == "invite":
                await self._invites.handle(item)
                return False
            if item.kind == "redaction":
                return await self._handle_redaction(item)
            return await self._handle_message(item)

    async def _handle_redaction(self, item: InboxItem) -> bool:
        """A redaction of a message the bot knows, after that message's own handling
        (the room's lane keeps their order): the store has already taken the message
        out of the inbox or its conversation (`BotStore.commit_sync_batch`). Its
        answer stays, unless the operator wants it redacted too (``redact_answers``):
        the transaction id comes from the answer, so a re-run redacts it once."""
        target = redaction_target(item)
        answer = await self._store.answer_to(target) if self._settings.redact_answers else None
        if answer is None:
            await self._finish(item, "ignored", reason="answer kept")
            return False
        await self._client.redact(item.room_id, answer, reply_txn_id(answer, "redact"))
        log.info("answer_redacted", answer_event_id=answer)
        await self._finish(item, "ignored", reason="answer redacted")
        return False

    async def _unanswered_redacted(self, item: InboxItem) -> bool:
        """``item`` was redacted before the bot answered: no answer (the store
        recorded it as "redacted" when the redaction came)."""
        log.info("message_redacted_unanswered")
        await self._finish(item, "redacted")
        return False

    async def _handle_message(self, item: InboxItem) -> bool:
        if self._store.is_redacted(item):
            return await self._unanswered_redacted(item)
        event = item.event
        encrypted = is_encryption_event(event, self._bot)
        if encrypted and self.crypto is not None and event.type != "m.room.encrypted":
            return await self._ignore(item)  # encryption turned on: the bot reads it
        message = None if encrypted else parse_incoming(event, self._bot)
        if message is None and not encrypted:
            return await self._ignore(item)
        sender = event.sender
        if self._store.is_space(item.room_id):
            return await self._ignore(item)  # a Space is not a chat
        if not self._settings.allowed.allows(sender):
            log.info("message_ignored", sender=sender, reason="sender not allowed")
            return await self._ignore(item)
        chat = await self._chat_of(item, sender)
        if chat is None:
            # Ignored, or told that repair failed: either way a read receipt, harmless
            # after a notice that is itself a reply.
            return False
        with log_context(chat_id=chat.chat_id):
            if event.origin_server_ts < chat.created_ts:
                # History from before the room became a chat (a newly joined room's
                # timeline and gap carry it): not for the bot to answer.
                return await self._ignore(item)
            # Every message a chat's user sends counts, commands too: `!new` a hundred
            # times costs the homeserver more than a hundred questions cost the backend.
            verdict = self._take(item, sender)
            if verdict.limited:
                return await self._rate_limited(item, sender, verdict)
            if encrypted and self.crypto is not None:
                plain = await self._decrypted_unless_redacted(item, self.crypto)
                if self._store.is_redacted(item):
                    return await self._unanswered_redacted(item)
                if plain is None:
                    return True  # the user was told
                message = parse_incoming(plain, self._bot)
                if message is None:
                    return await self._ignore(item)
                item = replace(item, event=plain)
            elif encrypted:
                reply = await offer_unencrypted_chat(
                    self._client,
                    self._store,
                    item.room_id,
                    sender,
                    self._settings.server_name,
                    request=item.event_id,
                )
                await self._reply(item, reply, "notified", purpose="encrypted")
                return True
            assert message is not None
            return await self._answer(item, chat, message)

    async def _decrypted_unless_redacted(
        self, item: InboxItem, crypto: BotCrypto
    ) -> RoomEvent | None:
        """`_decrypted`, given up as soon as ``item`` is redacted (it may wait minutes
        for its room key): None then, and nobody is told."""
        plain: RoomEvent | None = None
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                while not self._store.is_redacted(item):
                    await self._store.wait_for_change()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            try:
                plain = await self._decrypted(item, crypto)
            finally:
                nursery.cancel_scope.cancel()
        return plain

    async def _decrypted(self, item: InboxItem, crypto: BotCrypto) -> RoomEvent | None:
        """``item``'s event decrypted; None when it cannot be, after telling the user
        (the reason is logged and recorded; never the content)."""
        try:
            return await decrypted_event(crypto, self._client, item)
        except MissingRoomKey:
            reason, text = "room key missing", UNDECRYPTABLE_NO_KEY_NOTICE
        except DecryptionError as exc:
            reason, text = f"undecryptable: {exc.reason}", UNDECRYPTABLE_NOTICE
        log.warning("event_undecryptable", sender=item.event.sender, reason=reason)
        await self._reply(item, Reply(text), "notified", purpose="undecryptable", reason=reason)
        return None

    async def _ignore(self, item: InboxItem) -> bool:
        await self._finish(item, "ignored")
        return False

    def _take(self, item: InboxItem, sender: str) -> Verdict:
        if self._settings.limits_exempt_admins and sender in self._settings.admins:
            return Verdict.ALLOWED
        # When the user sent it, on the homeserver's clock, not when the bot got to it:
        # thirty messages written over the hour the bot was down are thirty messages
        # an hour, not a burst at restart. A timestamp from the future (a server's
        # clock, or a forged one over federation) counts as now, so it cannot refill a
        # bucket early. The message's key makes a retried message cost nothing more
        # and keep its first verdict.
        sent_ms = item.event.origin_server_ts
        server_now_ms = self._client.server_time_ms()
        if server_now_ms is not None:
            sent_ms = min(sent_ms, server_now_ms + _CLOCK_SLACK_MS)
        return self._limits.take(sender, sent_ms / 1000, item.event_id)

    async def _rate_limited(self, item: InboxItem, sender: str, verdict: Verdict) -> bool:
        """Record ``item`` as handled without an answer; the first of an episode
        tells the user, once."""
        if verdict is not Verdict.LIMITED_TELL:
            await self._finish(item, "ignored", reason=RATE_LIMITED)
            return False
        log.info("user_rate_limited", sender=sender, room_id=item.room_id)
        every = 1 / self._settings.user_messages_per_s
        text = (
            f"Please slow down a little: I take up to {self._settings.user_messages_burst} "
            f"messages from you at once, then one every {every:g} s. I did not answer this "
            "message, and I will skip the ones that come faster than that without saying so "
            "again."
        )
        await self._reply(
            item, Reply(text), "notified", purpose="rate_limit", reason=RATE_LIMITED, mention=sender
        )
        return True

    @asynccontextmanager
    async def _one_new_chat_at_a_time(self, user: str) -> AsyncIterator[None]:
        lock = self._creating.setdefault(user, trio.Lock())
        try:
            async with lock:
                yield
        finally:
            # Released with no one waiting: nothing to keep.
            if not lock.locked() and self._creating.get(user) is lock:
                del self._creating[user]

    async def _chat_of(self, item: InboxItem, sender: str) -> Chat | None:
        """The room's chat, repaired from the server if need be; None when it cannot
        be (the user has then been told, or the item recorded as ignored)."""
        chat_id = resolve_chat_id(self._store, item.room_id, sender)
        if is_unregistered(chat_id):
            report = await reconcile_single_room(self._client, self._store, item.room_id, sender)
            # The router stays the one source of truth: ask it again, not the repair.
            chat_id = resolve_chat_id(self._store, item.room_id, sender)
            if is_unregistered(chat_id):
                await self._repair_failed(item, sender, report)
                return None
            log.info("chat_repaired", sender=sender, chat_id=chat_id)
        chat = self._store.chat_by_id(chat_id)
        if chat is None:  # removed between the two lines above by a concurrent repair
            await self._finish(item, "ignored")
        return chat

    async def _repair_failed(self, item: InboxItem, sender: str, report: RepairReport) -> None:
        """Tell the user and the operator, once per room per quiet period (a user typing
        ten lines gets one notice); every message is recorded either way."""
        now = trio.current_time()
        last = self._repair_told.get(item.room_id)
        if last is not None and now - last < REPAIR_NOTICE_QUIET_S:
            log.info("chat_repair_failed_again", sender=sender, reason=report.reason)
            await self._finish(item, "ignored", reason="repair_failed")
            return
        if len(self._repair_told) >= _REPAIR_TOLD_PRUNE_AT:
            self._repair_told = {
                room: at
                for room, at in self._repair_told.items()
                if now - at < REPAIR_NOTICE_QUIET_S
            }
        self._repair_told[item.room_id] = now
        log.warning("chat_repair_failed", sender=sender, repair=report.log_fields())
        await self._reply(item, Reply(REPAIR_FAILED_NOTICE), "notified", purpose="repair")

    async def _answer(self, item: InboxItem, chat: Chat, message: IncomingMessage) -> bool:
        try:
            command = parse_command(message.body, self._settings.command_prefix)
        except CommandError as exc:
            await self._reply(item, Reply(str(exc)), "replied", purpose="command")
            return True
        if command is not None:
            context = CommandContext(
                client=self._client,
                store=self._store,
                settings=self._settings,
                backend_name=self._backend.name,
                room_id=item.room_id,
                sender=message.sender,
                chat=chat,
                event_id=item.event_id,
                thread=message.thread_root,
            )
            if command.name == "new":
                async with self._one_new_chat_at_a_time(message.sender):
                    reply = await run_command(context, command)
            else:
                reply = await run_command(context, command)
            await self._reply(item, reply, "replied", purpose="command")
            log.info("command_handled", command=command.name)
            return True
        if chat.archived:
            return await self._ignore(item)
        if message.attachment is not None:
            try:
                # Downloads share the backend's slots: at most that many files in memory.
                async with self._answer_slots:
                    message = await read_for_backend(
                        self._client, self._backend, self._settings, chat, message
                    )
            except AttachmentRefused as exc:
                # Never silently dropped: the user learns what the bot reads.
                log.info("attachment_refused", reason=exc.reason)
                await self._reply(
                    item, Reply(exc.notice), "notified", purpose="attachment", reason=exc.reason
                )
                return True
        if self._streaming is not None:
            return await self._answer_in_conversation(item, chat, message, self._streaming)
        try:
            text = await self._ask(chat, message)
            if self._store.is_redacted(item):
                return await self._unanswered_redacted(item)
        except BackendError as exc:
            log.warning("backend_failed", backend=self._backend.name, error=str(exc))
            await self._reply(item, Reply(exc.user_message), "failed")
            return True
        except trio.TooSlowError:
            log.warning("backend_timed_out", backend=self._backend.name)
            await self._reply(item, Reply(BACKEND_TIMEOUT_NOTICE), "failed")
            return True
        await self._reply(item, Reply(text), "replied")
        self._answer_sent(item)
        log.info("message_handled", backend=self._backend.name)
        return True

    async def _ask(self, chat: Chat, message: IncomingMessage) -> str:
        """The backend's reply; raises `trio.TooSlowError` past ``backend_timeout_s``."""
        if self._instant:
            return await self._backend.reply(chat, message)  # not timed: it waits on nothing
        # The timeout is the backend's own time, not the wait for a slot (the same
        # style for every backend: `bot.backend_settings.timeouts`).
        async with self._answer_slots:
            with (
                self._metrics.backend_call(self._backend.name),
                trio.fail_after(self._settings.backend_timeout_s),
            ):
                return await self._backend.reply(chat, message)

    async def _answer_in_conversation(
        self, item: InboxItem, chat: Chat, message: IncomingMessage, backend: StreamingBackend
    ) -> bool:
        """Ask with the chat's conversation and show the reply as it grows.

        The reply's first event has the transaction id every re-run uses, and its
        event id is kept with the inbox item, so a re-run after a crash completes the
        same reply by an edit instead of posting a second answer.
        """
        thread = message.thread_root
        context = await self._conversation(item, chat, thread)
        if self._store.is_redacted(item):
            return await self._unanswered_redacted(item)
        overrides = ReplyOverrides(
            model=chat.settings.get("model"), system_prompt=chat.settings.get("system")
        )
        started = await self._store.started_reply(item)

        async def remember(event_id: EventID) -> None:
            await self._store.set_started_reply(item, event_id)

        # Here, not at the top: it brings markdown-it (1.3 MB and 30 ms of start-up),
        # which only a streaming backend needs.
        from .replies.reply_sink import open_reply_sink

        model = self._settings.model
        interval = model.edit_interval_s if model else ModelSettings.edit_interval_s
        async with open_reply_sink(
            self._client,
            item.room_id,
            item.event_id,
            edit_interval_s=interval,
            thread=thread,
            existing_event_id=started,
            on_started=remember,
            max_parts=self._settings.max_reply_parts,
        ) as sink:
            try:
                async with self._answer_slots:
                    with (
                        self._metrics.backend_call(backend.name),
                        trio.fail_after(self._settings.backend_timeout_s),
                    ):
                        text = await backend.reply_streaming(
                            chat, message, context, sink, overrides=overrides
                        )
            except (BackendError, trio.TooSlowError) as exc:
                if isinstance(exc, BackendError):
                    user_message = exc.user_message
                    log.warning("backend_failed", backend=backend.name, error=str(exc))
                else:
                    user_message = BACKEND_TIMEOUT_NOTICE
                    log.warning("backend_timed_out", backend=backend.name)
                reply_id = await sink.fail(user_message, getattr(exc, "partial", ""))
                await self._finish(item, "failed", reply_id)
                return True
            reply_ids = await sink.finish(text)
        await self._store.finish_with_turns(
            item,
            "replied",
            reply_ids[0] if reply_ids else None,
            chat.chat_id,
            [("user", message.body), ("assistant", text)],
            thread=thread,
        )
        self._metrics.finished("replied")
        self._answer_sent(item)
        log.info("message_handled", backend=backend.name, events=len(reply_ids))
        return bool(reply_ids)

    async def _conversation(
        self, item: InboxItem, chat: Chat, thread: EventID | None
    ) -> list[Turn]:
        """The earlier turns of the conversation ``item`` is in (the thread rooted at
        ``thread``, or the chat's main timeline): from the store, or read from the
        room once when the store does not have them (a new thread; a lost store loses
        no context)."""
        model = self._settings.model
        budget = model.context_budget_chars if model else ModelSettings.context_budget_chars
        stored = await self._store.conversation(chat.chat_id, thread=thread)
        if stored is None:
            decrypt = await self._context_decryptor(item.room_id)
            try:
                if thread is None:
                    turns, sources = await load_room_turns(
                        self._client,
                        chat,
                        self._settings,
                        budget_chars=budget,
                        stop_at=item.event_id,
                        decrypt=decrypt,
                    )
                else:
                    turns, sources = await load_thread_turns(
                        self._client,
                        chat,
                        self._settings,
                        thread,
                        budget_chars=budget,
                        stop_at=item.event_id,
                        decrypt=decrypt,
                    )
            except (MatrixAPIError, CryptoError) as exc:
                log.warning("context_rebuild_failed", error=str(exc), thread=thread is not None)
                return []
            await self._store.replace_conversation(
                chat.chat_id, [(t.role, t.content) for t in turns], sources, thread=thread
            )
            log.info("context_rebuilt", turns=len(turns), thread=thread is not None)
            return turns
        turns = [Turn(cast("Role", role), content) for role, content in stored]
        return trim_context(turns, budget)

    async def _context_decryptor(self, room_id: RoomID) -> Decrypt | None:
        """How a context read from ``room_id`` decrypts its events: None when the room
        is not encrypted (or the bot does not read encrypted rooms). After a lost store
        the keys of the history come from the key backup: its restore is waited for
        first (bounded, as for a message that needs it)."""
        crypto = self.crypto
        if crypto is None or self._store.room_encryption(room_id) is None:
            return None
        with trio.move_on_after(BACKUP_WAIT_S):
            await crypto.backup_settled.wait()

        asked: set[str] = set()

        async def decrypt(event: RoomEvent) -> RoomEvent | None:
            await trio.lowlevel.checkpoint()
            return await decrypted_now(crypto, room_id, event, asked=asked)

        return decrypt

    async def _reply(
        self,
        item: InboxItem,
        reply: Reply,
        outcome: Outcome,
        *,
        purpose: str = "reply",
        reason: str | None = None,
        mention: str | None = None,
    ) -> EventID:
        content = notice(
            reply.body,
            reply_to=item.event_id,
            formatted_body=reply.html,
            mention=mention,
            thread=thread_root(item.event),
        )
        if outcome != "replied":
            # Not an answer: a conversation rebuilt from the room leaves the exchange out.
            content[FAILED_KEY] = True
        reply_id = await self._client.send_event(
            item.room_id, "m.room.message", content, txn_id=reply_txn_id(item.event_id, purpose)
        )
        await self._finish(item, outcome, reply_id, reason=reason)
        return reply_id

    async def _finish(
        self,
        item: InboxItem,
        outcome: Outcome,
        reply_event_id: EventID | None = None,
        *,
        reason: str | None = None,
    ) -> None:
        """`Store.finish`, counted by outcome."""
        await self._store.finish(item, outcome, reply_event_id, reason=reason)
        self._metrics.finished(outcome)

    def _answer_sent(self, item: InboxItem) -> None:
        """The backend's answer to ``item`` is out: its latency, on the server's clock."""
        self._metrics.answer_sent(
            self._backend.name, item.event.origin_server_ts, self._client.server_time_ms()
        )

    async def give_up(self, item: InboxItem, error: Exception) -> bool:
        # Our own errors say nothing of the content; any other is named, not quoted.
        reason = str(error) if isinstance(error, LeftUnfinishedTooOften) else None
        reason = reason or failure_reason(error, "handling")
        log_quarantined(item.room_id, item.event_id, item.event.sender, reason)
        left = isinstance(error, LeftUnfinishedTooOften)
        self._metrics.quarantine("left_unfinished" if left else "handling_error")
        if item.kind == "invite":
            await self._store.discard(item)
            return False
        if item.kind == "redaction":  # nothing to tell anyone: the answer stays
            await self._finish(item, "quarantined", reason=reason)
            return False
        try:
            await self._reply(
                item, Reply(FAILED_NOTICE), "quarantined", purpose="failure", reason=reason
            )
        except (MatrixAPIError, CryptoError):  # the notice could not be sent (or encrypted)
            await self._finish(item, "quarantined", reason=reason)
            return False
        return True

    async def count_resumption(self, item: InboxItem) -> int:
        return await self._store.count_resumption(item)

    async def mark_read(self, room_id: str, event_id: str) -> None:
        if event_id.startswith("invite:"):
            return
        await self._client.send_receipt(RoomID(room_id), EventID(event_id))
