"""`OlmMachine`: the one object the bot talks to (the shape of matrix-rust-sdk's).

Sans-IO and synchronous. Sync input goes in (`receive_sync`), the requests the server
must see come out (`outgoing_requests`, `share_room_key`) and their answers go back in
(`mark_request_sent`); room events are decrypted (`decrypt_room_event`) and encrypted
(`encrypt_room_event`); what must survive a restart comes out of `take_changes`.

Persistence rules for the caller:

* `take_changes` after `receive_sync` belongs in the transaction that stores that
  batch's sync token (to-device events are re-delivered until the token moves; a
  re-delivered pre-key message is answered from memory in this process, and after a
  restart the stored state predates it and decrypts it afresh).
* Persist `take_changes` before sending any request: a keys upload carries one-time
  keys that must not be regenerated under the same ids, and a to-device room key share
  has moved Olm ratchets (a resent, re-encrypted message would reuse a message key).
* Persist before sending what `encrypt_room_event` returned (the Megolm index moved).

Nothing from outside raises out of the machine except `decrypt_room_event`'s
documented `MissingRoomKey` / `DecryptionError` (and its subclass `UnverifiedSender`).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import vodozemac

from matrix_crypto import olm
from matrix_crypto.backup import BackedUpSession, RoomKeyToBackUp
from matrix_crypto.devices import Device, DeviceTracker, parse_keys_query
from matrix_crypto.errors import CryptoError, DecryptionError, UnverifiedSender
from matrix_crypto.identity import (
    MEGOLM_ALGORITHM,
    OLM_ALGORITHM,
    SIGNED_CURVE25519,
    Identity,
    check_pickle_key,
)
from matrix_crypto.megolm import GroupSessions, RotationSettings
from matrix_crypto.state import (
    AccountRecord,
    CryptoChanges,
    CryptoState,
    DeviceRecord,
    OlmSessionRecord,
    TrackedUserRecord,
)

__all__ = [
    "DecryptedEvent",
    "KeysClaimRequest",
    "KeysQueryRequest",
    "KeysUploadRequest",
    "OlmMachine",
    "OutgoingRequest",
    "ToDeviceRequest",
    "ToDeviceResult",
]

# Users per /keys/query and devices per /keys/claim or /sendToDevice request.
MAX_USERS_PER_QUERY = 1000
MAX_DEVICES_PER_CLAIM = 1000
MAX_MESSAGES_PER_TO_DEVICE = 100
# A user whose server did not answer a query, or a device without a one-time key, is
# asked again after this long (not at every sync or every send).
RETRY_AFTER_S = 300.0
# Unanswered to-device shares remembered (the oldest are dropped: the next
# share_room_key encrypts the key again for devices that still lack it).
MAX_PENDING_SHARES = 1000
# A device whose Olm messages we cannot decrypt gets a new session from us (and an
# m.dummy through it, so it switches), at most this often; at most this many waiting.
UNWEDGE_AFTER_S = 3600.0
MAX_WEDGED = 1000
QUERY_TIMEOUT_MS = 10_000

ENCRYPTED = "m.room.encrypted"
ROOM_KEY = "m.room_key"
DUMMY = "m.dummy"
FORWARDED_ROOM_KEY = "m.forwarded_room_key"


# ---------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class OutgoingRequest:
    """A request the caller sends, then answers with `OlmMachine.mark_request_sent`
    (``request_id``). ``kind`` names the endpoint; ``body`` is its JSON body."""

    request_id: str
    kind: ClassVar[str] = ""

    @property
    def body(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class KeysUploadRequest(OutgoingRequest):
    """``POST /keys/upload``. Answer: the response JSON (``one_time_key_counts``)."""

    device_keys: dict[str, Any] | None = None
    one_time_keys: dict[str, Any] = field(default_factory=dict)
    fallback_keys: dict[str, Any] = field(default_factory=dict)
    kind: ClassVar[str] = "keys_upload"

    @property
    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if self.device_keys is not None:
            body["device_keys"] = self.device_keys
        if self.one_time_keys:
            body["one_time_keys"] = self.one_time_keys
        if self.fallback_keys:
            body["fallback_keys"] = self.fallback_keys
        return body


@dataclass(frozen=True, slots=True)
class KeysQueryRequest(OutgoingRequest):
    """``POST /keys/query`` for ``users`` (user id -> [] for all their devices).
    Answer: the response JSON (``device_keys``, ``failures``)."""

    users: dict[str, list[str]] = field(default_factory=dict)
    kind: ClassVar[str] = "keys_query"

    @property
    def body(self) -> dict[str, Any]:
        return {"device_keys": self.users, "timeout": QUERY_TIMEOUT_MS}


@dataclass(frozen=True, slots=True)
class KeysClaimRequest(OutgoingRequest):
    """``POST /keys/claim``: ``one_time_keys[user][device] = "signed_curve25519"``.
    Answer: the response JSON (``one_time_keys``, ``failures``)."""

    one_time_keys: dict[str, dict[str, str]] = field(default_factory=dict)
    kind: ClassVar[str] = "keys_claim"

    @property
    def body(self) -> dict[str, Any]:
        return {"one_time_keys": self.one_time_keys, "timeout": QUERY_TIMEOUT_MS}


@dataclass(frozen=True, slots=True)
class ToDeviceRequest(OutgoingRequest):
    """``PUT /sendToDevice/{event_type}/{txn_id}`` with ``messages[user][device]``.
    The transaction id is the request id: a retried send is deduplicated by the server.
    Answer: the response JSON (``{}``)."""

    event_type: str = ENCRYPTED
    messages: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    kind: ClassVar[str] = "to_device"

    @property
    def txn_id(self) -> str:
        return self.request_id

    @property
    def body(self) -> dict[str, Any]:
        return {"messages": self.messages}


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class ToDeviceResult:
    """What became of one to-device event. ``refused`` is the reason it was refused
    (short, safe to log; None when it was not). ``decrypted_type`` is the type inside
    an Olm message. ``room_key`` is (room_id, session_id) of a room key that was stored
    (new or better): messages waiting for it can be retried. ``ignored`` says why an
    acceptable event had no effect (unencrypted, an unknown type, a key already known).
    """

    sender: str
    type: str
    refused: str | None = None
    decrypted_type: str | None = None
    sender_device: str | None = None
    room_key: tuple[str, str] | None = None
    ignored: str | None = None


@dataclass(frozen=True, slots=True)
class DecryptedEvent:
    """A decrypted room event whose sender and device were checked against the keys
    that encrypted it. ``type``/``content`` are the plaintext's (with the clear
    ``m.relates_to``); the rest identifies where it came from."""

    type: str
    content: dict[str, Any]
    sender: str
    device_id: str
    room_id: str
    event_id: str
    session_id: str
    message_index: int
    sender_curve25519: str

    def __repr__(self) -> str:  # the content is plaintext: never in a log line
        return (
            f"DecryptedEvent(type={self.type!r}, sender={self.sender!r}, "
            f"device_id={self.device_id!r}, room_id={self.room_id!r}, "
            f"event_id={self.event_id!r})"
        )


@dataclass(slots=True)
class _Share:
    room_id: str
    session_id: str
    devices: tuple[tuple[str, str], ...]
    request: ToDeviceRequest


def _new_request_id() -> str:
    return secrets.token_hex(12)


def _counts(value: object) -> dict[str, int]:
    if not isinstance(value, Mapping):
        return {}
    return {
        k: v
        for k, v in value.items()
        if isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
    }


def _str_list(value: object) -> list[str]:
    if not isinstance(value, list | tuple | set | frozenset):
        return []
    return [v for v in value if isinstance(v, str)]


# ----------------------------------------------------------------------------- machine


class OlmMachine:
    """One device's end-to-end encryption state and protocol. Not thread-safe."""

    def __init__(
        self,
        identity: Identity,
        pickle_key: bytes,
        *,
        sessions: olm.OlmSessions,
        groups: GroupSessions,
        tracker: DeviceTracker,
        keys_uploaded: bool,
    ) -> None:
        check_pickle_key(pickle_key)
        self._identity = identity
        self._pickle_key = pickle_key
        self._sessions = sessions
        self._groups = groups
        self._tracker = tracker
        self._keys_uploaded = keys_uploaded
        self._account_dirty = False
        # Latest server counts (None: unknown). Sync counts are ignored while an upload
        # is in flight: they may predate it.
        self._otk_counts: dict[str, int] | None = None
        self._unused_fallback: list[str] | None = None
        self._upload: KeysUploadRequest | None = None
        self._query: KeysQueryRequest | None = None
        self._query_epochs: dict[str, int] = {}
        self._claim: KeysClaimRequest | None = None
        self._claim_unwedges: set[tuple[str, str]] = set()
        # Peer curve key -> (user, when): Olm messages from it we could not decrypt.
        self._wedged: dict[str, tuple[str, float]] = {}
        self._unwedged_at: dict[str, float] = {}
        self._dummies: dict[str, ToDeviceRequest] = {}
        self._shares: dict[str, _Share] = {}
        self._query_failed: dict[str, float] = {}
        self._claim_failed: dict[tuple[str, str], float] = {}
        self._clock = time.monotonic

    # -- construction ------------------------------------------------------------------

    @classmethod
    def create(cls, user_id: str, device_id: str, pickle_key: bytes) -> OlmMachine:
        """A new identity for a new device (its keys are uploaded by the first
        `outgoing_requests`). ValueError for a pickle key that is not 32 bytes."""
        check_pickle_key(pickle_key)
        machine = cls(
            Identity.create(user_id, device_id),
            pickle_key,
            sessions=olm.OlmSessions(),
            groups=GroupSessions(pickle_key),
            tracker=DeviceTracker(),
            keys_uploaded=False,
        )
        machine._account_dirty = True
        return machine

    @classmethod
    def restore(
        cls, user_id: str, device_id: str, state: CryptoState, pickle_key: bytes
    ) -> OlmMachine:
        """The machine as `take_changes` persisted it. Raises `CryptoError` when the state
        has no account, belongs to another user or device, or does not open with
        ``pickle_key`` (wrong key or corrupt store: stop rather than start empty)."""
        check_pickle_key(pickle_key)
        account = state.account
        if account is None:
            raise CryptoError("the crypto state has no account")
        if (account.user_id, account.device_id) != (user_id, device_id):
            raise CryptoError(
                f"the crypto state is for device {account.device_id}, not {device_id}"
            )
        try:
            identity = Identity.from_pickle(user_id, device_id, account.pickle, pickle_key)
            sessions = olm.OlmSessions()
            for record in state.olm_sessions:
                session = vodozemac.Session.from_pickle(record.pickle, pickle_key)
                sessions.restore(record.peer_curve25519, session, record.last_used)
        except ValueError as exc:
            raise CryptoError(
                "the crypto state cannot be opened (wrong pickle key or corrupt store)"
            ) from exc
        groups = GroupSessions.restore(
            pickle_key,
            inbound=state.inbound_group_sessions,
            outbound=state.outbound_group_sessions,
            seen=state.seen_megolm_indexes,
        )
        tracker = DeviceTracker()
        for user in state.tracked_users:
            tracker.restore_user(user.user_id, outdated=user.outdated)
        for d in state.devices:
            tracker.restore_device(
                Device(d.user_id, d.device_id, d.curve25519, d.ed25519, tuple(d.algorithms))
            )
        return cls(
            identity,
            pickle_key,
            sessions=sessions,
            groups=groups,
            tracker=tracker,
            keys_uploaded=account.keys_uploaded,
        )

    # -- identity ----------------------------------------------------------------------

    @property
    def user_id(self) -> str:
        return self._identity.user_id

    @property
    def device_id(self) -> str:
        return self._identity.device_id

    @property
    def curve25519(self) -> str:
        return self._identity.curve25519

    @property
    def ed25519(self) -> str:
        return self._identity.ed25519

    @property
    def keys_uploaded(self) -> bool:
        return self._keys_uploaded

    def tracked_users(self) -> frozenset[str]:
        return frozenset(self._tracker.tracked)

    def outdated_users(self) -> frozenset[str]:
        return frozenset(self._tracker.outdated)

    def devices_current(self, users: Iterable[str]) -> bool:
        """Whether every one of ``users`` is tracked and not outdated (no copy of the
        tracked set: called before each decrypt)."""
        tracker = self._tracker
        return all(u in tracker.tracked and u not in tracker.outdated for u in users)

    def devices(self, user_id: str) -> list[Device]:
        """The known devices of ``user_id`` (from validated /keys/query answers)."""
        return self._tracker.user_devices(user_id)

    # -- sync --------------------------------------------------------------------------

    def receive_sync(
        self,
        *,
        to_device: Sequence[object],
        changed: Iterable[object] = (),
        left: Iterable[object] = (),
        one_time_key_counts: Mapping[str, object] | None = None,
        unused_fallback_key_types: Sequence[object] | None = None,
    ) -> list[ToDeviceResult]:
        """Take a sync batch's crypto parts; one result per to-device event, in order.
        Never raises for what the server or other devices sent.

        A room key is stored with the curve key its Olm session proves and the ed25519
        key its payload claims; both are checked against the sender's device when a
        room event is decrypted. A sender whose device is not known yet is queried (it
        becomes outdated). An Olm message from a known device of the sender that none of
        our sessions decrypts makes `outgoing_requests` start a new session with that
        device (at most once an hour per device)."""
        self._tracker.mark_changed(_str_list(changed))
        self._tracker.forget(_str_list(left))
        if self._upload is None:
            # Only a count the server states is used (as matrix-rust-sdk does): believing
            # a full pool empty would upload keys at every sync, and vodozemac forgets
            # the oldest private keys beyond its maximum.
            counts = _counts(one_time_key_counts)
            if SIGNED_CURVE25519 in counts:
                self._otk_counts = counts
            if unused_fallback_key_types is not None:
                self._unused_fallback = _str_list(unused_fallback_key_types)
        if not isinstance(to_device, list | tuple):
            return []
        return [self._to_device(event) for event in to_device]

    def _to_device(self, event: object) -> ToDeviceResult:
        if not isinstance(event, Mapping):
            return ToDeviceResult(sender="", type="", refused="event is not an object")
        sender = event.get("sender")
        event_type = event.get("type")
        if not isinstance(sender, str) or not isinstance(event_type, str):
            return ToDeviceResult(
                sender=sender if isinstance(sender, str) else "",
                type=event_type if isinstance(event_type, str) else "",
                refused="event without a sender or type",
            )
        if event_type != ENCRYPTED:
            # Unencrypted to-device events (verification, key requests) are not used.
            return ToDeviceResult(sender, event_type, ignored="unencrypted to-device event")
        try:
            decrypted = olm.decrypt_to_device(self._identity, self._sessions, dict(event))
        except DecryptionError as exc:
            if isinstance(exc, olm.WedgedSession):
                self._note_wedged(sender, exc.sender_key)
            return ToDeviceResult(sender, event_type, refused=exc.reason)
        if decrypted.new_session:
            self._account_dirty = True  # a one-time key was used
        base = ToDeviceResult(
            sender,
            event_type,
            decrypted_type=decrypted.type,
            sender_device=decrypted.sender_device,
        )
        mismatch = self._check_sender_device(decrypted)
        if mismatch is not None:
            return _with(base, refused=mismatch)
        if decrypted.type == ROOM_KEY:
            outcome = self._groups.add_room_key(
                decrypted.content,
                sender_curve25519=decrypted.sender_key,
                sender_ed25519=decrypted.sender_ed25519,
            )
            if outcome.stored:
                return _with(base, room_key=(outcome.room_id, outcome.session_id))
            if outcome.reason == "already known":
                return _with(base, ignored=outcome.reason)
            return _with(base, refused=outcome.reason)
        if decrypted.type == FORWARDED_ROOM_KEY:
            # The bot never requests keys; an unrequested forwarded key is refused.
            return _with(base, refused="unrequested forwarded room key")
        return _with(base, ignored="no use for this to-device type")

    def _check_sender_device(self, decrypted: olm.OlmDecrypted) -> str | None:
        """Refuse an Olm message whose keys contradict the sender's known device; an
        unknown device makes the sender's device list outdated (the caller queries it
        before relying on the device)."""
        device = self._tracker.by_curve25519(decrypted.sender, decrypted.sender_key)
        if device is None:
            self._tracker.track([decrypted.sender])
            self._tracker.mark_changed([decrypted.sender])
            return None
        if device.ed25519 != decrypted.sender_ed25519:
            return "claimed ed25519 key differs from the sender's known device"
        if decrypted.sender_device is not None and decrypted.sender_device != device.device_id:
            return "claimed device id differs from the sender's known device"
        return None

    def _note_wedged(self, sender: str, curve25519: str) -> None:
        """Remember to start a new Olm session with the device behind ``curve25519``
        (once its device is known to belong to ``sender``), unless done recently."""
        now = self._clock()
        if now - self._unwedged_at.get(curve25519, -UNWEDGE_AFTER_S) < UNWEDGE_AFTER_S:
            return
        if curve25519 not in self._wedged and len(self._wedged) >= MAX_WEDGED:
            return
        self._wedged[curve25519] = (sender, now)
        if self._tracker.by_curve25519(sender, curve25519) is None:
            self._tracker.track([sender])
            self._tracker.mark_changed([sender])

    def _unwedge_claim(self) -> KeysClaimRequest | None:
        now = self._clock()
        wanted: dict[str, dict[str, str]] = {}
        unwedges: set[tuple[str, str]] = set()
        for curve25519, (user_id, since) in list(self._wedged.items()):
            device = self._tracker.by_curve25519(user_id, curve25519)
            if device is None:
                if now - since >= UNWEDGE_AFTER_S:
                    del self._wedged[curve25519]  # never turned out to be a device of theirs
                continue
            if len(unwedges) < MAX_DEVICES_PER_CLAIM:
                wanted.setdefault(user_id, {})[device.device_id] = SIGNED_CURVE25519
                unwedges.add((user_id, device.device_id))
        if not unwedges:
            return None
        self._claim = KeysClaimRequest(_new_request_id(), wanted)
        self._claim_unwedges = unwedges
        return self._claim

    def update_tracked_users(self, users: Iterable[str]) -> None:
        """Follow the devices of ``users`` (members of encrypted rooms, senders of
        encrypted events); users new to the machine are queried next."""
        self._tracker.track(users)

    # -- requests ----------------------------------------------------------------------

    def outgoing_requests(self) -> list[OutgoingRequest]:
        """What to send now: a keys upload (device keys once, one-time keys topped up, a
        fallback key), a keys query for outdated users, a keys claim and m.dummy messages
        replacing Olm sessions we cannot decrypt (see `receive_sync`), and any claim or
        room key share from `share_room_key` not answered yet. The same requests (same
        ids) are returned until `mark_request_sent`; persist `take_changes` before
        sending them."""
        requests: list[OutgoingRequest] = []
        upload = self._upload_request()
        query = self._query_request()
        if query is not None:
            requests.append(query)
        if self._claim is None:
            self._unwedge_claim()
        if self._claim is not None:
            requests.append(self._claim)
        requests.extend(self._live_shares())
        requests.extend(self._dummies.values())
        if upload is not None:
            # A new device's keys go first; later top-ups last, so that an upload the
            # server keeps refusing does not hold back the queries behind it.
            requests.insert(0 if upload.device_keys is not None else len(requests), upload)
        return requests

    def _upload_request(self) -> KeysUploadRequest | None:
        if self._upload is not None:
            return self._upload
        identity = self._identity
        device_keys = None if self._keys_uploaded else identity.device_keys()
        counts: Mapping[str, object] | None = self._otk_counts
        if counts is None and not self._keys_uploaded:
            counts = {}  # a new device: the server holds none
        before = identity.unpublished_key_ids()
        one_time_keys = identity.one_time_keys_for(counts) if counts is not None else {}
        # A new device publishes a fallback key at once; later, when the server says it
        # has no unused one.
        unused = self._unused_fallback if self._keys_uploaded else []
        fallback_keys = identity.fallback_keys_for(unused)
        if identity.unpublished_key_ids() != before:
            self._account_dirty = True  # keys were generated: stored before they leave
        if device_keys is None and not one_time_keys and not fallback_keys:
            return None
        self._upload = KeysUploadRequest(
            _new_request_id(), device_keys, one_time_keys, fallback_keys
        )
        return self._upload

    def _query_request(self) -> KeysQueryRequest | None:
        if self._query is not None:
            return self._query
        now = self._clock()
        users = sorted(
            u
            for u in self._tracker.outdated
            if now - self._query_failed.get(u, -RETRY_AFTER_S) >= RETRY_AFTER_S
        )[:MAX_USERS_PER_QUERY]
        if not users:
            return None
        self._query_epochs = self._tracker.epochs(users)
        self._query = KeysQueryRequest(_new_request_id(), {u: [] for u in users})
        return self._query

    def _live_shares(self) -> list[ToDeviceRequest]:
        live = []
        for request_id, share in list(self._shares.items()):
            info = self._groups.outbound(share.room_id)
            if info is None or info.session_id != share.session_id:
                del self._shares[request_id]  # rotated since: the new key is shared instead
                continue
            live.append(share.request)
        return live

    def mark_request_sent(self, request_id: str, response: object) -> list[str]:
        """Take the answer to a request. Returns warnings for the caller to log (devices
        refused from a keys query, claimed keys refused); never raises for what the
        server answered. An unknown or already answered ``request_id`` is ignored."""
        if self._upload is not None and request_id == self._upload.request_id:
            return self._upload_sent(response)
        if self._query is not None and request_id == self._query.request_id:
            return self._query_sent(self._query, response)
        if self._claim is not None and request_id == self._claim.request_id:
            return self._claim_sent(self._claim, response)
        share = self._shares.pop(request_id, None)
        if share is not None:
            self._groups.mark_shared(share.room_id, share.session_id, share.devices)
        self._dummies.pop(request_id, None)
        return []

    def _upload_sent(self, response: object) -> list[str]:
        self._upload = None
        self._identity.mark_published()
        self._account_dirty = True
        self._keys_uploaded = True
        answered = response.get("one_time_key_counts") if isinstance(response, Mapping) else None
        counts = _counts(answered)
        # Without a count in the answer, wait for the next sync's.
        self._otk_counts = counts if SIGNED_CURVE25519 in counts else None
        # What the server says about fallback keys before this upload is stale now.
        self._unused_fallback = None
        return []

    def _query_sent(self, query: KeysQueryRequest, response: object) -> list[str]:
        self._query = None
        outcome = parse_keys_query(response, query.users, self._tracker.devices)
        warnings = [f"device {d} of {u} refused: {why}" for u, d, why in outcome.refused]
        own = outcome.devices.get(self.user_id, {}).get(self.device_id)
        if own is not None and (own.curve25519, own.ed25519) != (self.curve25519, self.ed25519):
            warnings.append("the server lists other keys for this very device")
            del outcome.devices[self.user_id][self.device_id]
        now = self._clock()
        for user_id in outcome.unanswered:
            self._query_failed[user_id] = now
        for user_id in outcome.devices:
            self._query_failed.pop(user_id, None)
        self._tracker.apply_query(outcome, self._query_epochs)
        return warnings

    def _claim_sent(self, claim: KeysClaimRequest, response: object) -> list[str]:
        self._claim = None
        unwedges, self._claim_unwedges = self._claim_unwedges, set()
        answered = response.get("one_time_keys") if isinstance(response, Mapping) else None
        if not isinstance(answered, Mapping):
            answered = {}
        warnings: list[str] = []
        now = self._clock()
        for user_id, device_ids in claim.one_time_keys.items():
            per_user = answered.get(user_id)
            for device_id in device_ids:
                device = self._tracker.device(user_id, device_id)
                claimed = per_user.get(device_id) if isinstance(per_user, Mapping) else None
                if device is None:
                    continue
                if (user_id, device_id) in unwedges:
                    self._wedged.pop(device.curve25519, None)
                    self._unwedged_at[device.curve25519] = now
                if claimed is None:
                    self._claim_failed[(user_id, device_id)] = now  # no key left on server
                    continue
                refused = olm.create_outbound_session(
                    self._identity,
                    self._sessions,
                    user_id=user_id,
                    device_id=device_id,
                    curve25519=device.curve25519,
                    ed25519=device.ed25519,
                    claimed=claimed,
                )
                if refused is not None:
                    self._claim_failed[(user_id, device_id)] = now
                    warnings.append(f"one-time key of device {device_id} of {user_id}: {refused}")
                    continue
                self._claim_failed.pop((user_id, device_id), None)
                if (user_id, device_id) in unwedges:
                    self._send_dummy(device)
        return warnings

    def _send_dummy(self, device: Device) -> None:
        """An m.dummy through the newest session: the device sees our new session and
        uses it from then on instead of the one we cannot decrypt."""
        content = olm.encrypt_for_device(
            self._identity,
            self._sessions,
            user_id=device.user_id,
            curve25519=device.curve25519,
            ed25519=device.ed25519,
            event_type=DUMMY,
            content={},
        )
        if content is not None:
            request = ToDeviceRequest(
                _new_request_id(), ENCRYPTED, {device.user_id: {device.device_id: content}}
            )
            self._dummies[request.request_id] = request

    # -- sending -----------------------------------------------------------------------

    def share_room_key(
        self,
        room_id: str,
        users: Iterable[str],
        settings: RotationSettings | Mapping[str, object] | None = None,
        *,
        now_ms: int | None = None,
    ) -> list[OutgoingRequest]:
        """The requests still needed before `encrypt_room_event` in ``room_id`` reaches
        every device of ``users`` (the room's members): a keys query for members whose
        devices are unknown or outdated, then a keys claim for devices without an Olm
        session, then the to-device messages carrying the room key. Call it before each
        encryption, send what it returns (persisting `take_changes` first), mark each
        sent, and call it again until it returns nothing. ``settings`` is the room's
        ``m.room.encryption`` content (rotation period). Rotates the room's session when
        due or when a device that had its key is gone. Never raises for bad input."""
        members = sorted({u for u in users if isinstance(u, str)})
        self._tracker.track(members)
        now = self._clock()
        if any(
            u in self._tracker.outdated
            and now - self._query_failed.get(u, -RETRY_AFTER_S) >= RETRY_AFTER_S
            for u in members
        ):
            query = self._query_request()
            if query is not None:
                return [query]
        devices = [
            d
            for u in members
            for d in self._tracker.user_devices(u)
            if (d.user_id, d.device_id) != (self.user_id, self.device_id)
            and d.curve25519 != self.curve25519
            and OLM_ALGORITHM in d.algorithms
            and MEGOLM_ALGORITHM in d.algorithms
        ]
        missing = [
            d
            for d in devices
            if not self._sessions.has_session(d.curve25519)
            and now - self._claim_failed.get((d.user_id, d.device_id), -RETRY_AFTER_S)
            >= RETRY_AFTER_S
        ]
        if missing:
            if self._claim is None:
                wanted: dict[str, dict[str, str]] = {}
                for d in missing[:MAX_DEVICES_PER_CLAIM]:
                    wanted.setdefault(d.user_id, {})[d.device_id] = SIGNED_CURVE25519
                self._claim = KeysClaimRequest(_new_request_id(), wanted)
            return [self._claim]
        if isinstance(settings, RotationSettings):
            rotation = settings
        else:
            rotation = RotationSettings.from_encryption_content(settings)
        reachable = {d.curve25519: d for d in devices if self._sessions.has_session(d.curve25519)}
        by_id = {(d.user_id, d.device_id): d for d in reachable.values()}
        plan = self._groups.prepare_outbound(
            room_id,
            now_ms=int(time.time() * 1000) if now_ms is None else now_ms,
            settings=rotation,
            devices=by_id.keys(),
            own_curve25519=self.curve25519,
            own_ed25519=self.ed25519,
        )
        pending = [
            s.request
            for s in self._shares.values()
            if (s.room_id, s.session_id) == (room_id, plan.session_id)
        ]
        if pending:
            return list(pending)  # answer those first (the same ids: no double shares)
        requests: list[OutgoingRequest] = []
        batch: list[tuple[str, str]] = []
        messages: dict[str, dict[str, dict[str, Any]]] = {}
        for key in plan.to_share:
            device = by_id.get(key)
            if device is None:
                continue
            content = olm.encrypt_for_device(
                self._identity,
                self._sessions,
                user_id=device.user_id,
                curve25519=device.curve25519,
                ed25519=device.ed25519,
                event_type=ROOM_KEY,
                content=plan.room_key,
            )
            if content is None:
                continue
            messages.setdefault(device.user_id, {})[device.device_id] = content
            batch.append(key)
            if len(batch) >= MAX_MESSAGES_PER_TO_DEVICE:
                requests.append(self._share(room_id, plan.session_id, batch, messages))
                batch, messages = [], {}
        if batch:
            requests.append(self._share(room_id, plan.session_id, batch, messages))
        return requests

    def _share(
        self,
        room_id: str,
        session_id: str,
        devices: list[tuple[str, str]],
        messages: dict[str, dict[str, dict[str, Any]]],
    ) -> ToDeviceRequest:
        request = ToDeviceRequest(_new_request_id(), ENCRYPTED, messages)
        self._shares[request.request_id] = _Share(room_id, session_id, tuple(devices), request)
        while len(self._shares) > MAX_PENDING_SHARES:
            del self._shares[next(iter(self._shares))]
        return request

    def encrypt_room_event(
        self, room_id: str, event_type: str, content: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The ``m.room.encrypted`` content for an event of ``event_type``/``content`` in
        ``room_id`` (``m.relates_to`` stays in the clear). Call `share_room_key` first;
        ValueError without a session prepared by it (a caller bug, not input). Persist
        `take_changes` before sending the result."""
        return self._groups.encrypt(room_id, event_type, content, self.device_id, self.curve25519)

    # -- receiving room events ---------------------------------------------------------

    def decrypt_room_event(self, room_id: str, event: Mapping[str, Any]) -> DecryptedEvent:
        """Decrypt an ``m.room.encrypted`` room event and check that its ``sender``
        owns the device whose keys the room key came from.

        Raises `MissingRoomKey` (retry when its key arrives) or `DecryptionError`
        (never decryptable; `UnverifiedSender` when decrypted but not provably from
        ``sender``: a forwarded key, an unknown device, keys that do not match it).
        """
        if not isinstance(event, Mapping):
            raise DecryptionError("event is not an object")
        sender = event.get("sender")
        event_id = event.get("event_id")
        ts = event.get("origin_server_ts")
        if not isinstance(sender, str) or not isinstance(event_id, str):
            raise DecryptionError("event without sender or event_id")
        if event.get("type", ENCRYPTED) != ENCRYPTED:
            raise DecryptionError("not an m.room.encrypted event")
        plain = self._groups.decrypt(
            room_id,
            event_id,
            ts if isinstance(ts, int) and not isinstance(ts, bool) else 0,
            event.get("content"),
        )
        if not plain.trusted:
            raise UnverifiedSender("room key was forwarded, not sent by its owner")
        if sender == self.user_id and plain.sender_curve25519 == self.curve25519:
            device_id = self.device_id
            ed25519 = self.ed25519
        else:
            device = self._tracker.by_curve25519(sender, plain.sender_curve25519)
            if device is None:
                if sender in self._tracker.tracked:
                    self._tracker.mark_changed([sender])
                else:
                    self._tracker.track([sender])
                raise UnverifiedSender("the room key's device is not a known device of sender")
            device_id, ed25519 = device.device_id, device.ed25519
        if plain.sender_claimed_ed25519 != ed25519:
            raise UnverifiedSender("the room key's signing key is not the device's")
        if plain.device_id is not None and plain.device_id != device_id:
            raise UnverifiedSender("device_id differs from the room key's device")
        return DecryptedEvent(
            type=plain.event_type,
            content=plain.content,
            sender=sender,
            device_id=device_id,
            room_id=room_id,
            event_id=event_id,
            session_id=plain.session_id,
            message_index=plain.message_index,
            sender_curve25519=plain.sender_curve25519,
        )

    # -- key backup --------------------------------------------------------------------

    def sign(self, message: bytes) -> tuple[str, str]:
        """This device's signature of ``message``: (``ed25519:<device id>``, unpadded
        base64), e.g. for a key backup's ``auth_data`` (`backup.AuthDataSigner`)."""
        return self._identity.signing_key_id, self._identity.sign(message)

    def backup_states(self) -> dict[tuple[str, str, str], tuple[int, bool]]:
        """Each inbound session's (first known index, trusted), keyed (room_id,
        sender_curve25519, session_id): which ones a backup holds as good a copy of."""
        return self._groups.backup_states()

    def room_key_to_back_up(
        self, room_id: str, sender_curve25519: str, session_id: str
    ) -> RoomKeyToBackUp | None:
        """An inbound session as a key backup carries it (None: not known): exported at
        its first known index, authenticated when it came from its owner."""
        exported = self._groups.export_inbound(room_id, sender_curve25519, session_id)
        if exported is None:
            return None
        return RoomKeyToBackUp(
            room_id=exported.room_id,
            session_id=exported.session_id,
            sender_curve25519=exported.sender_curve25519,
            sender_claimed_ed25519=exported.sender_claimed_ed25519,
            session_key=exported.session_key,
            first_message_index=exported.first_known_index,
            forwarded_count=0 if exported.trusted else 1,
            authenticated=exported.trusted,
        )

    def import_backed_up(self, sessions: Iterable[BackedUpSession]) -> int:
        """Add sessions restored from the key backup: trusted only when the entry was
        authenticated (`matrix_crypto.backup`). Returns how many were new or better;
        persist `take_changes` after."""
        imported = 0
        for session in sessions:
            outcome = self._groups.add_backed_up_room_key(
                session.forwarded_room_key_content(), authenticated=session.authenticated
            )
            imported += outcome.stored
        return imported

    # -- persistence -------------------------------------------------------------------

    def take_changes(self) -> CryptoChanges:
        """What to persist since the last call (then forgotten here). Pickles are taken
        now, so several changes between two calls persist once."""
        key = self._pickle_key
        account = None
        if self._account_dirty:
            account = AccountRecord(
                self.user_id, self.device_id, self._identity.pickle(key), self._keys_uploaded
            )
            self._account_dirty = False
        sessions = []
        for peer, session_id in sorted(self._sessions.changed()):
            found = self._sessions.get(peer, session_id)
            if found is not None:
                session, last_used = found
                sessions.append(OlmSessionRecord(peer, session_id, last_used, session.pickle(key)))
        removed = tuple(sorted(self._sessions.removed()))
        self._sessions.clear_dirty()
        users, device_puts, device_deletes = self._tracker.take_dirty()
        tracker = self._tracker
        devices = []
        for user_id, device_id in sorted(device_puts):
            d = tracker.device(user_id, device_id)
            if d is not None:
                devices.append(
                    DeviceRecord(d.user_id, d.device_id, d.curve25519, d.ed25519, d.algorithms)
                )
        return CryptoChanges(
            account=account,
            olm_sessions=tuple(sessions),
            olm_sessions_deleted=removed,
            devices=tuple(devices),
            devices_deleted=tuple(sorted(device_deletes)),
            tracked_users=tuple(
                TrackedUserRecord(u, u in tracker.outdated)
                for u in sorted(users)
                if u in tracker.tracked
            ),
            tracked_users_deleted=tuple(sorted(u for u in users if u not in tracker.tracked)),
            megolm=self._groups.take_changes(),
        )


def _with(result: ToDeviceResult, **changes: Any) -> ToDeviceResult:
    return replace(result, **changes)
