"""Interactive key verification with short authentication strings (``m.sas.v1``) over
to-device messages: this device's side, always the one that answers.

Sans-IO like the rest of the package (the shape of matrix-rust-sdk's verification
machine): to-device event dicts and the time go in (`VerificationMachine.receive`,
`VerificationMachine.expire`); the to-device messages to send come out
(`outgoing_requests`, the machine's `ToDeviceRequest`, answered with
`mark_request_sent`), with what happened as `VerificationUpdate` values. No I/O, no
clock of its own, no persistence: a restart forgets the flows in flight (the other
side times them out).

The same flow runs in a room (`VerificationMachine.receive_room_event`, for decrypted
room events): the request is an ``m.room.message`` (msgtype
``m.key.verification.request``) addressed to us, its event id names the flow, the
other messages refer to it (``m.relates_to``, ``m.reference``) and ours go to the
room (`RoomMessageRequest`). The flow over to-device messages
(spec, "Key verification framework" and "SAS verification")::

    them                                   us
    m.key.verification.request  ------->
                                <-------   m.key.verification.ready
    m.key.verification.start    ------->
                                <-------   m.key.verification.accept (commitment)
    m.key.verification.key      ------->
                                <-------   m.key.verification.key, m.key.verification.mac
    m.key.verification.mac      ------->   (their user confirmed the emoji match)
                                <-------   m.key.verification.done
    m.key.verification.done     ------->   `Verified`

This side cannot look at emoji: it sends its MAC as soon as the keys are exchanged,
and the other side's MAC, which their client sends only once its user said the
strings match, is what completes the verification. The deprecated start without a
request is answered too.

Trust: the other device's MAC is checked against the ed25519 key the caller knows for
that device (``device_key``) and, when their MAC includes it, against the master key
the caller knows for that user (``master_key``); keys it does not know are not
verified. Our MAC covers this device's ed25519 key and our master key when
``master_key(own user)`` names one (so their client can mark our identity verified).

Everything from outside is refused with a cancel or an `Ignored` update, never an
exception; flows, outgoing messages and remembered transactions are bounded.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import vodozemac

from matrix_crypto.canonical import b64encode, canonical_json
from matrix_crypto.machine import OutgoingRequest, ToDeviceRequest

__all__ = [
    "EMOJI",
    "Cancelled",
    "Emoji",
    "Ignored",
    "Requested",
    "RoomMessageRequest",
    "SasShown",
    "VerificationMachine",
    "VerificationUpdate",
    "Verified",
]

PREFIX = "m.key.verification."
ROOM_MESSAGE = "m.room.message"
REFERENCE = "m.reference"
REQUEST = "m.key.verification.request"
READY = "m.key.verification.ready"
START = "m.key.verification.start"
ACCEPT = "m.key.verification.accept"
KEY = "m.key.verification.key"
MAC = "m.key.verification.mac"
DONE = "m.key.verification.done"
CANCEL = "m.key.verification.cancel"

SAS_V1 = "m.sas.v1"
KEY_AGREEMENT = "curve25519-hkdf-sha256"
HASH = "sha256"
MAC_V2 = "hkdf-hmac-sha256.v2"
MAC_MSC3783 = "org.matrix.msc3783.hkdf-hmac-sha256"  # v2 under its unstable name
MAC_V1 = "hkdf-hmac-sha256"  # libolm's wrong base64: only with a peer that has nothing else
MAC_PREFERENCE = (MAC_V2, MAC_MSC3783, MAC_V1)
SAS_METHODS = ("decimal", "emoji")

# Cancel codes (spec: m.key.verification.cancel and the SAS additions).
USER = "m.user"
TIMEOUT = "m.timeout"
UNKNOWN_TRANSACTION = "m.unknown_transaction"
UNKNOWN_METHOD = "m.unknown_method"
UNEXPECTED_MESSAGE = "m.unexpected_message"
KEY_MISMATCH = "m.key_mismatch"
USER_MISMATCH = "m.user_mismatch"
INVALID_MESSAGE = "m.invalid_message"
MISMATCHED_COMMITMENT = "m.mismatched_commitment"  # the starting side checks it: never us

# Spec: "Clients should time out a verification that does not complete within 10
# minutes." Between two messages of the SAS itself we wait less: the only human step
# on their side is comparing seven emoji (matrix-rust-sdk gives up after one minute).
TIMEOUT_MS = 10 * 60_000
STEP_TIMEOUT_MS = 2 * 60_000
# Spec (m.key.verification.request): ignore a request more than 10 minutes old or more
# than 5 minutes in the future.
REQUEST_MAX_AGE_MS = 10 * 60_000
REQUEST_MAX_AHEAD_MS = 5 * 60_000
# Bounds against a peer that floods: flows at once, per user, messages waiting to be
# sent, finished transactions remembered (so replays and late messages stay quiet).
MAX_FLOWS = 8
MAX_FLOWS_PER_USER = 2
MAX_OUTBOX = 64
MAX_FINISHED = 256
MAX_ID_CHARS = 255
MAX_LIST_ITEMS = 32
MAX_MACS = 16
MAX_MAC_CHARS = 128
MAX_CONTENT_BYTES = 16 * 1024
MAX_REASON_CHARS = 200


@dataclass(frozen=True, slots=True)
class Emoji:
    """One of the seven emoji of a SAS: its number in the spec's table, the emoji and
    its English description."""

    number: int
    symbol: str
    description: str


# The spec's table (data-definitions/sas-emoji.json), by number.
_EMOJI_TABLE = (
    ("🐶", "Dog"), ("🐱", "Cat"), ("🦁", "Lion"), ("🐎", "Horse"),
    ("🦄", "Unicorn"), ("🐷", "Pig"), ("🐘", "Elephant"), ("🐰", "Rabbit"),
    ("🐼", "Panda"), ("🐓", "Rooster"), ("🐧", "Penguin"), ("🐢", "Turtle"),
    ("🐟", "Fish"), ("🐙", "Octopus"), ("🦋", "Butterfly"), ("🌷", "Flower"),
    ("🌳", "Tree"), ("🌵", "Cactus"), ("🍄", "Mushroom"), ("🌏", "Globe"),
    ("🌙", "Moon"), ("☁️", "Cloud"), ("🔥", "Fire"), ("🍌", "Banana"),
    ("🍎", "Apple"), ("🍓", "Strawberry"), ("🌽", "Corn"), ("🍕", "Pizza"),
    ("🎂", "Cake"), ("❤️", "Heart"), ("😀", "Smiley"), ("🤖", "Robot"),
    ("🎩", "Hat"), ("👓", "Glasses"), ("🔧", "Spanner"), ("🎅", "Santa"),
    ("👍", "Thumbs Up"), ("☂️", "Umbrella"), ("⌛", "Hourglass"), ("⏰", "Clock"),
    ("🎁", "Gift"), ("💡", "Light Bulb"), ("📕", "Book"), ("✏️", "Pencil"),
    ("📎", "Paperclip"), ("✂️", "Scissors"), ("🔒", "Lock"), ("🔑", "Key"),
    ("🔨", "Hammer"), ("☎️", "Telephone"), ("🏁", "Flag"), ("🚂", "Train"),
    ("🚲", "Bicycle"), ("✈️", "Aeroplane"), ("🚀", "Rocket"), ("🏆", "Trophy"),
    ("⚽", "Ball"), ("🎸", "Guitar"), ("🎺", "Trumpet"), ("🔔", "Bell"),
    ("⚓", "Anchor"), ("🎧", "Headphones"), ("📁", "Folder"), ("📌", "Pin"),
)  # fmt: skip
EMOJI = tuple(Emoji(n, symbol, name) for n, (symbol, name) in enumerate(_EMOJI_TABLE))


# ---------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class RoomMessageRequest(OutgoingRequest):
    """``PUT /rooms/{room_id}/send/{event_type}/{txn_id}`` (encrypted first in an
    encrypted room): a message of a verification in a room. The transaction id is the
    request id, so a retried send is the same event."""

    room_id: str = ""
    event_type: str = ""
    content: dict[str, Any] = field(default_factory=dict)
    kind: ClassVar[str] = "room_message"

    @property
    def txn_id(self) -> str:
        return self.request_id

    @property
    def body(self) -> dict[str, Any]:
        return self.content


# ----------------------------------------------------------------------------- updates


@dataclass(frozen=True, slots=True)
class Requested:
    """A verification began (a request, or a start without one) from an allowed user:
    the caller makes sure it knows the keys of ``user_id``'s devices and master key."""

    user_id: str
    device_id: str
    transaction_id: str


@dataclass(frozen=True, slots=True)
class SasShown:
    """The keys are exchanged: what the other user sees and compares."""

    user_id: str
    device_id: str
    transaction_id: str
    emoji: tuple[Emoji, ...]
    decimals: tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class Verified:
    """Complete: the other user confirmed the strings match (their MAC) and both sides
    said done. ``device_ed25519`` is the verified key of ``device_id``; ``master_key``
    is ``user_id``'s master key when their MAC covered the one the caller knows."""

    user_id: str
    device_id: str
    transaction_id: str
    emoji: tuple[Emoji, ...]
    decimals: tuple[int, int, int]
    device_ed25519: str
    master_key: str | None


@dataclass(frozen=True, slots=True)
class Cancelled:
    """A flow ended without verifying. ``by_us``: we sent the cancel (``code`` is ours),
    else the other side did (``reason`` is theirs, cut and made printable)."""

    user_id: str
    device_id: str | None
    transaction_id: str
    code: str
    reason: str
    by_us: bool


@dataclass(frozen=True, slots=True)
class Ignored:
    """An event that changed nothing (malformed beyond an answer, a replay, a late
    message, an unknown transaction...). ``reason`` is short and safe to log."""

    user_id: str
    event_type: str
    reason: str


VerificationUpdate = Requested | SasShown | Verified | Cancelled | Ignored


# ------------------------------------------------------------------------------- flows

_READY_SENT = "ready_sent"  # waiting for their start
_ACCEPTED = "accepted"  # accept sent, waiting for their key
_KEYS_EXCHANGED = "keys_exchanged"  # our key and MAC sent, waiting for their MAC
_MAC_VERIFIED = "mac_verified"  # done sent, waiting for theirs


@dataclass(slots=True)
class _Flow:
    transaction_id: str
    user_id: str
    device_id: str
    created_ms: int
    last_ms: int
    state: str = _READY_SENT
    seen: dict[str, bytes] = field(default_factory=dict)  # type -> canonical content
    sas: vodozemac.Sas | None = None
    established: vodozemac.EstablishedSas | None = None
    mac_method: str = MAC_V2
    emoji: tuple[Emoji, ...] = ()
    decimals: tuple[int, int, int] = (0, 0, 0)
    device_ed25519: str = ""
    master_key: str | None = None
    room_id: str | None = None  # a flow in a room; None: over to-device messages


class _Refused(Exception):
    """Internal: cancel the flow with ``code``."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _everyone(user_id: str) -> bool:
    return True


def _nobody(user_id: str) -> str | None:
    return None


def _id(value: object) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS and value.isprintable():
        return value
    return None


def _str_list(content: Mapping[str, object], name: str) -> list[str]:
    value = content.get(name)
    if (
        not isinstance(value, list)
        or len(value) > MAX_LIST_ITEMS
        or not all(isinstance(v, str) and len(v) <= MAX_ID_CHARS for v in value)
    ):
        raise _Refused(INVALID_MESSAGE, f"{name} is not a list of names")
    return list(value)


def _printable(text: object) -> str:
    if not isinstance(text, str):
        return ""
    cut = text[:MAX_REASON_CHARS]
    return "".join(c if c.isprintable() else "?" for c in cut)


def _canonical(content: Mapping[str, object]) -> bytes:
    try:
        data = canonical_json(content)
    except (TypeError, ValueError):
        raise _Refused(INVALID_MESSAGE, "content is not canonical JSON") from None
    if len(data) > MAX_CONTENT_BYTES:
        raise _Refused(INVALID_MESSAGE, "content too large")
    return data


def _new_request_id() -> str:
    return secrets.token_hex(12)


# ----------------------------------------------------------------------------- machine


class VerificationMachine:
    """This device's SAS verifications with other devices. Not thread-safe.

    ``device_key(user_id, device_id)`` is the ed25519 key known (from validated
    ``/keys/query`` answers) for another device, or None. ``master_key(user_id)`` is
    the cross-signing master key known for a user, or None; for our own user it is the
    master key our MAC should include (only when this device is signed by it).
    ``allowed(user_id)`` says who may verify with us; others get a cancel (``m.user``).
    """

    def __init__(
        self,
        user_id: str,
        device_id: str,
        ed25519: str,
        *,
        device_key: Callable[[str, str], str | None],
        master_key: Callable[[str], str | None] = _nobody,
        allowed: Callable[[str], bool] = _everyone,
    ) -> None:
        self.user_id = user_id
        self.device_id = device_id
        self.ed25519 = ed25519
        self._device_key = device_key
        self._master_key = master_key
        self._allowed = allowed
        self._flows: dict[str, _Flow] = {}
        # Ended transactions: id -> (user, when); late messages for them are ignored.
        self._finished: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self._outbox: OrderedDict[str, ToDeviceRequest | RoomMessageRequest] = OrderedDict()

    # -- output ------------------------------------------------------------------------

    def outgoing_requests(self) -> list[ToDeviceRequest | RoomMessageRequest]:
        """The messages to send, in order (one per request: a flow's messages must
        arrive in the order they were made). The same requests (ids) until
        `mark_request_sent`."""
        return list(self._outbox.values())

    def mark_request_sent(self, request_id: str) -> None:
        """The request was sent (or the caller gave up on it); unknown ids are ignored."""
        self._outbox.pop(request_id, None)

    def active(self) -> list[tuple[str, str, str]]:
        """(user, device, transaction id) of each flow in progress."""
        return [(f.user_id, f.device_id, f.transaction_id) for f in self._flows.values()]

    def next_deadline_ms(self) -> int | None:
        """When `expire` next has something to time out (None: no flow)."""
        deadlines = [self._deadline(f) for f in self._flows.values()]
        return min(deadlines) if deadlines else None

    # -- input -------------------------------------------------------------------------

    def expire(self, now_ms: int) -> list[VerificationUpdate]:
        """Cancel (``m.timeout``) the flows past their deadline; forget old transactions."""
        updates: list[VerificationUpdate] = []
        for flow in list(self._flows.values()):
            if now_ms >= self._deadline(flow):
                updates.append(self._cancel(flow, TIMEOUT, "timed out", now_ms))
        while self._finished:
            _, (_, ended) = next(iter(self._finished.items()))
            if now_ms - ended < TIMEOUT_MS:
                break
            self._finished.popitem(last=False)
        return updates

    def cancel(self, transaction_id: str, code: str, reason: str, now_ms: int) -> list[Cancelled]:
        """Cancel a flow in progress from our side (nothing when it is not)."""
        flow = self._flows.get(transaction_id)
        if flow is None:
            return []
        return [self._cancel(flow, code, reason, now_ms)]

    def receive(self, event: object, now_ms: int) -> list[VerificationUpdate]:
        """Take one to-device event (``{"type", "sender", "content"}``). Events that are
        not ``m.key.verification.*`` give no update. Never raises."""
        if not isinstance(event, Mapping):
            return []
        event_type = event.get("type")
        if not isinstance(event_type, str) or not event_type.startswith(PREFIX):
            return []
        updates = self.expire(now_ms)
        sender = event.get("sender")
        content = event.get("content")
        if _id(sender) is None or not isinstance(sender, str):
            return [*updates, Ignored("", event_type, "no valid sender")]
        if not isinstance(content, Mapping):
            return [*updates, Ignored(sender, event_type, "content is not an object")]
        txn = _id(content.get("transaction_id"))
        if txn is None:
            return [*updates, Ignored(sender, event_type, "no valid transaction_id")]
        if sender == self.user_id and content.get("from_device") == self.device_id:
            return [*updates, Ignored(sender, event_type, "our own message")]
        timestamp = content.get("timestamp")
        return [*updates, *self._guarded(event_type, sender, txn, content, now_ms, None, timestamp)]

    def receive_room_event(
        self, room_id: str, event: object, now_ms: int
    ) -> list[VerificationUpdate]:
        """Take one room event (decrypted, in timeline order): an ``m.room.message``
        whose msgtype is ``m.key.verification.request`` addressed to us (``to``), or an
        ``m.key.verification.*`` event referring to such a request (``m.relates_to``,
        ``m.reference``). The flow is named by the request's event id and answered in
        the room (`RoomMessageRequest`). Others give no update. Never raises."""
        if not isinstance(event, Mapping) or _id(room_id) is None:
            return []
        event_type = event.get("type")
        content = event.get("content")
        if not isinstance(event_type, str) or not isinstance(content, Mapping):
            return []
        if event_type == ROOM_MESSAGE:
            if content.get("msgtype") != REQUEST:
                return []
            event_type = REQUEST
        elif not event_type.startswith(PREFIX) or event_type == REQUEST:
            return []
        updates = self.expire(now_ms)
        sender = event.get("sender")
        if _id(sender) is None or not isinstance(sender, str):
            return [*updates, Ignored("", event_type, "no valid sender")]
        if sender == self.user_id:
            return [*updates, Ignored(sender, event_type, "our own message")]
        timestamp: object = None
        if event_type == REQUEST:
            if content.get("to") != self.user_id:
                return [*updates, Ignored(sender, event_type, "a request for someone else")]
            flow_id = _id(event.get("event_id"))
            timestamp = event.get("origin_server_ts")
        else:
            relates = content.get("m.relates_to")
            reference = isinstance(relates, Mapping) and relates.get("rel_type") == REFERENCE
            flow_id = _id(relates.get("event_id")) if isinstance(relates, Mapping) else None
            flow_id = flow_id if reference else None
        if flow_id is None:
            return [*updates, Ignored(sender, event_type, "no request it belongs to")]
        return [
            *updates,
            *self._guarded(event_type, sender, flow_id, content, now_ms, room_id, timestamp),
        ]

    def _guarded(
        self,
        event_type: str,
        sender: str,
        flow_id: str,
        content: Mapping[str, object],
        now_ms: int,
        room_id: str | None,
        timestamp: object,
    ) -> list[VerificationUpdate]:
        try:
            return self._dispatch(event_type, sender, flow_id, content, now_ms, room_id, timestamp)
        except Exception as exc:  # noqa: BLE001  # a bug here must not sink the sync batch
            updates: list[VerificationUpdate] = []
            flow = self._flows.get(flow_id)
            if flow is not None and flow.user_id == sender and flow.room_id == room_id:
                updates.append(self._cancel(flow, INVALID_MESSAGE, "internal error", now_ms))
            updates.append(Ignored(sender, event_type, f"internal error: {type(exc).__name__}"))
            return updates

    # -- dispatch ----------------------------------------------------------------------

    def _dispatch(
        self,
        event_type: str,
        sender: str,
        txn: str,
        content: Mapping[str, object],
        now_ms: int,
        room_id: str | None,
        timestamp: object,
    ) -> list[VerificationUpdate]:
        flow = self._flows.get(txn)
        if flow is not None and flow.room_id != room_id:
            # The same id over to-device and in a room (or two rooms): not this flow.
            return [Ignored(sender, event_type, "flow of another room or of to-device")]
        if event_type == CANCEL:
            return self._on_cancel(sender, txn, content, now_ms)
        if flow is not None and flow.user_id != sender:
            # Someone else's transaction: their flow goes on; this sender is told.
            if room_id is None:
                self._tell(sender, content, txn, USER_MISMATCH, "transaction of another user")
            return [Ignored(sender, event_type, "transaction of another user")]
        if flow is None:
            if txn in self._finished:
                return [Ignored(sender, event_type, "transaction already ended")]
            if event_type == REQUEST:
                return self._on_request(sender, txn, content, now_ms, room_id, timestamp)
            if event_type == START and room_id is None:
                # Deprecated but answered: a to-device start without a request.
                return self._begin(sender, txn, content, now_ms, None, start=True)
            if room_id is None:
                # Spec: an unknown transaction gets m.unknown_transaction, when we can
                # say to which device (only messages naming from_device tell).
                self._tell(sender, content, txn, UNKNOWN_TRANSACTION, "unknown transaction")
            return [Ignored(sender, event_type, "unknown transaction")]
        try:
            canonical = _canonical(content)
            if flow.seen.get(event_type) == canonical:
                return [Ignored(sender, event_type, "replayed message")]
            flow.last_ms = now_ms
            updates = self._step(flow, event_type, content, canonical, now_ms)
            if flow.transaction_id in self._flows:
                flow.seen[event_type] = canonical
            return updates
        except _Refused as refused:
            return [self._cancel(flow, refused.code, refused.reason, now_ms)]

    def _step(
        self,
        flow: _Flow,
        event_type: str,
        content: Mapping[str, object],
        canonical: bytes,
        now_ms: int,
    ) -> list[VerificationUpdate]:
        if event_type == START and flow.state == _READY_SENT:
            if content.get("from_device") != flow.device_id:
                raise _Refused(UNEXPECTED_MESSAGE, "start from another device than the request")
            return self._on_start(flow, content, canonical)
        if event_type == KEY and flow.state == _ACCEPTED:
            return self._on_key(flow, content)
        if event_type == MAC and flow.state == _KEYS_EXCHANGED:
            return self._on_mac(flow, content)
        if event_type == DONE and flow.state == _MAC_VERIFIED:
            return [self._done(flow, now_ms)]
        if event_type == REQUEST:
            raise _Refused(UNEXPECTED_MESSAGE, "a second request in the same transaction")
        # ready/accept (we never request or start), or anything out of order.
        raise _Refused(UNEXPECTED_MESSAGE, f"unexpected {event_type.removeprefix(PREFIX)}")

    # -- request / start -----------------------------------------------------------------

    def _on_request(
        self,
        sender: str,
        txn: str,
        content: Mapping[str, object],
        now_ms: int,
        room_id: str | None,
        timestamp: object,
    ) -> list[VerificationUpdate]:
        if not isinstance(timestamp, int) or isinstance(timestamp, bool):
            return [Ignored(sender, REQUEST, "request without a timestamp")]
        if not -REQUEST_MAX_AHEAD_MS <= now_ms - timestamp <= REQUEST_MAX_AGE_MS:
            return [Ignored(sender, REQUEST, "request too old or in the future")]
        methods = content.get("methods")
        if not isinstance(methods, list) or SAS_V1 not in methods[:MAX_LIST_ITEMS]:
            # Spec: no cancel (another device of ours may support it).
            return [Ignored(sender, REQUEST, "no method in common")]
        return self._begin(sender, txn, content, now_ms, room_id, start=False)

    def _begin(
        self,
        sender: str,
        txn: str,
        content: Mapping[str, object],
        now_ms: int,
        room_id: str | None,
        *,
        start: bool,
    ) -> list[VerificationUpdate]:
        event_type = START if start else REQUEST
        device_id = _id(content.get("from_device"))
        if device_id is None:
            return [Ignored(sender, event_type, "no valid from_device")]
        if len(self._outbox) >= MAX_OUTBOX // 2:
            # A flood (of strangers too) is not answered while earlier answers wait.
            return [Ignored(sender, event_type, "too many messages waiting to be sent")]
        if not self._allowed(sender):
            reason = "not allowed to verify"
            return [self._refuse(sender, device_id, txn, room_id, USER, reason, now_ms)]
        updates: list[VerificationUpdate] = []
        same_device = [
            f for f in self._flows.values() if (f.user_id, f.device_id) == (sender, device_id)
        ]
        if same_device:
            # Spec: a device starting several verifications at once has all of them
            # cancelled.
            reason = "several verifications from one device at once"
            updates.extend(self._cancel(f, UNEXPECTED_MESSAGE, reason, now_ms) for f in same_device)
            code = UNEXPECTED_MESSAGE
            updates.append(self._refuse(sender, device_id, txn, room_id, code, reason, now_ms))
            return updates
        per_user = sum(1 for f in self._flows.values() if f.user_id == sender)
        if len(self._flows) >= MAX_FLOWS or per_user >= MAX_FLOWS_PER_USER:
            reason = "too many verifications in progress"
            return [self._refuse(sender, device_id, txn, room_id, USER, reason, now_ms)]
        flow = _Flow(txn, sender, device_id, now_ms, now_ms, room_id=room_id)
        self._flows[txn] = flow
        updates.append(Requested(sender, device_id, txn))
        try:
            canonical = _canonical(content)
            if not start:
                self._send(flow, READY, {"from_device": self.device_id, "methods": [SAS_V1]})
            else:
                updates.extend(self._on_start(flow, content, canonical))
            flow.seen[event_type] = canonical
        except _Refused as refused:
            updates.append(self._cancel(flow, refused.code, refused.reason, now_ms))
        return updates

    def _on_start(
        self, flow: _Flow, content: Mapping[str, object], canonical: bytes
    ) -> list[VerificationUpdate]:
        if content.get("method") != SAS_V1:
            raise _Refused(UNKNOWN_METHOD, "only m.sas.v1 is supported")
        agreements = _str_list(content, "key_agreement_protocols")
        hashes = _str_list(content, "hashes")
        macs = _str_list(content, "message_authentication_codes")
        strings = _str_list(content, "short_authentication_string")
        if KEY_AGREEMENT not in agreements or HASH not in hashes:
            raise _Refused(UNKNOWN_METHOD, "no key agreement or hash in common")
        mac_method = next((m for m in MAC_PREFERENCE if m in macs), None)
        sas_methods = [m for m in SAS_METHODS if m in strings]
        if mac_method is None or not sas_methods:
            raise _Refused(UNKNOWN_METHOD, "no MAC or short authentication string in common")
        sas = vodozemac.Sas()
        # Spec: the hash of our ephemeral public key (unpadded base64) followed by the
        # canonical JSON of the start content, as it was received.
        commitment = hashlib.sha256(sas.public_key.to_base64().encode() + canonical).digest()
        flow.sas = sas
        flow.mac_method = mac_method
        flow.state = _ACCEPTED
        self._send(
            flow,
            ACCEPT,
            {
                "method": SAS_V1,
                "key_agreement_protocol": KEY_AGREEMENT,
                "hash": HASH,
                "message_authentication_code": mac_method,
                "short_authentication_string": sas_methods,
                "commitment": b64encode(commitment),
            },
        )
        return []

    # -- key / mac / done ----------------------------------------------------------------

    def _on_key(self, flow: _Flow, content: Mapping[str, object]) -> list[VerificationUpdate]:
        key = content.get("key")
        if not isinstance(key, str) or len(key) > 64:
            raise _Refused(INVALID_MESSAGE, "key is not a public key")
        assert flow.sas is not None
        try:
            their_key = vodozemac.Curve25519PublicKey.from_base64(key)
            our_key = flow.sas.public_key.to_base64()
            established = flow.sas.diffie_hellman(their_key)
        except ValueError:
            raise _Refused(INVALID_MESSAGE, "key is not a usable public key") from None
        flow.sas = None
        flow.established = established
        # Spec ("SAS HKDF calculation"): the starting side (them) first.
        info = (
            f"MATRIX_KEY_VERIFICATION_SAS|{flow.user_id}|{flow.device_id}|"
            f"{their_key.to_base64()}|{self.user_id}|{self.device_id}|{our_key}|"
            f"{flow.transaction_id}"
        )
        sas_bytes = established.bytes(info)
        flow.emoji = tuple(EMOJI[i] for i in sas_bytes.emoji_indices)
        d1, d2, d3 = sas_bytes.decimals
        flow.decimals = (d1, d2, d3)
        flow.state = _KEYS_EXCHANGED
        self._send(flow, KEY, {"key": our_key})
        # We cannot compare emoji: our MAC goes now, their MAC is their user's "match".
        self._send(flow, MAC, self._our_mac(flow, established))
        return [
            SasShown(flow.user_id, flow.device_id, flow.transaction_id, flow.emoji, flow.decimals)
        ]

    def _mac_info(self, sender: tuple[str, str], receiver: tuple[str, str], txn: str) -> str:
        return f"MATRIX_KEY_VERIFICATION_MAC{sender[0]}{sender[1]}{receiver[0]}{receiver[1]}{txn}"

    def _calculate(self, flow: _Flow, sas: vodozemac.EstablishedSas, text: str, info: str) -> str:
        if flow.mac_method == MAC_V1:
            return sas.calculate_mac_invalid_base64(text, info)
        return sas.calculate_mac(text, info)

    def _our_mac(self, flow: _Flow, sas: vodozemac.EstablishedSas) -> dict[str, Any]:
        info = self._mac_info(
            (self.user_id, self.device_id), (flow.user_id, flow.device_id), flow.transaction_id
        )
        keys = {f"ed25519:{self.device_id}": self.ed25519}
        master = self._master_key(self.user_id)
        if master:
            keys[f"ed25519:{master}"] = master
        mac = {
            key_id: self._calculate(flow, sas, key, info + key_id) for key_id, key in keys.items()
        }
        key_ids = ",".join(sorted(mac))
        return {"mac": mac, "keys": self._calculate(flow, sas, key_ids, info + "KEY_IDS")}

    def _mac_matches(self, flow: _Flow, text: str, info: str, tag: str) -> bool:
        sas = flow.established
        assert sas is not None
        if flow.mac_method == MAC_V1:
            expected = sas.calculate_mac_invalid_base64(text, info)
            return hmac.compare_digest(expected.encode(), tag.encode())
        try:
            sas.verify_mac(text, info, tag)
        except ValueError:
            return False
        return True

    def _on_mac(self, flow: _Flow, content: Mapping[str, object]) -> list[VerificationUpdate]:
        macs = content.get("mac")
        keys_mac = content.get("keys")
        if (
            not isinstance(macs, Mapping)
            or not 0 < len(macs) <= MAX_MACS
            or not isinstance(keys_mac, str)
            or len(keys_mac) > MAX_MAC_CHARS
            or not all(
                isinstance(k, str)
                and len(k) <= MAX_ID_CHARS
                and isinstance(v, str)
                and len(v) <= MAX_MAC_CHARS
                for k, v in macs.items()
            )
        ):
            raise _Refused(INVALID_MESSAGE, "mac or keys malformed")
        info = self._mac_info(
            (flow.user_id, flow.device_id), (self.user_id, self.device_id), flow.transaction_id
        )
        if not self._mac_matches(flow, ",".join(sorted(macs)), info + "KEY_IDS", keys_mac):
            raise _Refused(KEY_MISMATCH, "the MAC of the key list does not match")
        device_key_id = f"ed25519:{flow.device_id}"
        known_master = self._master_key(flow.user_id)
        device_ed25519: str | None = None
        master: str | None = None
        for key_id, tag in macs.items():
            if key_id == device_key_id:
                device_ed25519 = self._device_key(flow.user_id, flow.device_id)
                if device_ed25519 is None:
                    raise _Refused(KEY_MISMATCH, "the device's keys are not known here")
                if not self._mac_matches(flow, device_ed25519, info + key_id, tag):
                    raise _Refused(KEY_MISMATCH, "the device key's MAC does not match")
            elif known_master and key_id == f"ed25519:{known_master}":
                if not self._mac_matches(flow, known_master, info + key_id, tag):
                    raise _Refused(KEY_MISMATCH, "the master key's MAC does not match")
                master = known_master
            # Any other key is not one we know: not verified, not refused (as the spec's
            # "keys it knows" and matrix-rust-sdk).
        if device_ed25519 is None:
            raise _Refused(KEY_MISMATCH, "the MAC does not cover the device's key")
        flow.device_ed25519 = device_ed25519
        flow.master_key = master
        flow.state = _MAC_VERIFIED
        self._send(flow, DONE, {})
        return []

    def _done(self, flow: _Flow, now_ms: int) -> Verified:
        self._end(flow, now_ms)
        return Verified(
            flow.user_id,
            flow.device_id,
            flow.transaction_id,
            flow.emoji,
            flow.decimals,
            flow.device_ed25519,
            flow.master_key,
        )

    # -- cancel ------------------------------------------------------------------------

    def _on_cancel(
        self, sender: str, txn: str, content: Mapping[str, object], now_ms: int
    ) -> list[VerificationUpdate]:
        flow = self._flows.get(txn)
        if flow is None or flow.user_id != sender:
            return [Ignored(sender, CANCEL, "cancel of no flow of theirs")]
        self._end(flow, now_ms)
        code = _printable(content.get("code")) or "(none)"
        reason = _printable(content.get("reason"))
        # Never answered: a cancel answering a cancel is how error loops start.
        return [Cancelled(sender, flow.device_id, txn, code, reason, by_us=False)]

    def _cancel(self, flow: _Flow, code: str, reason: str, now_ms: int) -> Cancelled:
        self._end(flow, now_ms)
        self._send(flow, CANCEL, {"code": code, "reason": reason}, force=True)
        return Cancelled(flow.user_id, flow.device_id, flow.transaction_id, code, reason, True)

    def _refuse(
        self,
        user_id: str,
        device_id: str,
        txn: str,
        room_id: str | None,
        code: str,
        reason: str,
        now_ms: int,
    ) -> Cancelled:
        """Cancel a transaction that never became a flow (and remember it ended)."""
        self._remember_finished(txn, user_id, now_ms)
        self._queue(user_id, device_id, room_id, txn, CANCEL, {"code": code, "reason": reason})
        return Cancelled(user_id, device_id, txn, code, reason, by_us=True)

    def _tell(
        self, user_id: str, content: Mapping[str, object], txn: str, code: str, reason: str
    ) -> None:
        """A cancel to the device the message names (when it names one)."""
        device_id = _id(content.get("from_device"))
        if device_id is not None and self._allowed(user_id):
            self._queue(user_id, device_id, None, txn, CANCEL, {"code": code, "reason": reason})

    def _end(self, flow: _Flow, now_ms: int) -> None:
        self._flows.pop(flow.transaction_id, None)
        self._remember_finished(flow.transaction_id, flow.user_id, now_ms)

    def _remember_finished(self, txn: str, user_id: str, now_ms: int) -> None:
        self._finished[txn] = (user_id, now_ms)
        self._finished.move_to_end(txn)
        while len(self._finished) > MAX_FINISHED:
            self._finished.popitem(last=False)

    # -- sending -----------------------------------------------------------------------

    def _send(
        self, flow: _Flow, event_type: str, content: dict[str, Any], *, force: bool = False
    ) -> None:
        self._queue(
            flow.user_id,
            flow.device_id,
            flow.room_id,
            flow.transaction_id,
            event_type,
            content,
            force=force,
        )

    def _queue(
        self,
        user_id: str,
        device_id: str,
        room_id: str | None,
        flow_id: str,
        event_type: str,
        content: dict[str, Any],
        *,
        force: bool = False,
    ) -> None:
        """One message of flow ``flow_id``: to the device (with the transaction id) or,
        for a flow in a room, to the room (referring to the request event)."""
        # A full outbox drops the message (a flow's own cancels still go: ``force``).
        if len(self._outbox) >= MAX_OUTBOX and not force:
            return
        request: ToDeviceRequest | RoomMessageRequest
        if room_id is None:
            body = {**content, "transaction_id": flow_id}
            request = ToDeviceRequest(_new_request_id(), event_type, {user_id: {device_id: body}})
        else:
            body = {**content, "m.relates_to": {"rel_type": REFERENCE, "event_id": flow_id}}
            request = RoomMessageRequest(_new_request_id(), room_id, event_type, body)
        self._outbox[request.request_id] = request
        while len(self._outbox) > MAX_OUTBOX + MAX_FLOWS:
            self._outbox.popitem(last=False)

    def _deadline(self, flow: _Flow) -> int:
        overall = flow.created_ms + TIMEOUT_MS
        if flow.state == _READY_SENT:
            return overall
        return min(overall, flow.last_ms + STEP_TIMEOUT_MS)
