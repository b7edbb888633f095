"""Server-side key backup crypto (``m.megolm_backup.v1.curve25519-aes-sha2``), sans-IO.

The backup key is a Curve25519 key pair. Its public half goes in the backup version's
``auth_data`` (`BackupKey.auth_data`, signed by the caller's signers); its private half
is the secret ``m.megolm_backup.v1`` kept in secret storage (`BackupKey.to_base64`).
Each inbound room key is backed up as `KeyBackupData` whose ``session_data`` is the
`BackedUpSessionData` JSON encrypted to the public key (`encrypt_session`); restoring
decrypts it with the private key (`decrypt_session`, `decrypt_room_keys`).

The encryption is vodozemac's ``PkEncryption``: ECDH with an ephemeral key, HKDF-SHA256
(zero salt, empty info) to an AES-256-CBC key, an HMAC key and an IV; the ``mac`` is
the first 8 bytes of HMAC-SHA256 over an *empty* buffer (libolm's bug that every
implementation kept, see the spec's warning). vodozemac 0.10 does exactly that (checked
by the tests against HKDF/HMAC computed here and against matrix-rust-sdk).

What a backed-up key is worth: anyone who knows the public key can write an entry
(the MAC covers nothing), so an entry says only what it claims. Entries this module
writes carry MSC4048's authentication as well (unstable names): an HMAC of the
``session_data`` under a key derived from the backup's *private* key, which only
holders of that key can make, and an ``unauthenticated`` marker inside the plaintext
when the key was not received from its owner. `decrypt_session` reports
``authenticated`` only for an entry with a valid HMAC and no such marker; any other
entry is worth what a forwarded key is (stored untrusted). The
``first_message_index``, ``forwarded_count`` and ``is_verified`` beside the ciphertext
are the uploader's word; `decrypt_session` reports the first index the key itself
can decrypt from.

Public API::

    ALGORITHM = "m.megolm_backup.v1.curve25519-aes-sha2"; SECRET_NAME = "m.megolm_backup.v1"
    class BackupKey                       # repr: public key only; not picklable
        BackupKey.create() / BackupKey.from_base64(text)   # BackupError for bad text
        .public_key: str; .to_base64() -> str (the secret)
        .auth_data() -> {"public_key"}; .signed_auth_data(user_id, signers) -> dict
        .matches(auth_data) -> bool; .mac_key() -> bytes (a secret, MSC4048)
    AuthDataSigner = Callable[[bytes], tuple[key_id, signature]]
    public_key_from_auth_data(auth_data) -> str          # BackupError
    public_key_matches(auth_data, public_key) -> bool    # never raises
    check_auth_data(auth_data, backup_key) -> None       # BackupKeyMismatch / BackupError
    RoomKeyToBackUp(room_id, session_id, sender_curve25519, sender_claimed_ed25519,
                    session_key, first_message_index, forwarded_count=0, verified=False,
                    forwarding_curve25519_key_chain=(), authenticated=False)
    encrypt_session(public_key, session) -> {"ephemeral", "ciphertext", "mac"}  # ValueError
    backup_data(public_key, session) -> KeyBackupData dict                     # ValueError
    authenticated_backup_data(backup_key, user_id, session) -> the same, HMAC'd (MSC4048)
    is_better_copy(candidate, current) -> bool           # never raises
    decrypt_session(backup_key, key_backup_data, *, room_id, session_id, user_id="")
        -> BackedUpSession                               # BackupError
    decrypt_room_keys(backup_key, rooms) -> (list[BackedUpSession], list[SessionRefusal])
    BackedUpSession(room_id, session_id, algorithm, sender_key, sender_claimed_keys,
                    session_key, forwarding_curve25519_key_chain, first_known_index,
                    forwarded_count, is_verified, authenticated)
        .sender_claimed_ed25519; .forwarded_room_key_content() -> dict
    SessionRefusal(room_id, session_id, reason)

Errors: hostile or malformed input -> `BackupError` (a `CryptoError`) whose ``reason``
is short, safe to log and quotes no key, ciphertext or plaintext. Our own bad input
(a malformed session to back up) -> ValueError. Secrets never appear in a repr.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, NoReturn

import vodozemac
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from matrix_crypto.canonical import b64decode, b64encode, canonical_json
from matrix_crypto.errors import CryptoError

__all__ = [
    "ALGORITHM",
    "MAC_BYTES",
    "MEGOLM_ALGORITHM",
    "SECRET_NAME",
    "AuthDataSigner",
    "BackedUpSession",
    "BackupError",
    "BackupKey",
    "BackupKeyMismatch",
    "RoomKeyToBackUp",
    "SessionRefusal",
    "authenticated_backup_data",
    "backup_data",
    "check_auth_data",
    "decrypt_room_keys",
    "decrypt_session",
    "encrypt_session",
    "is_better_copy",
    "public_key_from_auth_data",
    "public_key_matches",
]

ALGORITHM: Final = "m.megolm_backup.v1.curve25519-aes-sha2"
MEGOLM_ALGORITHM: Final = "m.megolm.v1.aes-sha2"
# The secret storage name of the private key (a name, not a secret).
SECRET_NAME: Final = "m.megolm_backup.v1"  # noqa: S105
KEY_BYTES: Final = 32
# libolm's truncated MAC; vodozemac accepts shorter ones (even empty): we do not.
MAC_BYTES: Final = 8
# A backed-up key is about 600 bytes of JSON (more with a forwarding chain); far larger
# ciphertext is refused before any crypto (bounds the work on hostile input).
MAX_CIPHERTEXT_CHARS: Final = 65_536
MAX_SESSION_KEY_CHARS: Final = 4_096
MAX_ID_CHARS: Final = 255
MAX_KEY_CHAIN: Final = 64
MAX_CLAIMED_KEYS: Final = 16
# MSC4048 (authenticated key backup), unstable names until it is merged.
MAC_KEY_INFO: Final = b"MATRIX_BACKUP_MAC_KEY"
MAC_SIGNATURE_ID: Final = "org.matrix.msc4048.hmac-sha-256:backup_mac_key"
UNAUTHENTICATED: Final = "org.matrix.msc4048.unauthenticated"
# Megolm message indexes are 32-bit; counts stay in canonical JSON's integer range.
MAX_MESSAGE_INDEX: Final = 2**32 - 1
MAX_COUNT: Final = 2**53 - 1

# Signs canonical JSON bytes; returns (key id such as "ed25519:DEVICEID", unpadded
# base64 signature). The device key and/or the master cross-signing key.
AuthDataSigner = Callable[[bytes], tuple[str, str]]


class BackupError(CryptoError):
    """A backup entry, ``auth_data`` or key that cannot be used (malformed, wrong key,
    bad MAC...). ``reason`` is short and safe to log: never key material."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BackupKeyMismatch(BackupError):
    """The backup's public key is not our private key's: a wrong key from secret
    storage, or another client replaced the backup with one of its own."""


# ------------------------------------------------------------------------ the key


class BackupKey:
    """The backup's Curve25519 key pair. The private half leaves only by `to_base64`;
    repr and str show the public key."""

    __slots__ = ("_decryption", "_secret", "public_key")

    def __init__(self, secret: vodozemac.Curve25519SecretKey) -> None:
        self._secret = secret
        self._decryption = vodozemac.PkDecryption.from_key(secret)
        self.public_key: str = self._decryption.public_key.to_base64()

    @classmethod
    def create(cls) -> BackupKey:
        """A new random key."""
        return cls(vodozemac.Curve25519SecretKey())

    @classmethod
    def from_base64(cls, text: object) -> BackupKey:
        """The key from its unpadded (or padded) base64 32 bytes: the secret
        ``m.megolm_backup.v1`` as secret storage keeps it. `BackupError` for anything
        else (the message never quotes the input)."""
        try:
            raw = b64decode(text)
        except ValueError:
            raise BackupError("the backup key is not base64") from None
        if len(raw) != KEY_BYTES:
            raise BackupError(f"the backup key is {KEY_BYTES} bytes, not {len(raw)}")
        return cls(vodozemac.Curve25519SecretKey.from_bytes(raw))

    def to_base64(self) -> str:
        """The private key, unpadded base64: a secret (for secret storage only)."""
        return b64encode(self._secret.to_bytes())

    def auth_data(self) -> dict[str, object]:
        """The unsigned ``auth_data``: ``{"public_key": ...}``."""
        return {"public_key": self.public_key}

    def signed_auth_data(
        self, user_id: str, signers: Iterable[AuthDataSigner]
    ) -> dict[str, object]:
        """``auth_data`` signed by each signer under ``signatures[user_id][key_id]``
        (the canonical JSON of ``{"public_key"}``), what ``POST /room_keys/version``
        takes. With no signers, no ``signatures``."""
        auth = self.auth_data()
        message = canonical_json(auth)
        signatures: dict[str, str] = {}
        for signer in signers:
            key_id, signature = signer(message)
            signatures[key_id] = signature
        if signatures:
            auth["signatures"] = {user_id: signatures}
        return auth

    def matches(self, auth_data: object) -> bool:
        """Whether ``auth_data``'s public key is ours. Never raises."""
        try:
            return public_key_from_auth_data(auth_data) == self.public_key
        except BackupError:
            return False

    def mac_key(self) -> bytes:
        """MSC4048's backup MAC key: HKDF-SHA256 of the private key, no salt, info
        ``MATRIX_BACKUP_MAC_KEY``, 32 bytes. A secret."""
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=MAC_KEY_INFO)
        return hkdf.derive(self._secret.to_bytes())

    def _decrypt(self, message: vodozemac.Message) -> bytes:
        return self._decryption.decrypt(message)

    def __repr__(self) -> str:
        return f"BackupKey(public_key={self.public_key!r})"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        # pickle/copy would carry the private key out of sight of `to_base64`.
        raise TypeError("BackupKey cannot be pickled: use to_base64")


def _curve_key(value: object, what: str) -> bytes:
    if not isinstance(value, str) or len(value) > 64:
        raise BackupError(f"{what} is not a Curve25519 key")
    try:
        raw = b64decode(value)
    except ValueError:
        raise BackupError(f"{what} is not base64") from None
    if len(raw) != KEY_BYTES:
        raise BackupError(f"{what} is not {KEY_BYTES} bytes")
    return raw


def public_key_from_auth_data(auth_data: object) -> str:
    """The backup's public key from a version's ``auth_data`` (unpadded base64, as
    given). `BackupError` when it is missing or not a 32-byte key."""
    if not isinstance(auth_data, Mapping):
        raise BackupError("auth_data is not an object")
    public = auth_data.get("public_key")
    _curve_key(public, "the backup's public_key")
    assert isinstance(public, str)
    # One spelling: padded base64 of the same key still names the same key.
    return public.rstrip("=")


def public_key_matches(auth_data: object, public_key: str) -> bool:
    """Whether ``auth_data`` names ``public_key`` (either base64 padding). Never raises."""
    try:
        return public_key_from_auth_data(auth_data) == public_key.rstrip("=")
    except BackupError:
        return False


def check_auth_data(auth_data: object, backup_key: BackupKey) -> None:
    """Check that the backup whose ``auth_data`` this is can be read and written with
    ``backup_key``. `BackupKeyMismatch` when its public key is another one (wrong key
    in secret storage, or another client replaced the backup); `BackupError` when
    ``auth_data`` is malformed. Signatures are not checked: holding the private key
    is the trust (spec: "deriving the public key from a private key ... obtained from
    a trusted source"); ``canonical.verify`` checks them when that is needed."""
    if public_key_from_auth_data(auth_data) != backup_key.public_key:
        raise BackupKeyMismatch("the backup's public key is not our backup key's")


# ------------------------------------------------------------------- backing up


@dataclass(frozen=True, slots=True)
class RoomKeyToBackUp:
    """One inbound Megolm session as plain values: the room key to back up.

    ``session_key`` is the session exported at ``first_message_index`` (vodozemac
    ``InboundGroupSession.export_at(first_known_index).to_base64()``): a secret.
    ``verified``: whether we verified the device the key came from (``is_verified``).
    ``authenticated``: whether the key came from its owner (a direct ``m.room_key``, or
    an authenticated backup entry); False writes MSC4048's ``unauthenticated`` marker.
    """

    room_id: str
    session_id: str
    sender_curve25519: str
    sender_claimed_ed25519: str
    session_key: str = field(repr=False)
    first_message_index: int
    forwarded_count: int = 0
    verified: bool = False
    forwarding_curve25519_key_chain: tuple[str, ...] = ()
    authenticated: bool = False


def _count(value: object, limit: int) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        return None
    return value


def _check_to_back_up(session: RoomKeyToBackUp) -> None:
    for name in ("room_id", "session_id", "sender_curve25519", "sender_claimed_ed25519"):
        value = getattr(session, name)
        if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS:
            raise ValueError(f"the session's {name} is not a short string")
    if _count(session.first_message_index, MAX_MESSAGE_INDEX) is None:
        raise ValueError("first_message_index is not a megolm message index")
    if _count(session.forwarded_count, MAX_COUNT) is None:
        raise ValueError("forwarded_count is not a count")
    if not isinstance(session.verified, bool) or not isinstance(session.authenticated, bool):
        raise ValueError("verified and authenticated are bools")
    if not all(isinstance(k, str) for k in session.forwarding_curve25519_key_chain):
        raise ValueError("the forwarding chain holds a non-string")
    imported = _import_session_key(session.session_key)
    if imported is None:
        raise ValueError("session_key is not an exported megolm session key")
    if imported.session_id != session.session_id:
        raise ValueError("session_key is not the key of session_id")
    if imported.first_known_index != session.first_message_index:
        raise ValueError("session_key is not exported at first_message_index")


def _import_session_key(session_key: object) -> vodozemac.InboundGroupSession | None:
    if not isinstance(session_key, str) or not 0 < len(session_key) <= MAX_SESSION_KEY_CHARS:
        return None
    try:
        return vodozemac.InboundGroupSession.import_session(
            vodozemac.ExportedSessionKey(session_key)
        )
    except ValueError:  # vodozemac's decode errors are ValueErrors
        return None


def encrypt_session(public_key: str, session: RoomKeyToBackUp) -> dict[str, str]:
    """The ``session_data`` (``{"ephemeral", "ciphertext", "mac"}``, unpadded base64)
    of ``session`` encrypted to the backup's ``public_key``. ValueError for a
    malformed session (ours: a bug) or public key (check ``auth_data`` first)."""
    try:
        raw = _curve_key(public_key, "the backup's public key")
    except BackupError as exc:
        raise ValueError(exc.reason) from None
    _check_to_back_up(session)
    plain: dict[str, object] = {
        "algorithm": MEGOLM_ALGORITHM,
        "sender_key": session.sender_curve25519,
        "sender_claimed_keys": {"ed25519": session.sender_claimed_ed25519},
        "session_key": session.session_key,
        "forwarding_curve25519_key_chain": list(session.forwarding_curve25519_key_chain),
    }
    if not session.authenticated:
        plain[UNAUTHENTICATED] = "m.forwarded_room_key"
    encryption = vodozemac.PkEncryption.from_key(vodozemac.Curve25519PublicKey.from_bytes(raw))
    message = encryption.encrypt(canonical_json(plain))
    return {
        "ephemeral": b64encode(message.ephemeral_key),
        "ciphertext": b64encode(message.ciphertext),
        "mac": b64encode(message.mac),
    }


def backup_data(public_key: str, session: RoomKeyToBackUp) -> dict[str, object]:
    """The whole ``KeyBackupData`` of ``session`` for ``PUT /room_keys/keys``:
    ``first_message_index``, ``forwarded_count``, ``is_verified``, ``session_data``.
    ValueError like `encrypt_session`."""
    return {
        "first_message_index": session.first_message_index,
        "forwarded_count": session.forwarded_count,
        "is_verified": session.verified,
        "session_data": encrypt_session(public_key, session),
    }


def authenticated_backup_data(
    backup_key: BackupKey, user_id: str, session: RoomKeyToBackUp
) -> dict[str, object]:
    """`backup_data` whose ``session_data`` also carries MSC4048's HMAC under
    ``backup_key``'s MAC key, as ``signatures[user_id]`` (only a holder of the private
    key can make it, so `decrypt_session` can tell it from an entry anyone wrote)."""
    data = backup_data(backup_key.public_key, session)
    session_data = data["session_data"]
    assert isinstance(session_data, dict)
    session_data["signatures"] = {
        user_id: {MAC_SIGNATURE_ID: _session_data_mac(backup_key, session_data)}
    }
    return data


def _session_data_mac(backup_key: BackupKey, session_data: Mapping[str, object]) -> str:
    # Canonical JSON as for signing: everything but signatures and unsigned.
    signed = {k: v for k, v in session_data.items() if k not in ("signatures", "unsigned")}
    digest = hmac.new(backup_key.mac_key(), canonical_json(signed), hashlib.sha256).digest()
    return b64encode(digest)


def _has_valid_mac(backup_key: BackupKey, user_id: str, session_data: object) -> bool:
    if not user_id or not isinstance(session_data, Mapping):
        return False
    signatures = session_data.get("signatures")
    mine = signatures.get(user_id) if isinstance(signatures, Mapping) else None
    mac = mine.get(MAC_SIGNATURE_ID) if isinstance(mine, Mapping) else None
    if not isinstance(mac, str) or len(mac) > 64:
        return False
    try:
        expected = _session_data_mac(backup_key, session_data)
    except (TypeError, ValueError):  # not canonical-JSON-able (floats, huge ints...)
        return False
    return hmac.compare_digest(mac.rstrip("="), expected)


def _rank(data: object) -> tuple[bool, int, int] | None:
    """Smaller is better: (not verified, first index, forwarded count)."""
    if not isinstance(data, Mapping):
        return None
    verified = data.get("is_verified")
    index = _count(data.get("first_message_index"), MAX_MESSAGE_INDEX)
    forwarded = _count(data.get("forwarded_count"), MAX_COUNT)
    if not isinstance(verified, bool) or index is None or forwarded is None:
        return None
    return (not verified, index, forwarded)


def is_better_copy(candidate: object, current: object | None) -> bool:
    """Whether the ``KeyBackupData`` ``candidate`` should replace ``current`` for one
    session, by the spec's (and the server's) order: verified first, then the lower
    ``first_message_index``, then the lower ``forwarded_count``. Equal -> False (keep
    what is there). A malformed ``candidate`` never wins; a missing or malformed
    ``current`` always loses to a well-formed one. Never raises."""
    mine = _rank(candidate)
    if mine is None:
        return False
    theirs = _rank(current)
    return theirs is None or mine < theirs


# -------------------------------------------------------------------- restoring


@dataclass(frozen=True, slots=True)
class BackedUpSession:
    """One decrypted, validated backup entry (``BackedUpSessionData`` plus where it was
    filed). ``session_key`` is a secret; ``first_known_index`` is the first index the
    key decrypts (from the key, not the server's metadata); ``is_verified`` and
    ``forwarded_count`` are the uploader's word. ``sender_claimed_keys`` keeps the
    ``ed25519`` claim only (the one the spec defines). ``authenticated``: the entry
    carries a valid MSC4048 HMAC (so a holder of the private key wrote it) and no
    ``unauthenticated`` marker: its sender keys are as trustworthy as the uploader's
    own copy was."""

    room_id: str
    session_id: str
    algorithm: str
    sender_key: str
    sender_claimed_keys: Mapping[str, str]
    session_key: str = field(repr=False)
    forwarding_curve25519_key_chain: tuple[str, ...]
    first_known_index: int
    forwarded_count: int
    is_verified: bool
    authenticated: bool = False

    @property
    def sender_claimed_ed25519(self) -> str:
        return self.sender_claimed_keys["ed25519"]

    def forwarded_room_key_content(self) -> dict[str, object]:
        """The entry as an ``m.forwarded_room_key`` content, which
        ``GroupSessions.add_forwarded_room_key`` imports (untrusted, as it should be:
        see the module docstring)."""
        return {
            "algorithm": self.algorithm,
            "room_id": self.room_id,
            "sender_key": self.sender_key,
            "session_id": self.session_id,
            "session_key": self.session_key,
            "sender_claimed_ed25519_key": self.sender_claimed_ed25519,
            "forwarding_curve25519_key_chain": list(self.forwarding_curve25519_key_chain),
        }


@dataclass(frozen=True, slots=True)
class SessionRefusal:
    """A backup entry `decrypt_room_keys` could not use, and why (safe to log)."""

    room_id: str
    session_id: str
    reason: str


def _session_data(data: Mapping[str, object]) -> vodozemac.Message:
    session_data = data.get("session_data")
    if not isinstance(session_data, Mapping):
        raise BackupError("session_data is not an object")
    ciphertext = session_data.get("ciphertext")
    if not isinstance(ciphertext, str) or not ciphertext:
        raise BackupError("session_data has no ciphertext")
    if len(ciphertext) > MAX_CIPHERTEXT_CHARS:
        raise BackupError("the ciphertext is too long for a room key")
    ephemeral = _curve_key(session_data.get("ephemeral"), "the ephemeral key")
    try:
        raw_ciphertext = b64decode(ciphertext)
        mac = b64decode(session_data.get("mac"))
    except ValueError:
        raise BackupError("the ciphertext or mac is not base64") from None
    if len(mac) != MAC_BYTES:
        raise BackupError(f"the mac is not {MAC_BYTES} bytes")
    # AES-CBC: whole 16-byte blocks; vodozemac would say "padding", this says more.
    if len(raw_ciphertext) % 16:
        raise BackupError("the ciphertext is not whole AES blocks")
    return vodozemac.Message(raw_ciphertext, mac, ephemeral)


def _plaintext(backup_key: BackupKey, message: vodozemac.Message) -> Mapping[str, object]:
    try:
        plain = backup_key._decrypt(message)
    except ValueError as exc:
        # PkDecodeException: a MAC mismatch is a wrong key (or tampering); anything
        # else (padding, weak ephemeral key) is a damaged entry.
        if "MAC" in str(exc):
            raise BackupError("the mac does not match (another backup key?)") from None
        raise BackupError("the ciphertext does not decrypt") from None
    try:
        obj = json.loads(plain.decode("utf-8"))
    except (ValueError, RecursionError):
        raise BackupError("the plaintext is not JSON") from None
    if not isinstance(obj, dict):
        raise BackupError("the plaintext is not a JSON object")
    return obj


def _claimed_ed25519(plain: Mapping[str, object]) -> str:
    claimed = plain.get("sender_claimed_keys")
    if not isinstance(claimed, Mapping) or len(claimed) > MAX_CLAIMED_KEYS:
        raise BackupError("sender_claimed_keys is not a small object")
    ed25519 = claimed.get("ed25519")
    if not isinstance(ed25519, str) or len(ed25519) > 64:
        raise BackupError("sender_claimed_keys has no ed25519 key")
    try:
        if len(b64decode(ed25519)) != KEY_BYTES:
            raise ValueError
        # A point on the curve, as matrix-rust-sdk requires (it drops the entry).
        vodozemac.Ed25519PublicKey.from_base64(ed25519)
    except ValueError:
        raise BackupError("the claimed ed25519 key is not an Ed25519 public key") from None
    return ed25519


def _key_chain(plain: Mapping[str, object]) -> tuple[str, ...]:
    chain = plain.get("forwarding_curve25519_key_chain", [])
    if not isinstance(chain, list) or len(chain) > MAX_KEY_CHAIN:
        raise BackupError("forwarding_curve25519_key_chain is not a short list")
    for item in chain:
        _curve_key(item, "a forwarding chain key")
    return tuple(chain)


def decrypt_session(
    backup_key: BackupKey,
    key_backup_data: object,
    *,
    room_id: str,
    session_id: str,
    user_id: str = "",
) -> BackedUpSession:
    """Decrypt and validate the ``KeyBackupData`` filed under ``rooms[room_id]
    .sessions[session_id]``. `BackupError` for: malformed data (types, sizes, base64),
    a MAC that does not match (another backup key), a ciphertext that does not
    decrypt, a plaintext that is not a JSON object with ``algorithm``
    ``m.megolm.v1.aes-sha2``, a 32-byte ``sender_key``, an ``ed25519`` claimed key, a
    short ``forwarding_curve25519_key_chain`` of keys (a missing one is empty), and a
    ``session_key`` that imports and is the key of ``session_id``. ``user_id``: the
    account whose MSC4048 HMAC makes the entry ``authenticated`` (empty: none is)."""
    if not isinstance(key_backup_data, Mapping):
        raise BackupError("the key backup data is not an object")
    if _count(key_backup_data.get("first_message_index"), MAX_MESSAGE_INDEX) is None:
        raise BackupError("first_message_index is not a message index")
    forwarded = _count(key_backup_data.get("forwarded_count"), MAX_COUNT)
    if forwarded is None:
        raise BackupError("forwarded_count is not a count")
    verified = key_backup_data.get("is_verified")
    if not isinstance(verified, bool):
        raise BackupError("is_verified is not a bool")
    message = _session_data(key_backup_data)
    mac_ok = _has_valid_mac(backup_key, user_id, key_backup_data.get("session_data"))
    plain = _plaintext(backup_key, message)
    authenticated = mac_ok and UNAUTHENTICATED not in plain
    if plain.get("algorithm") != MEGOLM_ALGORITHM:
        raise BackupError("the backed-up key is not for m.megolm.v1.aes-sha2")
    sender_key = plain.get("sender_key")
    _curve_key(sender_key, "sender_key")
    assert isinstance(sender_key, str)
    claimed = _claimed_ed25519(plain)
    chain = _key_chain(plain)
    session_key = plain.get("session_key")
    imported = _import_session_key(session_key)
    if imported is None:
        raise BackupError("session_key is not an exported megolm session key")
    if imported.session_id != session_id:
        raise BackupError("session_key is not the key of the session it is filed under")
    assert isinstance(session_key, str)
    return BackedUpSession(
        room_id=room_id,
        session_id=session_id,
        algorithm=MEGOLM_ALGORITHM,
        sender_key=sender_key,
        sender_claimed_keys={"ed25519": claimed},
        session_key=session_key,
        forwarding_curve25519_key_chain=chain,
        first_known_index=imported.first_known_index,
        forwarded_count=forwarded,
        is_verified=verified,
        authenticated=authenticated,
    )


def decrypt_room_keys(
    backup_key: BackupKey, rooms: Mapping[str, object], *, user_id: str = ""
) -> tuple[list[BackedUpSession], list[SessionRefusal]]:
    """Every entry of a ``GET /room_keys/keys`` answer (``rooms[room_id][session_id]``
    -> ``KeyBackupData``, as ``matrix_api``'s ``RoomKeys.rooms`` holds it): the
    sessions that decrypt, and one refusal per entry that does not. Never raises for
    hostile entries."""
    sessions: list[BackedUpSession] = []
    refused: list[SessionRefusal] = []
    for room_id, by_session in rooms.items():
        if not isinstance(by_session, Mapping):
            refused.append(
                SessionRefusal(str(room_id), "", "the room's sessions are not an object")
            )
            continue
        for session_id, data in by_session.items():
            try:
                sessions.append(
                    decrypt_session(
                        backup_key, data, room_id=room_id, session_id=session_id, user_id=user_id
                    )
                )
            except BackupError as exc:
                refused.append(SessionRefusal(room_id, session_id, exc.reason))
    return sessions, refused
