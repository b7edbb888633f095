"""Megolm group sessions (``m.megolm.v1.aes-sha2``): room keys in, room events decrypted;
one outbound session per room, rotated, encrypting the bot's own room events.

Sans-IO: plain dicts in and out, no clock (the caller passes ``now_ms``), no logging
(the caller logs refusals by their ``reason``, which never quotes plaintext or keys).

Public API (the contract with ``machine.py`` / ``state.py``)::

    ALGORITHM = "m.megolm.v1.aes-sha2"
    SEEN_LIMIT = 20_000                 # replay records kept (oldest dropped first)
    SESSIONS_PER_SENDER_LIMIT = 2_000   # inbound sessions kept per sender curve key
    MAX_PLAINTEXT_DEPTH = 64            # nesting a decrypted payload may have

    RotationSettings(period_ms=604_800_000, period_msgs=100)  # frozen; ValueError out of bounds
    RotationSettings.from_encryption_content(content) -> RotationSettings
        # rotation_period_ms / rotation_period_msgs of an m.room.encryption content,
        # clamped to [1 hour, 1 week] and [1, 10_000]; hostile values -> the defaults

    class GroupSessions(pickle_key: bytes)           # 32 bytes, else ValueError
        GroupSessions.restore(pickle_key, *, inbound=(), outbound=(), seen=())
            -> GroupSessions                          # raises errors.CryptoError
        # inbound (never raise)
        .add_room_key(content, *, sender_curve25519, sender_ed25519) -> RoomKeyOutcome
        .add_forwarded_room_key(content, *, forwarder_curve25519) -> RoomKeyOutcome
        .has_session(room_id, session_id, sender_curve25519=None) -> bool
        # raises only errors.MissingRoomKey and errors.DecryptionError
        .decrypt(room_id, event_id, origin_server_ts, content) -> MegolmDecrypted
        # outbound
        .prepare_outbound(room_id, *, now_ms, settings, devices, own_curve25519,
                          own_ed25519) -> OutboundPlan
        .mark_shared(room_id, session_id, devices) -> None
        .outbound(room_id) -> OutboundInfo | None
        .discard_outbound(room_id) -> bool
        .encrypt(room_id, event_type, content, own_device_id, own_curve25519)
            -> dict  (the m.room.encrypted content; ValueError if not prepared)
        # persistence
        .take_changes() -> MegolmChanges
        .records() -> tuple[list[InboundRecord], list[OutboundRecord], list[SeenRecord]]

    Values (frozen dataclasses): RoomKeyOutcome(stored, reason, room_id, session_id);
    MegolmDecrypted(event_type, content, room_id, event_id, session_id, message_index,
    sender_curve25519, sender_claimed_ed25519, trusted, device_id); OutboundPlan(room_id,
    session_id, created, rotated, to_share, room_key); OutboundInfo(room_id, session_id,
    created_ms, message_count, shared_with); records InboundRecord(room_id,
    sender_curve25519, session_id, sender_claimed_ed25519, trusted, first_known_index,
    pickle), OutboundRecord(room_id, session_id, created_ms, message_count, shared_with,
    pickle), SeenRecord(session_id, message_index, event_id, origin_server_ts);
    MegolmChanges(inbound, inbound_deleted, outbound, outbound_deleted, seen,
    seen_deleted), falsy when empty.

Receiving. Inbound sessions are keyed by (room_id, sender_curve25519, session_id); each
remembers the sender's claimed ed25519 key and whether it came from a direct
``m.room_key`` (``trusted``: the Olm channel it came through authenticates the sender's
curve key) or a forwarded key (``trusted`` False: sender and claimed ed25519 key are the
forwarder's word only, never enough to say who wrote a message). Two sessions with one
id are compared only when they are the same ratchet (one exported at the other's first
index matches it); then the lower first known index is kept, and the result is trusted
if either was (a trusted claimed ed25519 key is never replaced by a forwarder's). A key
that is *not* the same ratchet as a known one is refused. At most
``SESSIONS_PER_SENDER_LIMIT`` sessions are kept per sender curve key, the least recently
added or used dropped first (one Olm channel can carry any number of room keys; a bot
only needs the recent ones: a user's device in 300 rooms rotating weekly needs about 300).

``decrypt`` returns a :class:`MegolmDecrypted` carrying the sender curve key, the claimed
ed25519 key and ``trusted``: the machine must check them against the device cache of the
event's ``sender`` (and refuse untrusted ones) before the event counts as theirs. The
deprecated clear ``sender_key`` is used when it names a known session; missing or unknown,
the session is found by (room, session id) (MSC3700: receivers ignore it), preferring the
one trusted session when a forwarded key claims another sender. The result always names
the key the session was stored under, never the clear one.
Refusals: unknown session -> ``MissingRoomKey`` (retry when the key arrives); anything
else (malformed content or ciphertext, bad signature/MAC, index before the session's
first known index, plaintext that is not a JSON object with a string ``type``, an object
``content`` and ``room_id`` equal to the event's room, nesting deeper than
``MAX_PLAINTEXT_DEPTH`` (matrix_api's bound for plain events), or a (session_id,
message_index) already seen with another event id) -> ``DecryptionError(reason)``.
Lone surrogates in the plaintext become U+FFFD, as in plain events. The same event id
decrypting again is fine (a restart re-decrypts its inbox). The clear ``m.relates_to``
of the encrypted content, when there is one, replaces the payload's (the server
aggregates relations by the clear one).

Sending. One outbound ``GroupSession`` per room. Before each send the machine calls
``prepare_outbound`` with the devices that must be able to read the room now; it rotates
the session when it has sent ``rotation_period_msgs`` messages, is ``rotation_period_ms``
old (either way: a clock set back far also rotates), or was shared with a device that is
no longer among ``devices`` (member left, device removed); and it says which devices
still need the key (``OutboundPlan.to_share``, with ``room_key``, the ``m.room_key``
content to send them through Olm, at the session's current index; empty when nobody
needs it; it holds the session key, never log it). After the
to-device messages are sent, ``mark_shared``. Creating an outbound session also adds the
matching inbound session, so the bot decrypts its own messages as clients do.
``encrypt`` copies ``m.relates_to`` to the clear content (and leaves it in the payload),
adds the deprecated ``sender_key``/``device_id`` that older clients still read, and raises
``ValueError`` when no outbound session is prepared or it has reached the 10,000-message
ceiling (a caller bug, not input from outside).

Persistence. Every session is a frozen record of str/int/bool fields plus a vodozemac
pickle (encrypted by vodozemac with the 32-byte pickle key). ``take_changes`` returns
what changed since the last call (puts and deletes); pickles are taken then, so several
encryptions between two calls persist once. For restart safety the caller must persist
the outbound session's changes *before* sending what ``encrypt`` produced: a message
index reused after a crash is refused by every receiver as a replay. ``restore`` raises
``errors.CryptoError`` when a record cannot be unpickled (wrong pickle key or a corrupt
store: the caller must stop, not continue with an empty state); records over a bound are
dropped and reported as deletes by the next ``take_changes``.

Replay records: (session_id, message_index) -> event_id of the first event seen with it,
at most ``SEEN_LIMIT`` (20,000), oldest first out. The bot's durable inbox already handles
each event id once, so these records only need to catch a ciphertext re-sent as a *new*
event; that needs the old index still remembered, i.e. fewer than 20,000 encrypted
messages decrypted since. 20,000 records are about 2 MB in the store and bound what a
hostile sender can make us keep.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import vodozemac

from matrix_crypto.errors import CryptoError, DecryptionError, MissingRoomKey

__all__ = [
    "ALGORITHM",
    "DEFAULT_ROTATION_PERIOD_MS",
    "DEFAULT_ROTATION_PERIOD_MSGS",
    "MAX_PLAINTEXT_DEPTH",
    "SEEN_LIMIT",
    "SESSIONS_PER_SENDER_LIMIT",
    "GroupSessions",
    "InboundExport",
    "InboundRecord",
    "MegolmChanges",
    "MegolmDecrypted",
    "OutboundInfo",
    "OutboundPlan",
    "OutboundRecord",
    "RoomKeyOutcome",
    "RotationSettings",
    "SeenRecord",
]

ALGORITHM: Final = "m.megolm.v1.aes-sha2"

DEFAULT_ROTATION_PERIOD_MS: Final = 604_800_000  # one week (spec default)
DEFAULT_ROTATION_PERIOD_MSGS: Final = 100  # spec default
# A room's settings may shorten rotation but not make a key live longer than the
# defaults; an hour is the floor so a hostile setting cannot make us re-share a key to
# every device of the room every few milliseconds (messages: the spec's own floor is 1).
MIN_ROTATION_PERIOD_MS: Final = 3_600_000  # one hour
MAX_ROTATION_PERIOD_MS: Final = DEFAULT_ROTATION_PERIOD_MS
MIN_ROTATION_PERIOD_MSGS: Final = 1
MAX_ROTATION_PERIOD_MSGS: Final = 10_000

SEEN_LIMIT: Final = 20_000
SESSIONS_PER_SENDER_LIMIT: Final = 2_000

_PICKLE_KEY_BYTES: Final = 32
# A room event is at most 64 KiB; a plaintext larger than that did not come from one.
_MAX_CIPHERTEXT_CHARS: Final = 65_536
_MAX_ID_CHARS: Final = 255
# Plain room events nested deeper than this are refused by matrix_api's decoder
# (MAX_EVENT_DEPTH); a decrypted one gets no more room, so the bot's one event path
# never meets a deeper value.
MAX_PLAINTEXT_DEPTH: Final = 64
# A JSON escape of a UTF-16 surrogate; valid pairs decode to one character, so what
# remains a surrogate after json.loads is a lone one (not encodable as UTF-8).
_SURROGATE_ESCAPE: Final = re.compile(rb"\\u[dD][89a-fA-F]")
_LONE_SURROGATE: Final = re.compile("[\ud800-\udfff]")


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class RotationSettings:
    """When an outbound session must be replaced (see module docstring for bounds)."""

    period_ms: int = DEFAULT_ROTATION_PERIOD_MS
    period_msgs: int = DEFAULT_ROTATION_PERIOD_MSGS

    def __post_init__(self) -> None:
        # Built by hand (not from room state): out of bounds is a caller bug; zero
        # messages would rotate on every prepare.
        if not MIN_ROTATION_PERIOD_MS <= self.period_ms <= MAX_ROTATION_PERIOD_MS:
            raise ValueError("period_ms out of bounds")
        if not MIN_ROTATION_PERIOD_MSGS <= self.period_msgs <= MAX_ROTATION_PERIOD_MSGS:
            raise ValueError("period_msgs out of bounds")

    @classmethod
    def from_encryption_content(cls, content: object) -> RotationSettings:
        """Read an ``m.room.encryption`` state content. Values that are not positive
        integers (missing, strings, floats, booleans, zero, negative) give the default;
        integers outside the bounds are clamped to them. Never raises."""
        if not isinstance(content, Mapping):
            return cls()
        return cls(
            period_ms=_clamped(
                content.get("rotation_period_ms"),
                DEFAULT_ROTATION_PERIOD_MS,
                MIN_ROTATION_PERIOD_MS,
                MAX_ROTATION_PERIOD_MS,
            ),
            period_msgs=_clamped(
                content.get("rotation_period_msgs"),
                DEFAULT_ROTATION_PERIOD_MSGS,
                MIN_ROTATION_PERIOD_MSGS,
                MAX_ROTATION_PERIOD_MSGS,
            ),
        )


@dataclass(frozen=True, slots=True)
class RoomKeyOutcome:
    """What became of a room key. ``stored`` is True when the key is new or better than
    the one we had (then messages waiting for (room_id, session_id) can be retried);
    ``reason`` says why it was refused or ignored (short, safe to log). ``room_id`` and
    ``session_id`` are empty strings when the content did not carry usable ones."""

    stored: bool
    reason: str
    room_id: str
    session_id: str


@dataclass(frozen=True, slots=True)
class MegolmDecrypted:
    """A decrypted room event. ``trusted`` is False when the session came from a
    forwarded key: then ``sender_curve25519``/``sender_claimed_ed25519`` are someone's
    word only. ``device_id`` is the (deprecated, optional) clear ``device_id`` of the
    encrypted content, or None."""

    event_type: str
    content: dict[str, Any] = field(repr=False)  # plaintext: kept out of logs
    room_id: str
    event_id: str
    session_id: str
    message_index: int
    sender_curve25519: str
    sender_claimed_ed25519: str
    trusted: bool
    device_id: str | None


@dataclass(frozen=True, slots=True)
class OutboundInfo:
    """The current outbound session of a room (no key material)."""

    room_id: str
    session_id: str
    created_ms: int
    message_count: int
    shared_with: frozenset[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class OutboundPlan:
    """What ``prepare_outbound`` decided. ``rotated`` is the reason the previous session
    was replaced (``"messages"``, ``"age"``, ``"device removed"``) or None; ``created``
    is True when the session is new (first one of the room, or a rotation).
    ``to_share`` lists the (user_id, device_id) that still need ``room_key`` (the
    ``m.room_key`` content, which holds the session key: never log it; an empty dict
    when ``to_share`` is empty)."""

    room_id: str
    session_id: str
    created: bool
    rotated: str | None
    to_share: tuple[tuple[str, str], ...]
    room_key: dict[str, str] = field(repr=False)  # holds the session key


@dataclass(frozen=True, slots=True)
class InboundRecord:
    """A persisted inbound session; key (room_id, sender_curve25519, session_id)."""

    room_id: str
    sender_curve25519: str
    session_id: str
    sender_claimed_ed25519: str
    trusted: bool
    first_known_index: int
    pickle: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class InboundExport:
    """An inbound session as a key backup carries it: the session key exported at its
    first known index, and where it came from (``trusted``: a direct m.room_key)."""

    room_id: str
    session_id: str
    sender_curve25519: str
    sender_claimed_ed25519: str
    trusted: bool
    first_known_index: int
    session_key: str = field(repr=False)  # key material: never in a log line


@dataclass(frozen=True, slots=True)
class OutboundRecord:
    """A persisted outbound session; key room_id (one per room). ``shared_with`` is a
    sorted tuple of (user_id, device_id)."""

    room_id: str
    session_id: str
    created_ms: int
    message_count: int
    shared_with: tuple[tuple[str, str], ...]
    pickle: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class SeenRecord:
    """A persisted replay record; key (session_id, message_index)."""

    session_id: str
    message_index: int
    event_id: str
    origin_server_ts: int


@dataclass(frozen=True, slots=True)
class MegolmChanges:
    """What to persist since the last ``take_changes``: puts replace by key."""

    inbound: tuple[InboundRecord, ...] = ()
    # (room_id, sender_curve25519, session_id) of sessions dropped over the bound
    inbound_deleted: tuple[tuple[str, str, str], ...] = ()
    outbound: tuple[OutboundRecord, ...] = ()
    outbound_deleted: tuple[str, ...] = ()  # room ids
    seen: tuple[SeenRecord, ...] = ()
    seen_deleted: tuple[tuple[str, int], ...] = ()  # (session_id, message_index)

    def __bool__(self) -> bool:
        return bool(
            self.inbound
            or self.inbound_deleted
            or self.outbound
            or self.outbound_deleted
            or self.seen
            or self.seen_deleted
        )


# ------------------------------------------------------------------------ internals

_InboundKey = tuple[str, str, str]  # (room_id, sender_curve25519, session_id)


@dataclass(slots=True)
class _Inbound:
    session: vodozemac.InboundGroupSession
    room_id: str
    sender_curve25519: str
    sender_claimed_ed25519: str
    trusted: bool


@dataclass(slots=True)
class _Outbound:
    session: vodozemac.GroupSession
    room_id: str
    created_ms: int
    shared_with: set[tuple[str, str]] = field(default_factory=set)


def _clamped(value: object, default: int, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        return default
    return max(low, min(high, value))


def _short_str(value: object) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= _MAX_ID_CHARS:
        return value
    return None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-JSON constant {name}")


class GroupSessions:
    """All Megolm state of one device: inbound sessions, one outbound session per room,
    replay records, and what changed since ``take_changes``. See the module docstring."""

    def __init__(self, pickle_key: bytes) -> None:
        if not isinstance(pickle_key, bytes) or len(pickle_key) != _PICKLE_KEY_BYTES:
            raise ValueError("the pickle key must be 32 bytes")
        self._pickle_key = pickle_key
        self._inbound: dict[_InboundKey, _Inbound] = {}
        # (room_id, session_id) -> sender keys, for events without the deprecated sender_key
        self._by_room_session: dict[tuple[str, str], set[str]] = {}
        self._outbound: dict[str, _Outbound] = {}
        self._seen: dict[tuple[str, int], SeenRecord] = {}  # insertion order = age
        # Per sender key, its sessions least recently added/used first (the bound's order).
        self._by_sender: dict[str, dict[_InboundKey, None]] = {}
        self._dirty_inbound: set[_InboundKey] = set()
        self._deleted_inbound: set[_InboundKey] = set()
        self._dirty_outbound: set[str] = set()
        self._deleted_outbound: set[str] = set()
        self._dirty_seen: set[tuple[str, int]] = set()
        self._deleted_seen: set[tuple[str, int]] = set()

    # ------------------------------------------------------------------ persistence

    @classmethod
    def restore(
        cls,
        pickle_key: bytes,
        *,
        inbound: Iterable[InboundRecord] = (),
        outbound: Iterable[OutboundRecord] = (),
        seen: Iterable[SeenRecord] = (),
    ) -> GroupSessions:
        """Rebuild from persisted records (nothing is marked changed). Raises
        ``CryptoError`` when a pickle does not open with this key or does not match its
        record. ``seen`` is ordered by origin_server_ts (the store need not keep an
        order); over SEEN_LIMIT the oldest are dropped and reported as deletes."""
        self = cls(pickle_key)
        for rec in inbound:
            try:
                session = vodozemac.InboundGroupSession.from_pickle(rec.pickle, pickle_key)
            except ValueError as exc:
                raise CryptoError(
                    f"inbound group session {rec.session_id} cannot be restored "
                    "(wrong pickle key or corrupt store)"
                ) from exc
            if session.session_id != rec.session_id:
                raise CryptoError(f"inbound group session {rec.session_id} does not match")
            self._put_inbound(
                _Inbound(
                    session=session,
                    room_id=rec.room_id,
                    sender_curve25519=rec.sender_curve25519,
                    sender_claimed_ed25519=rec.sender_claimed_ed25519,
                    trusted=bool(rec.trusted),  # a store may hand back 0/1
                ),
                dirty=False,
            )
        for out in outbound:
            try:
                group = vodozemac.GroupSession.from_pickle(out.pickle, pickle_key)
            except ValueError as exc:
                raise CryptoError(
                    f"outbound group session of {out.room_id} cannot be restored "
                    "(wrong pickle key or corrupt store)"
                ) from exc
            if group.session_id != out.session_id:
                raise CryptoError(f"outbound group session of {out.room_id} does not match")
            self._outbound[out.room_id] = _Outbound(
                session=group,
                room_id=out.room_id,
                created_ms=out.created_ms,
                shared_with={(u, d) for u, d in out.shared_with},
            )
        # Oldest event first whatever order the store returns them in (sort is stable).
        for s in sorted(seen, key=lambda s: s.origin_server_ts):
            self._seen.pop((s.session_id, s.message_index), None)
            self._seen[(s.session_id, s.message_index)] = s
        while len(self._seen) > SEEN_LIMIT:
            # Over the bound (an older build, or a lower limit): dropped here and in the store.
            key = next(iter(self._seen))
            del self._seen[key]
            self._deleted_seen.add(key)
        return self

    def take_changes(self) -> MegolmChanges:
        """Records to put and keys to delete since the last call; then forgets them."""
        inbound = tuple(self._inbound_record(self._inbound[k]) for k in sorted(self._dirty_inbound))
        outbound = tuple(
            self._outbound_record(self._outbound[r])
            for r in sorted(self._dirty_outbound)
            if r in self._outbound
        )
        changes = MegolmChanges(
            inbound=inbound,
            # Dropped then added again: a put, not a delete (no set of everything built).
            inbound_deleted=tuple(
                k for k in sorted(self._deleted_inbound) if k not in self._inbound
            ),
            outbound=outbound,
            outbound_deleted=tuple(
                r for r in sorted(self._deleted_outbound) if r not in self._outbound
            ),
            seen=tuple(self._seen[k] for k in sorted(self._dirty_seen) if k in self._seen),
            seen_deleted=tuple(k for k in sorted(self._deleted_seen) if k not in self._seen),
        )
        self._dirty_inbound.clear()
        self._deleted_inbound.clear()
        self._dirty_outbound.clear()
        self._deleted_outbound.clear()
        self._dirty_seen.clear()
        self._deleted_seen.clear()
        return changes

    def records(self) -> tuple[list[InboundRecord], list[OutboundRecord], list[SeenRecord]]:
        """Every record (a full snapshot, e.g. for a first save or a test)."""
        return (
            [self._inbound_record(i) for i in self._inbound.values()],
            [self._outbound_record(o) for o in self._outbound.values()],
            list(self._seen.values()),
        )

    def _inbound_record(self, inbound: _Inbound) -> InboundRecord:
        return InboundRecord(
            room_id=inbound.room_id,
            sender_curve25519=inbound.sender_curve25519,
            session_id=inbound.session.session_id,
            sender_claimed_ed25519=inbound.sender_claimed_ed25519,
            trusted=inbound.trusted,
            first_known_index=inbound.session.first_known_index,
            pickle=inbound.session.pickle(self._pickle_key),
        )

    def _outbound_record(self, outbound: _Outbound) -> OutboundRecord:
        return OutboundRecord(
            room_id=outbound.room_id,
            session_id=outbound.session.session_id,
            created_ms=outbound.created_ms,
            message_count=outbound.session.message_index,
            shared_with=tuple(sorted(outbound.shared_with)),
            pickle=outbound.session.pickle(self._pickle_key),
        )

    # ---------------------------------------------------------------------- inbound

    def _put_inbound(self, inbound: _Inbound, *, dirty: bool = True) -> None:
        key = (inbound.room_id, inbound.sender_curve25519, inbound.session.session_id)
        self._inbound[key] = inbound
        self._by_room_session.setdefault((key[0], key[2]), set()).add(key[1])
        self._touch(key)
        if dirty:
            self._dirty_inbound.add(key)
            self._deleted_inbound.discard(key)
        by_sender = self._by_sender[key[1]]
        while len(by_sender) > SESSIONS_PER_SENDER_LIMIT:
            self._drop_inbound(next(iter(by_sender)))

    def _touch(self, key: _InboundKey) -> None:
        """Mark a session most recently used (last to be dropped over the bound)."""
        by_sender = self._by_sender.setdefault(key[1], {})
        by_sender.pop(key, None)
        by_sender[key] = None

    def _drop_inbound(self, key: _InboundKey) -> None:
        del self._inbound[key]
        senders = self._by_room_session[(key[0], key[2])]
        senders.discard(key[1])
        if not senders:
            del self._by_room_session[(key[0], key[2])]
        by_sender = self._by_sender[key[1]]
        del by_sender[key]
        if not by_sender:
            del self._by_sender[key[1]]
        self._dirty_inbound.discard(key)
        self._deleted_inbound.add(key)

    def inbound_keys(self) -> list[tuple[str, str, str]]:
        """Every inbound session's key: (room_id, sender_curve25519, session_id)."""
        return list(self._inbound)

    def backup_states(self) -> dict[tuple[str, str, str], tuple[int, bool]]:
        """Each inbound session's (first known index, trusted), by key: what decides
        whether a backed-up copy is still as good as the session (no export)."""
        return {
            key: (inbound.session.first_known_index, inbound.trusted)
            for key, inbound in self._inbound.items()
        }

    def export_inbound(
        self, room_id: str, sender_curve25519: str, session_id: str
    ) -> InboundExport | None:
        """The session for a key backup; None when it is not known. Never raises: a
        session exports at its own first known index."""
        inbound = self._inbound.get((room_id, sender_curve25519, session_id))
        if inbound is None:
            return None
        first = inbound.session.first_known_index
        exported = inbound.session.export_at(first)
        if exported is None:  # not for a session's own first index; typed as possible
            return None
        return InboundExport(
            room_id=inbound.room_id,
            session_id=session_id,
            sender_curve25519=inbound.sender_curve25519,
            sender_claimed_ed25519=inbound.sender_claimed_ed25519,
            trusted=inbound.trusted,
            first_known_index=first,
            session_key=exported.to_base64(),
        )

    def has_session(
        self, room_id: str, session_id: str, sender_curve25519: str | None = None
    ) -> bool:
        """Whether an inbound session for (room, [sender key,] session id) is known."""
        if sender_curve25519 is None:
            return bool(self._by_room_session.get((room_id, session_id)))
        return (room_id, sender_curve25519, session_id) in self._inbound

    def add_room_key(
        self, content: object, *, sender_curve25519: str, sender_ed25519: str
    ) -> RoomKeyOutcome:
        """Add the session of a decrypted ``m.room_key`` content. ``sender_curve25519``
        is the curve key of the Olm session it came through, ``sender_ed25519`` the
        payload's ``keys.ed25519`` (both checked by the caller). Never raises."""
        if not isinstance(content, Mapping):
            return RoomKeyOutcome(False, "room key content is not an object", "", "")
        room_id = _short_str(content.get("room_id"))
        session_id = _short_str(content.get("session_id"))
        if room_id is None or session_id is None:
            return RoomKeyOutcome(False, "room key without room_id or session_id", "", "")
        if content.get("algorithm") != ALGORITHM:
            return RoomKeyOutcome(False, "room key for another algorithm", room_id, session_id)
        session_key = content.get("session_key")
        if not isinstance(session_key, str) or len(session_key) > _MAX_CIPHERTEXT_CHARS:
            return RoomKeyOutcome(False, "room key without a session_key", room_id, session_id)
        if _short_str(sender_curve25519) is None or _short_str(sender_ed25519) is None:
            return RoomKeyOutcome(False, "room key without sender keys", room_id, session_id)
        try:
            session = vodozemac.InboundGroupSession(vodozemac.SessionKey(session_key))
        except ValueError:
            return RoomKeyOutcome(False, "malformed session_key", room_id, session_id)
        if session.session_id != session_id:
            return RoomKeyOutcome(
                False, "session_key does not match session_id", room_id, session_id
            )
        return self._offer(
            _Inbound(
                session=session,
                room_id=room_id,
                sender_curve25519=sender_curve25519,
                sender_claimed_ed25519=sender_ed25519,
                trusted=True,
            )
        )

    def add_forwarded_room_key(
        self, content: object, *, forwarder_curve25519: str
    ) -> RoomKeyOutcome:
        """Add the session of a decrypted ``m.forwarded_room_key`` content. Whether to
        accept forwarded keys at all (from whom) is the caller's decision; the session is
        stored untrusted (``MegolmDecrypted.trusted`` False) unless it is the same ratchet
        as a trusted one we already have. ``forwarder_curve25519`` is the curve key of
        the Olm session it came through (checked present; who may forward is the
        caller's rule). Never raises."""
        if _short_str(forwarder_curve25519) is None:
            return RoomKeyOutcome(False, "forwarded key missing fields", "", "")
        return self._import_exported(content, trusted=False)

    def add_backed_up_room_key(self, content: object, *, authenticated: bool) -> RoomKeyOutcome:
        """Add a session restored from the key backup (``BackedUpSession
        .forwarded_room_key_content``). Trusted only when ``authenticated``: the entry
        carried the backup's own MAC, so the bot itself had it from its owner (see
        `matrix_crypto.backup`); else like a forwarded key. Never raises."""
        return self._import_exported(content, trusted=authenticated)

    def _import_exported(self, content: object, *, trusted: bool) -> RoomKeyOutcome:
        if not isinstance(content, Mapping):
            return RoomKeyOutcome(False, "forwarded key content is not an object", "", "")
        room_id = _short_str(content.get("room_id"))
        session_id = _short_str(content.get("session_id"))
        if room_id is None or session_id is None:
            return RoomKeyOutcome(False, "forwarded key without room_id or session_id", "", "")
        if content.get("algorithm") != ALGORITHM:
            return RoomKeyOutcome(False, "forwarded key for another algorithm", room_id, session_id)
        sender_key = _short_str(content.get("sender_key"))
        claimed = _short_str(content.get("sender_claimed_ed25519_key"))
        session_key = content.get("session_key")
        if (
            sender_key is None
            or claimed is None
            or not isinstance(session_key, str)
            or len(session_key) > _MAX_CIPHERTEXT_CHARS
        ):
            return RoomKeyOutcome(False, "forwarded key missing fields", room_id, session_id)
        try:
            session = vodozemac.InboundGroupSession.import_session(
                vodozemac.ExportedSessionKey(session_key)
            )
        except ValueError:
            return RoomKeyOutcome(False, "malformed forwarded session_key", room_id, session_id)
        if session.session_id != session_id:
            return RoomKeyOutcome(
                False, "session_key does not match session_id", room_id, session_id
            )
        return self._offer(
            _Inbound(
                session=session,
                room_id=room_id,
                sender_curve25519=sender_key,
                sender_claimed_ed25519=claimed,
                trusted=trusted,
            )
        )

    def _offer(self, new: _Inbound) -> RoomKeyOutcome:
        session_id = new.session.session_id
        key = (new.room_id, new.sender_curve25519, session_id)
        old = self._inbound.get(key)
        if old is None:
            self._put_inbound(new)
            return RoomKeyOutcome(True, "new session", new.room_id, session_id)
        if not _same_ratchet(old.session, new.session):
            return RoomKeyOutcome(
                False, "conflicts with a known session of that id", new.room_id, session_id
            )
        better = new.session.first_known_index < old.session.first_known_index
        gains_trust = new.trusted and not old.trusted
        if not better and not gains_trust:
            return RoomKeyOutcome(False, "already known", new.room_id, session_id)
        merged = _Inbound(
            session=new.session if better else old.session,
            room_id=new.room_id,
            sender_curve25519=new.sender_curve25519,
            # A trusted claim is never overwritten by another sender's word.
            sender_claimed_ed25519=(
                new.sender_claimed_ed25519 if gains_trust else old.sender_claimed_ed25519
            ),
            trusted=old.trusted or new.trusted,
        )
        self._put_inbound(merged)
        return RoomKeyOutcome(
            True, "earlier index" if better else "now trusted", new.room_id, session_id
        )

    def decrypt(
        self, room_id: str, event_id: str, origin_server_ts: int, content: object
    ) -> MegolmDecrypted:
        """Decrypt an ``m.room.encrypted`` content of ``room_id``'s event ``event_id``.
        Raises ``MissingRoomKey`` (no session yet: retry when its key arrives) or
        ``DecryptionError`` (never decryptable); nothing else."""
        if _short_str(room_id) is None or _short_str(event_id) is None:
            raise DecryptionError("event without room_id or event_id")
        if not isinstance(content, Mapping):
            raise DecryptionError("encrypted content is not an object")
        if content.get("algorithm") != ALGORITHM:
            raise DecryptionError("not a megolm event")
        session_id = _short_str(content.get("session_id"))
        ciphertext = content.get("ciphertext")
        if session_id is None:
            raise DecryptionError("missing session_id")
        if not isinstance(ciphertext, str) or not 0 < len(ciphertext) <= _MAX_CIPHERTEXT_CHARS:
            raise DecryptionError("missing ciphertext")
        sender_key: object = content.get("sender_key")
        if sender_key is not None and _short_str(sender_key) is None:
            raise DecryptionError("malformed sender_key")
        device_id_field = content.get("device_id")
        device_id = device_id_field if isinstance(device_id_field, str) else None
        try:
            message = vodozemac.MegolmMessage.from_base64(ciphertext)
        except ValueError:
            raise DecryptionError("malformed ciphertext") from None
        # After parsing: garbage is refused at once, not retried as a missing key.
        inbound = self._find(room_id, session_id, sender_key)
        if message.message_index() < inbound.session.first_known_index:
            # Sent before the key we hold starts; only a forwarded earlier key would help.
            raise DecryptionError("message index before the known session start")
        try:
            decrypted = inbound.session.decrypt(message)
        except ValueError:
            raise DecryptionError("bad signature or MAC") from None
        payload = _parse_payload(decrypted.plaintext)
        if payload.get("room_id") != room_id:
            raise DecryptionError("plaintext is for another room")
        event_type = payload.get("type")
        inner = payload.get("content")
        if not isinstance(event_type, str) or not isinstance(inner, dict):
            raise DecryptionError("plaintext without type or content")
        index = decrypted.message_index
        self._check_replay(session_id, index, event_id, origin_server_ts)
        self._touch((inbound.room_id, inbound.sender_curve25519, session_id))
        relates_to = content.get("m.relates_to")
        if isinstance(relates_to, Mapping):
            inner["m.relates_to"] = dict(relates_to)
        return MegolmDecrypted(
            event_type=event_type,
            content=inner,
            room_id=room_id,
            event_id=event_id,
            session_id=session_id,
            message_index=index,
            sender_curve25519=inbound.sender_curve25519,
            sender_claimed_ed25519=inbound.sender_claimed_ed25519,
            trusted=inbound.trusted,
            device_id=device_id,
        )

    def _find(self, room_id: str, session_id: str, sender_key: object) -> _Inbound:
        if isinstance(sender_key, str):
            found = self._inbound.get((room_id, sender_key, session_id))
            if found is not None:
                return found
        # sender_key is deprecated (optional since spec v1.3, to be ignored by receivers:
        # MSC3700), so a missing or unknown one falls back to the session id. Safe: the
        # result names the sender key the session was stored under, never the clear one.
        candidates = [
            self._inbound[(room_id, sender, session_id)]
            for sender in self._by_room_session.get((room_id, session_id), ())
        ]
        if not candidates:
            raise MissingRoomKey(room_id, session_id)
        if len(candidates) == 1:
            return candidates[0]
        # A forwarded key naming another sender must not make the real one unusable.
        trusted = [c for c in candidates if c.trusted]
        if len(trusted) == 1:
            return trusted[0]
        raise DecryptionError("session id claimed by several senders")

    def _check_replay(
        self, session_id: str, index: int, event_id: str, origin_server_ts: int
    ) -> None:
        key = (session_id, index)
        seen = self._seen.get(key)
        if seen is not None:
            if seen.event_id != event_id:
                raise DecryptionError("message index replayed by another event")
            return
        ts = (
            origin_server_ts
            if isinstance(origin_server_ts, int) and not isinstance(origin_server_ts, bool)
            else 0
        )
        self._seen[key] = SeenRecord(session_id, index, event_id, ts)
        self._dirty_seen.add(key)
        self._deleted_seen.discard(key)
        while len(self._seen) > SEEN_LIMIT:
            oldest = next(iter(self._seen))
            del self._seen[oldest]
            self._dirty_seen.discard(oldest)
            self._deleted_seen.add(oldest)

    # --------------------------------------------------------------------- outbound

    def outbound(self, room_id: str) -> OutboundInfo | None:
        """The room's current outbound session, if any."""
        out = self._outbound.get(room_id)
        if out is None:
            return None
        return OutboundInfo(
            room_id=room_id,
            session_id=out.session.session_id,
            created_ms=out.created_ms,
            message_count=out.session.message_index,
            shared_with=frozenset(out.shared_with),
        )

    def discard_outbound(self, room_id: str) -> bool:
        """Forget the room's outbound session (the next prepare creates a new one), e.g.
        when the room's encryption settings changed. Returns whether there was one."""
        if self._outbound.pop(room_id, None) is None:
            return False
        self._dirty_outbound.discard(room_id)
        self._deleted_outbound.add(room_id)
        return True

    def prepare_outbound(
        self,
        room_id: str,
        *,
        now_ms: int,
        settings: RotationSettings,
        devices: Collection[tuple[str, str]],
        own_curve25519: str,
        own_ed25519: str,
    ) -> OutboundPlan:
        """Make sure the room has a usable outbound session for ``devices`` (every
        (user_id, device_id) that must read the next message, the bot's own other devices
        included if wanted) and say who still needs its key."""
        wanted = set(devices)
        out = self._outbound.get(room_id)
        rotated: str | None = None
        if out is not None:
            rotated = _rotation_reason(out, now_ms, settings, wanted)
            if rotated is not None:
                self.discard_outbound(room_id)
                out = None
        created = out is None
        if out is None:
            out = _Outbound(session=vodozemac.GroupSession(), room_id=room_id, created_ms=now_ms)
            self._outbound[room_id] = out
            self._deleted_outbound.discard(room_id)
            self._dirty_outbound.add(room_id)
            # So the bot can decrypt its own messages, as clients do.
            self._put_inbound(
                _Inbound(
                    session=vodozemac.InboundGroupSession(out.session.session_key),
                    room_id=room_id,
                    sender_curve25519=own_curve25519,
                    sender_claimed_ed25519=own_ed25519,
                    trusted=True,
                )
            )
        to_share = tuple(sorted(wanted - out.shared_with))
        return OutboundPlan(
            room_id=room_id,
            session_id=out.session.session_id,
            created=created,
            rotated=rotated,
            to_share=to_share,
            # Exporting the key signs it: only when someone needs it.
            room_key=self._room_key(out) if to_share else {},
        )

    def _room_key(self, out: _Outbound) -> dict[str, str]:
        return {
            "algorithm": ALGORITHM,
            "room_id": out.room_id,
            "session_id": out.session.session_id,
            "session_key": out.session.session_key.to_base64(),
        }

    def mark_shared(
        self, room_id: str, session_id: str, devices: Iterable[tuple[str, str]]
    ) -> None:
        """Record that the key of ``session_id`` reached ``devices`` (after the
        to-device request succeeded). Ignored when the room's session has changed since."""
        out = self._outbound.get(room_id)
        if out is None or out.session.session_id != session_id:
            return
        before = len(out.shared_with)
        out.shared_with.update(devices)
        if len(out.shared_with) != before:
            self._dirty_outbound.add(room_id)

    def encrypt(
        self,
        room_id: str,
        event_type: str,
        content: Mapping[str, Any],
        own_device_id: str,
        own_curve25519: str,
    ) -> dict[str, Any]:
        """The ``m.room.encrypted`` content for an event of ``event_type`` with
        ``content`` in ``room_id``; ``m.relates_to`` is copied to the clear content.
        Raises ``ValueError`` without a prepared session or when it has sent its maximum
        number of messages (call ``prepare_outbound`` first)."""
        out = self._outbound.get(room_id)
        if out is None:
            raise ValueError("no outbound group session for the room: prepare it first")
        if out.session.message_index >= MAX_ROTATION_PERIOD_MSGS:
            raise ValueError("outbound group session used up: prepare it again")
        text = json.dumps(
            {"type": event_type, "content": content, "room_id": room_id},
            ensure_ascii=False,
            separators=(",", ":"),
            allow_nan=False,
        )
        try:
            plaintext = text.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate (from a model's answer, say) would fail every receiver.
            plaintext = _LONE_SURROGATE.sub("\ufffd", text).encode("utf-8")
        message = out.session.encrypt(plaintext)
        self._dirty_outbound.add(room_id)
        encrypted: dict[str, Any] = {
            "algorithm": ALGORITHM,
            "sender_key": own_curve25519,
            "ciphertext": message.to_base64(),
            "session_id": out.session.session_id,
            "device_id": own_device_id,
        }
        relates_to = content.get("m.relates_to")
        if isinstance(relates_to, Mapping):
            encrypted["m.relates_to"] = dict(relates_to)
        return encrypted


def _rotation_reason(
    out: _Outbound, now_ms: int, settings: RotationSettings, wanted: set[tuple[str, str]]
) -> str | None:
    if out.session.message_index >= settings.period_msgs:
        return "messages"
    # Either way: a clock set right after running ahead must not keep a key alive.
    if abs(now_ms - out.created_ms) >= settings.period_ms:
        return "age"
    if out.shared_with - wanted:
        return "device removed"
    return None


def _same_ratchet(a: vodozemac.InboundGroupSession, b: vodozemac.InboundGroupSession) -> bool:
    """Whether two sessions with one id are the same Megolm ratchet (one can be advanced
    to the other): a forged key reusing a session id is not."""
    index = max(a.first_known_index, b.first_known_index)
    ea, eb = a.export_at(index), b.export_at(index)
    return ea is not None and eb is not None and ea.to_base64() == eb.to_base64()


def _parse_payload(plaintext: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(plaintext.decode("utf-8"), parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        # ValueError covers bad UTF-8 and bad JSON; RecursionError deeply nested arrays.
        raise DecryptionError("plaintext is not JSON") from None
    if not isinstance(payload, dict):
        raise DecryptionError("plaintext is not a JSON object")
    # Cheap byte checks first: most payloads have neither, and skip the walk.
    deep = plaintext.count(b"{") + plaintext.count(b"[") > MAX_PLAINTEXT_DEPTH
    if deep or _SURROGATE_ESCAPE.search(plaintext):
        _mend(payload)
    return payload


def _mend(root: dict[str, Any]) -> None:
    """Refuse nesting deeper than MAX_PLAINTEXT_DEPTH and replace lone surrogates by
    U+FFFD in place (as matrix_api mends plain events), without recursion."""
    stack: list[tuple[dict[str, Any] | list[Any], int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_PLAINTEXT_DEPTH:
            raise DecryptionError("plaintext nested too deep")
        if isinstance(node, dict):
            for key in list(node):
                value = node[key]
                if _LONE_SURROGATE.search(key):
                    del node[key]
                    key = _LONE_SURROGATE.sub("\ufffd", key)
                    node[key] = value
                if isinstance(value, str) and _LONE_SURROGATE.search(value):
                    node[key] = _LONE_SURROGATE.sub("\ufffd", value)
                elif isinstance(value, dict | list):
                    stack.append((value, depth + 1))
        else:
            for index, value in enumerate(node):
                if isinstance(value, str) and _LONE_SURROGATE.search(value):
                    node[index] = _LONE_SURROGATE.sub("\ufffd", value)
                elif isinstance(value, dict | list):
                    stack.append((value, depth + 1))
