"""Olm: one-to-one sessions and to-device encryption (``m.olm.v1.curve25519-aes-sha2``).

Sessions are keyed by the peer device's curve25519 key, at most `MAX_SESSIONS_PER_PEER`
per peer and `MAX_PEERS` peers (the least recently used go). Decrypting tries the existing
sessions first and creates an inbound session (consuming a one-time key) only for a
pre-key message none of them matches. Every refusal is a `DecryptionError` with a short
reason that quotes no key or plaintext; the machine turns it into a per-event result.

Re-delivery: the server sends a to-device event again until the sync token moves. A
message key is used up by its first decryption (the ratchet moves on), so the same
ciphertext cannot be decrypted twice by one session. `OlmSessions` remembers the last
results in memory (bounded, never persisted) and answers a re-delivered message with the
same result. After a restart nothing is remembered, but then the persisted state is the one
stored with the old sync token, from before the first decryption, and decrypts it afresh.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import vodozemac

from matrix_crypto.canonical import b64decode, b64encode, verify
from matrix_crypto.errors import DecryptionError
from matrix_crypto.identity import OLM_ALGORITHM, SIGNED_CURVE25519, Identity

__all__ = [
    "MAX_CIPHERTEXT_CHARS",
    "MAX_PEERS",
    "MAX_SESSIONS_PER_PEER",
    "OlmDecrypted",
    "OlmSessions",
    "WedgedSession",
    "create_outbound_session",
    "decrypt_to_device",
    "encrypt_for_device",
    "parse_curve25519",
]

MAX_SESSIONS_PER_PEER = 10
# Peers with sessions. Anyone can start sessions through the reusable fallback key, one
# per curve key they make up: beyond this, the least recently used peer is forgotten.
MAX_PEERS = 20_000
# A room key share is ~1 KiB of base64; this leaves room for anything legitimate.
MAX_CIPHERTEXT_CHARS = 64 * 1024
# Re-delivered messages answered from memory (one sync batch's worth and more).
REMEMBERED_RESULTS = 256

PRE_KEY = 0
NORMAL = 1


class WedgedSession(DecryptionError):
    """A well-formed Olm message from ``sender_key`` that no session of ours decrypts
    (its sender uses a session we do not have, or a one-time key we no longer hold):
    the machine may start a new session with that device so it stops using the old one."""

    def __init__(self, reason: str, sender_key: str) -> None:
        super().__init__(reason)
        self.sender_key = sender_key


@dataclass(frozen=True, slots=True)
class OlmDecrypted:
    """A decrypted and checked to-device event.

    ``sender_key`` (curve25519) is proven by the Olm session; ``sender_ed25519`` and
    ``sender_device`` are what the sender claims inside the ciphertext: the machine checks
    them against its device cache.
    """

    sender: str
    sender_key: str
    sender_ed25519: str
    sender_device: str | None
    type: str
    content: dict[str, object] = field(repr=False)  # may hold a room key
    session_id: str
    new_session: bool  # created from this pre-key message (a one-time key was used)


def parse_curve25519(value: object) -> vodozemac.Curve25519PublicKey | None:
    """A curve25519 public key from unpadded base64, or None for anything else."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        return vodozemac.Curve25519PublicKey.from_base64(value)
    except ValueError:
        return None


@dataclass(slots=True)
class _Entry:
    session: vodozemac.Session
    last_used: int


class OlmSessions:
    """The Olm sessions of this device, by peer curve25519 key, and what changed.

    ``changed()`` / ``removed()`` say which sessions must be pickled / deleted in the
    store; ``clear_dirty()`` after the caller has taken them.
    """

    def __init__(self) -> None:
        self._by_peer: dict[str, list[_Entry]] = {}
        self._clock = 0
        self._changed: set[tuple[str, str]] = set()
        self._removed: set[tuple[str, str]] = set()
        self._results: OrderedDict[bytes, OlmDecrypted] = OrderedDict()

    # -- persistence ---------------------------------------------------------------

    def restore(self, peer_key: str, session: vodozemac.Session, last_used: int) -> None:
        """Put back a persisted session (not marked changed)."""
        entries = self._by_peer.setdefault(peer_key, [])
        entries.append(_Entry(session, last_used))
        entries.sort(key=lambda e: e.last_used, reverse=True)
        self._clock = max(self._clock, last_used)

    def items(self) -> Iterator[tuple[str, vodozemac.Session, int]]:
        """Every session as (peer_key, session, last_used)."""
        for peer, entries in self._by_peer.items():
            for entry in entries:
                yield peer, entry.session, entry.last_used

    def get(self, peer_key: str, session_id: str) -> tuple[vodozemac.Session, int] | None:
        for entry in self._by_peer.get(peer_key, ()):
            if entry.session.session_id == session_id:
                return entry.session, entry.last_used
        return None

    def changed(self) -> set[tuple[str, str]]:
        return set(self._changed)

    def removed(self) -> set[tuple[str, str]]:
        return set(self._removed - self._changed)

    def clear_dirty(self) -> None:
        self._changed.clear()
        self._removed.clear()

    # -- use -----------------------------------------------------------------------

    def has_session(self, peer_key: str) -> bool:
        return bool(self._by_peer.get(peer_key))

    def sessions_for(self, peer_key: str) -> list[vodozemac.Session]:
        """Most recently used first."""
        return [e.session for e in self._by_peer.get(peer_key, ())]

    def touch(self, peer_key: str, session: vodozemac.Session) -> None:
        """Record a use (or a new session), mark it changed, and evict beyond the bound."""
        self._clock += 1
        entries = self._by_peer.setdefault(peer_key, [])
        for entry in entries:
            if entry.session is session:
                entry.last_used = self._clock
                break
        else:
            entries.append(_Entry(session, self._clock))
        entries.sort(key=lambda e: e.last_used, reverse=True)
        self._changed.add((peer_key, session.session_id))
        for dropped in entries[MAX_SESSIONS_PER_PEER:]:
            key = (peer_key, dropped.session.session_id)
            self._changed.discard(key)
            self._removed.add(key)
        del entries[MAX_SESSIONS_PER_PEER:]
        if len(self._by_peer) > MAX_PEERS:
            self._forget_least_recent_peer()

    def _forget_least_recent_peer(self) -> None:
        oldest = min(self._by_peer, key=lambda peer: self._by_peer[peer][0].last_used)
        for entry in self._by_peer.pop(oldest):
            key = (oldest, entry.session.session_id)
            self._changed.discard(key)
            self._removed.add(key)

    def remember(self, digest: bytes, result: OlmDecrypted) -> None:
        self._results[digest] = result
        self._results.move_to_end(digest)
        while len(self._results) > REMEMBERED_RESULTS:
            self._results.popitem(last=False)

    def recall(self, digest: bytes) -> OlmDecrypted | None:
        return self._results.get(digest)


def _str(obj: Mapping[str, object], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise DecryptionError(f"{key} is missing or not a string")
    return value


def _dict(obj: Mapping[str, object], key: str) -> dict[str, object]:
    value = obj.get(key)
    if not isinstance(value, dict):
        raise DecryptionError(f"{key} is missing or not an object")
    return value


def _digest(sender_key: str, message_type: int, body: str) -> bytes:
    return hashlib.sha256(f"{sender_key}|{message_type}|{body}".encode()).digest()


def decrypt_to_device(identity: Identity, sessions: OlmSessions, event: object) -> OlmDecrypted:
    """Decrypt and check one ``m.room.encrypted`` to-device event.

    Raises `DecryptionError` (only) for anything refused: wrong shape or algorithm, not for
    this device, undecryptable, a replayed pre-key message no remembered result answers,
    or a payload that names another recipient, another sender or lacks the sender's keys.
    A session created from a pre-key message is kept even if its payload is then refused
    (the one-time key is used up either way; the peer will keep using the session).
    """
    if not isinstance(event, dict):
        raise DecryptionError("event is not an object")
    if event.get("type") != "m.room.encrypted":
        raise DecryptionError("not an m.room.encrypted event")
    sender = _str(event, "sender")
    content = _dict(event, "content")
    if content.get("algorithm") != OLM_ALGORITHM:
        raise DecryptionError("unsupported to-device algorithm")
    sender_key = _str(content, "sender_key")
    peer = parse_curve25519(sender_key)
    if peer is None:
        raise DecryptionError("sender_key is not a curve25519 key")
    if sender_key == identity.curve25519:
        raise DecryptionError("sender_key is our own key")
    ciphertexts = _dict(content, "ciphertext")
    mine = ciphertexts.get(identity.curve25519)
    if not isinstance(mine, dict):
        raise DecryptionError("no ciphertext for this device")
    message_type = mine.get("type")
    body = mine.get("body")
    # Exactly the ints 0 and 1: 0.0 and True compare equal to them.
    if type(message_type) is not int or message_type not in (PRE_KEY, NORMAL):
        raise DecryptionError("unknown Olm message type")
    if not isinstance(body, str) or not body:
        raise DecryptionError("ciphertext body is missing or not a string")
    if len(body) > MAX_CIPHERTEXT_CHARS:
        raise DecryptionError("ciphertext too large")

    digest = _digest(sender_key, message_type, body)
    remembered = sessions.recall(digest)
    if remembered is not None and remembered.sender == sender:
        return remembered

    try:
        message = vodozemac.AnyOlmMessage.from_parts(message_type, b64decode(body))
    except ValueError:
        raise DecryptionError("ciphertext is not a valid Olm message") from None

    plaintext, session, created = _decrypt(identity, sessions, sender_key, peer, message)
    result = _check_payload(identity, sender, sender_key, plaintext, session, created)
    sessions.remember(digest, result)
    return result


def _decrypt(
    identity: Identity,
    sessions: OlmSessions,
    sender_key: str,
    peer: vodozemac.Curve25519PublicKey,
    message: vodozemac.AnyOlmMessage,
) -> tuple[bytes, vodozemac.Session, bool]:
    pre_key = message.to_pre_key()
    existing = sessions.sessions_for(sender_key)
    if pre_key is not None:
        for session in existing:
            if session.session_matches(pre_key):
                # Never a second inbound session for a message one already answers: that
                # would let a replayed message through again (a fallback key is reusable).
                try:
                    plaintext = session.decrypt(message)
                except ValueError:
                    raise DecryptionError("replayed or undecryptable pre-key message") from None
                sessions.touch(sender_key, session)
                return plaintext, session, False
        try:
            session, plaintext = identity.account.create_inbound_session(peer, pre_key)
        except ValueError:
            raise WedgedSession(
                "cannot create an Olm session from this message", sender_key
            ) from None
        sessions.touch(sender_key, session)
        return plaintext, session, True
    for session in existing:
        try:
            plaintext = session.decrypt(message)
        except ValueError:
            continue  # another session of this peer, or garbage: try the next
        sessions.touch(sender_key, session)
        return plaintext, session, False
    raise WedgedSession("no Olm session with this sender decrypts the message", sender_key)


def _check_payload(
    identity: Identity,
    sender: str,
    sender_key: str,
    plaintext: bytes,
    session: vodozemac.Session,
    created: bool,
) -> OlmDecrypted:
    try:
        payload = json.loads(plaintext)
    except (ValueError, RecursionError):
        raise DecryptionError("decrypted payload is not JSON") from None
    if not isinstance(payload, dict):
        raise DecryptionError("decrypted payload is not an object")
    if _str(payload, "sender") != sender:
        raise DecryptionError("payload sender differs from the event's sender")
    if _str(payload, "recipient") != identity.user_id:
        raise DecryptionError("payload is for another user")
    if _str(_dict(payload, "recipient_keys"), "ed25519") != identity.ed25519:
        raise DecryptionError("payload is for another device")
    sender_ed25519 = _str(_dict(payload, "keys"), "ed25519")
    sender_device = payload.get("sender_device")
    if sender_device is not None and not isinstance(sender_device, str):
        raise DecryptionError("sender_device is not a string")
    return OlmDecrypted(
        sender=sender,
        sender_key=sender_key,
        sender_ed25519=sender_ed25519,
        sender_device=sender_device,
        type=_str(payload, "type"),
        content=_dict(payload, "content"),
        session_id=session.session_id,
        new_session=created,
    )


def create_outbound_session(
    identity: Identity,
    sessions: OlmSessions,
    *,
    user_id: str,
    device_id: str,
    curve25519: str,
    ed25519: str,
    claimed: object,
) -> str | None:
    """Start a session with a device from its entry in a ``/keys/claim`` answer
    (``one_time_keys[user_id][device_id]``: ``{"signed_curve25519:<id>": {"key", "signatures"}}``).

    The key must be signed by the device's ed25519 key. Returns None on success, or the
    reason it was refused (the device then gets no session; nothing raises).
    """
    peer = parse_curve25519(curve25519)
    if peer is None:
        return "the device's curve25519 key is invalid"
    if not isinstance(claimed, dict) or not claimed:
        return "no one-time key claimed"
    for key_id, signed in claimed.items():
        if not isinstance(key_id, str) or not key_id.startswith(f"{SIGNED_CURVE25519}:"):
            continue
        if not isinstance(signed, dict):
            continue
        if not verify(signed, user_id, f"ed25519:{device_id}", ed25519):
            return "the one-time key is not signed by the device"
        one_time_key = parse_curve25519(signed.get("key"))
        if one_time_key is None:
            return "the one-time key is invalid"
        session = identity.account.create_outbound_session(peer, one_time_key)
        sessions.touch(curve25519, session)
        return None
    return "no signed_curve25519 key claimed"


def encrypt_for_device(
    identity: Identity,
    sessions: OlmSessions,
    *,
    user_id: str,
    curve25519: str,
    ed25519: str,
    event_type: str,
    content: Mapping[str, object],
) -> dict[str, object] | None:
    """The ``m.room.encrypted`` to-device content carrying ``event_type``/``content`` to
    one device, with its most recently used session; None when there is no session."""
    session_list = sessions.sessions_for(curve25519)
    if not session_list:
        return None
    session = session_list[0]
    payload = {
        "sender": identity.user_id,
        "sender_device": identity.device_id,
        "keys": {"ed25519": identity.ed25519},
        "recipient": user_id,
        "recipient_keys": {"ed25519": ed25519},
        "type": event_type,
        "content": dict(content),
    }
    message_type, raw = session.encrypt(
        json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    ).to_parts()
    sessions.touch(curve25519, session)
    return {
        "algorithm": OLM_ALGORITHM,
        "sender_key": identity.curve25519,
        "ciphertext": {curve25519: {"type": message_type, "body": b64encode(raw)}},
    }
