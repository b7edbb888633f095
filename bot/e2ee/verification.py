"""The bot's end of interactive verification (`matrix_crypto.verification`): a user
verifies the bot's device from their client by comparing emoji or numbers, over
to-device messages (`receive`) or in a room they share with the bot (`receive_room`,
what Element does to verify another user).

The bot cannot look at emoji: it accepts at the comparison step, and the user's own
confirmation (their client's MAC, sent only when they say the emoji match) is what
completes it. The emoji and numbers go to the log (``verification_sas``) with the user
and device, so an operator can compare them with the user if they wish; nothing
secret is in that line.

Only users allowed to use the bot (``allowed_users`` or ``admins``) may verify; others
get a cancel (``m.user``). Before the bot answers a request it makes sure it knows the
user's devices (checked by the OlmMachine) and master key (its MAC is checked against
both). When the user's MAC covered their master key, the bot signs that key with its
user-signing key, as clients do for a verified user.

Nothing here is persisted: a restart forgets the verifications in flight (the user's
client times them out and the user starts again).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence

import structlog
import trio

from matrix_api import MatrixAPIError
from matrix_api.models import RoomEvent, RoomID, SyncResponse, UserID
from matrix_crypto.cross_signing import (
    MASTER,
    CrossSigningKeys,
    CrossSigningRecord,
    cross_signing_public_key,
)
from matrix_crypto.errors import CryptoError
from matrix_crypto.verification import (
    KEY_MISMATCH,
    Cancelled,
    Ignored,
    Requested,
    RoomMessageRequest,
    SasShown,
    VerificationMachine,
    VerificationUpdate,
    Verified,
)

from ..config import Settings
from .cross_signing import KEYS as _KEYS_ROW
from .cross_signing import SIGNED_DEVICE as _SIGNED_DEVICE_ROW
from .crypto import BotCrypto

__all__ = ["BotVerifications", "is_verification_event"]

log = structlog.get_logger("bot.e2ee")

# A message the server keeps refusing is dropped after this many tries (the flow then
# times out on both sides); between rounds with a failure, this long.
_SEND_ATTEMPTS = 3
_RETRY_S = 2.0
_MAX_SIGNINGS = 16


def _flow_of(event: RoomEvent) -> str | None:
    """The request event id a room verification event belongs to."""
    if event.type == "m.room.message":
        return event.event_id
    relates = event.content.get("m.relates_to")
    flow = relates.get("event_id") if isinstance(relates, Mapping) else None
    return flow if isinstance(flow, str) else None


def _room_event_dict(event: RoomEvent) -> dict[str, object]:
    return {
        "type": event.type,
        "sender": event.sender,
        "event_id": event.event_id,
        "origin_server_ts": event.origin_server_ts,
        "content": event.content,
    }


def is_verification_event(event_type: str, content: Mapping[str, object]) -> bool:
    """Whether a (decrypted) room event belongs to a verification in the room: a
    request message, or one of the ``m.key.verification.*`` events."""
    if event_type == "m.room.message":
        return content.get("msgtype") == "m.key.verification.request"
    return event_type.startswith("m.key.verification.")


class BotVerifications:
    """The SAS verifications of the bot's device, for the runtime's lifetime.

    `receive` is fed each sync batch's to-device events (synchronously, no I/O: the
    caller may hold the batch's transaction); `run` does the network part (device and
    master key lookups, the messages, the user signatures) until cancelled.
    """

    def __init__(
        self,
        crypto: BotCrypto,
        settings: Settings,
        pickle_key: bytes | None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._crypto = crypto
        self._settings = settings
        self._pickle_key = pickle_key
        self._clock = clock
        machine = crypto.machine
        self._user_id = machine.user_id
        self._device_id = machine.device_id
        self.machine = VerificationMachine(
            machine.user_id,
            machine.device_id,
            machine.ed25519,
            device_key=self._device_key,
            master_key=self._master_key,
            allowed=self._allowed,
        )
        # Master keys of users verifying now, from the bot's own /keys/query.
        self._masters: dict[str, str] = {}
        self._to_prepare: dict[str, Requested] = {}
        self._to_sign: dict[str, str] = {}
        self._attempts: dict[str, int] = {}
        self._wake = trio.Event()

    # --- what the machine asks -----------------------------------------------------------

    def _allowed(self, user_id: str) -> bool:
        return self._settings.allowed.allows(user_id) or user_id in self._settings.admins

    def _device_key(self, user_id: str, device_id: str) -> str | None:
        for device in self._crypto.machine.devices(user_id):
            if device.device_id == device_id:
                return device.ed25519
        return None

    def _master_key(self, user_id: str) -> str | None:
        if user_id != self._user_id:
            return self._masters.get(user_id)
        # Ours only once this device is signed by it: the user's client then sees a
        # verified identity whose key signs the device it just verified.
        own = self._crypto.own
        row = own.get(_KEYS_ROW)
        if row is None or own.get(_SIGNED_DEVICE_ROW) != self._device_id:
            return None
        try:
            master = json.loads(row).get("master_key")
        except (ValueError, AttributeError):
            return None
        return master if isinstance(master, str) else None

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    # --- input -------------------------------------------------------------------------

    def receive(self, to_device: Sequence[object]) -> None:
        """Take a sync batch's to-device events (``{"type", "sender", "content"}``);
        the verification ones are answered by `run`. Never raises, no I/O."""
        now = self._now_ms()
        for event in to_device:
            for update in self.machine.receive(event, now):
                self._note(update)
        if self._has_work():
            self._wake.set()

    def receive_room(self, room_id: str, events: Sequence[object]) -> None:
        """Take a room's events (decrypted, in timeline order, ``{"type", "sender",
        "event_id", "origin_server_ts", "content"}``): a verification request addressed
        to the bot (``m.room.message``, msgtype ``m.key.verification.request``) and the
        ``m.key.verification.*`` events of one; the answers go to the room, encrypted
        when it is. Others are ignored. Never raises, no I/O."""
        now = self._now_ms()
        for event in events:
            for update in self.machine.receive_room_event(room_id, event, now):
                self._note(update)
        if self._has_work():
            self._wake.set()

    def receive_rooms(self, response: SyncResponse) -> None:
        """`receive_room` for the verification events of a sync batch's joined rooms'
        timelines: what matrix-js-sdk and Element send, in the clear even in encrypted
        rooms (the sync filter must let ``m.key.verification.*`` through). Never
        raises, no I/O."""
        for room_id, room in response.rooms.join.items():
            events = [e for e in room.timeline.events if is_verification_event(e.type, e.content)]
            # A flow the bot already answered (its own messages are in the timeline: the
            # history a start-up sync brings back) was a previous run's: not replayed.
            answered = {_flow_of(e) for e in events if e.sender == self._user_id and _flow_of(e)}
            events = [e for e in events if _flow_of(e) not in answered]
            if events:
                self.receive_room(room_id, [_room_event_dict(e) for e in events])

    def take_room_event(self, room_id: str, event: RoomEvent) -> bool:
        """`receive_room` for one (decrypted) timeline event, when it is part of a
        verification: True when it was (the caller answers it no further), False for
        any other event."""
        if not is_verification_event(event.type, event.content):
            return False
        self.receive_room(room_id, [_room_event_dict(event)])
        return True

    def _note(self, update: VerificationUpdate) -> None:
        if isinstance(update, Requested):
            log.info(
                "verification_requested",
                user_id=update.user_id,
                device_id=update.device_id,
                transaction_id=update.transaction_id,
            )
            self._to_prepare[update.transaction_id] = update
        elif isinstance(update, SasShown):
            # For the operator: what the user compares on their screen.
            log.info(
                "verification_sas",
                user_id=update.user_id,
                device_id=update.device_id,
                emoji=[e.description for e in update.emoji],
                decimals=list(update.decimals),
                transaction_id=update.transaction_id,
            )
        elif isinstance(update, Verified):
            log.info(
                "verification_done",
                user_id=update.user_id,
                device_id=update.device_id,
                emoji=[e.description for e in update.emoji],
                decimals=list(update.decimals),
                device_ed25519=update.device_ed25519,
                master_key=update.master_key,
                transaction_id=update.transaction_id,
            )
            self._forget(update.transaction_id, update.user_id)
            master = update.master_key
            other = update.user_id != self._user_id
            if master is not None and other and len(self._to_sign) < _MAX_SIGNINGS:
                self._to_sign[update.user_id] = master
        elif isinstance(update, Cancelled):
            log.info(
                "verification_cancelled",
                user_id=update.user_id,
                device_id=update.device_id,
                code=update.code,
                reason=update.reason,
                by_bot=update.by_us,
                transaction_id=update.transaction_id,
            )
            self._forget(update.transaction_id, update.user_id)
        elif isinstance(update, Ignored):
            # Debug only: anyone can send these, a line each would flood the log.
            log.debug(
                "verification_event_ignored",
                user_id=update.user_id,
                type=update.event_type,
                reason=update.reason,
            )

    def _forget(self, transaction_id: str, user_id: str) -> None:
        self._to_prepare.pop(transaction_id, None)
        if all(user != user_id for user, _, _ in self.machine.active()):
            self._masters.pop(user_id, None)

    def _has_work(self) -> bool:
        return bool(self.machine.outgoing_requests() or self._to_prepare or self._to_sign)

    # --- the network part ----------------------------------------------------------------

    async def run(self) -> None:
        """Answer verifications until cancelled: keys looked up, messages sent,
        timeouts applied, verified users signed. Logs what the server refuses."""
        while True:
            if not self._has_work():
                deadline = self.machine.next_deadline_ms()
                wait = math.inf if deadline is None else max(0, deadline - self._now_ms()) / 1000
                with trio.move_on_after(wait):
                    await self._wake.wait()
            self._wake = trio.Event()
            for update in self.machine.expire(self._now_ms()):
                self._note(update)
            await self._prepare()
            sent_all = await self._send()
            await self._sign()
            if not sent_all:
                await trio.sleep(_RETRY_S)

    async def _prepare(self) -> None:
        """Know the devices and the master key of each new verifying user before the
        bot's first answer leaves; a device it still cannot see is refused at once
        (its MAC could never be checked)."""
        while self._to_prepare:
            txn, requested = next(iter(self._to_prepare.items()))
            user_id = requested.user_id
            try:
                await self._crypto.ensure_devices([user_id])
                answer = await self._crypto.client.query_keys({user_id: []})
            except (MatrixAPIError, CryptoError) as exc:
                log.warning("verification_keys_unavailable", user_id=user_id, error=str(exc))
                self._to_prepare.pop(txn, None)
                continue  # the MAC check decides with what is known
            self._to_prepare.pop(txn, None)
            master = cross_signing_public_key(
                answer.master_keys.get(UserID(user_id)), user_id, MASTER
            )
            if master is not None:
                self._masters[user_id] = master
            if self._device_key(user_id, requested.device_id) is None:
                for update in self.machine.cancel(
                    txn, KEY_MISMATCH, "the bot cannot see this device's keys", self._now_ms()
                ):
                    self._note(update)

    async def _send(self) -> bool:
        """Send the machine's messages in order; False when one failed (kept for the
        next round, dropped after a few tries). A room message goes through the
        client's `send_event`, which encrypts it in an encrypted room."""
        client = self._crypto.client
        for request in self.machine.outgoing_requests():
            try:
                if isinstance(request, RoomMessageRequest):
                    await client.send_event(
                        RoomID(request.room_id), request.event_type, request.content, request.txn_id
                    )
                else:
                    await client.send_to_device(
                        request.event_type, request.messages, request.txn_id
                    )
            except (MatrixAPIError, CryptoError) as exc:
                tries = self._attempts.get(request.request_id, 0) + 1
                self._attempts[request.request_id] = tries
                log.warning(
                    "verification_send_failed",
                    type=request.event_type,
                    error=str(exc),
                    attempt=tries,
                )
                if tries < _SEND_ATTEMPTS:
                    return False  # later ones wait: a flow's messages go in order
                self._attempts.pop(request.request_id, None)
            self.machine.mark_request_sent(request.request_id)
            self._attempts.pop(request.request_id, None)
        return True

    async def _sign(self) -> None:
        """Sign each verified user's master key with the bot's user-signing key (what
        a client does once a user is verified); skipped, with a line saying why, when
        the bot has no cross-signing keys."""
        while self._to_sign:
            user_id, master = self._to_sign.popitem()
            keys = self._cross_signing_keys()
            if keys is None:
                log.info(
                    "verification_user_not_signed",
                    user_id=user_id,
                    reason="the bot has no cross-signing keys",
                )
                continue
            try:
                answer = await self._crypto.client.query_keys({user_id: []})
                obj = answer.master_keys.get(UserID(user_id))
                if obj is None or cross_signing_public_key(obj, user_id, MASTER) != master:
                    log.warning(
                        "verification_user_not_signed",
                        user_id=user_id,
                        reason="the user's master key changed since it was verified",
                    )
                    continue
                result = await self._crypto.client.upload_signatures(keys.sign_user(obj))
            except (MatrixAPIError, ValueError) as exc:
                log.warning("verification_user_not_signed", user_id=user_id, reason=str(exc))
                continue
            if result.failures:
                log.warning(
                    "verification_user_not_signed",
                    user_id=user_id,
                    reason="the homeserver refused the signature",
                )
                continue
            log.info("verification_user_signed", user_id=user_id, master_key=master)

    def _cross_signing_keys(self) -> CrossSigningKeys | None:
        row = self._crypto.own.get(_KEYS_ROW)
        if row is None or self._pickle_key is None:
            return None
        try:
            record = CrossSigningRecord(**json.loads(row))
            return CrossSigningKeys.from_record(record, self._pickle_key)
        except (TypeError, ValueError, CryptoError) as exc:
            log.warning("verification_keys_unreadable", error=type(exc).__name__)
            return None
