"""Cross-signing keys and secret storage (SSSS) crypto, sans-IO.

Cross-signing: the account's master, self-signing and user-signing Ed25519 keys
(`CrossSigningKeys`), their public objects as ``/keys/device_signing/upload`` takes
them, and the signatures ``/keys/signatures/upload`` takes (our device signed by the
self-signing key, another user's master key by the user-signing key). vodozemac has
no standalone Ed25519 signing key, so the private keys are `cryptography`'s.
`verify_cross_signing_keys` and `device_signed_by_self_signing_key` check what the
server hands out; they never raise on hostile input (False).

Secret storage (``m.secret_storage.v1.aes-hmac-sha2``): the recovery key format
(`encode_recovery_key` / `decode_recovery_key`), per-secret keys from HKDF-SHA256,
AES-CTR-256 + HMAC-SHA256 encryption of a secret (`encrypt_secret` /
`decrypt_secret`), and the key description's check value that tells a wrong
recovery key (`key_check` / `check_key`); keys from an ``m.pbkdf2`` passphrase
(`key_from_passphrase`). `SecretStorageKey` ties them to a key id.

Secrets: the private keys and the secret storage key are never in a repr, str or
error message. `CrossSigningKeys.export` hands out the raw 32-byte seeds (unpadded
base64, the form secret storage keeps under ``m.cross_signing.*``), and
`CrossSigningKeys.to_record` a `CrossSigningRecord` whose private part is encrypted
with the caller's 32-byte pickle key.
"""

from __future__ import annotations

import json
import os
import secrets
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from matrix_crypto.canonical import b64decode, b64encode, sign, verify
from matrix_crypto.errors import CryptoError

__all__ = [
    "MASTER",
    "SECRET_MASTER",
    "SECRET_SELF_SIGNING",
    "SECRET_USER_SIGNING",
    "SELF_SIGNING",
    "SSSS_ALGORITHM",
    "USER_SIGNING",
    "CrossSigningKeys",
    "CrossSigningRecord",
    "RecoveryKeyError",
    "SecretDecryptionError",
    "SecretStorageError",
    "SecretStorageKey",
    "SigningKey",
    "WrongRecoveryKey",
    "check_key",
    "cross_signing_public_key",
    "decode_recovery_key",
    "decrypt_secret",
    "derive_keys",
    "device_signed_by_self_signing_key",
    "encode_recovery_key",
    "encrypt_secret",
    "key_check",
    "key_from_passphrase",
    "verify_cross_signing_keys",
]

MASTER: Final = "master"
SELF_SIGNING: Final = "self_signing"
USER_SIGNING: Final = "user_signing"
USAGES: Final = (MASTER, SELF_SIGNING, USER_SIGNING)

# The secret names the spec gives the private keys in secret storage (names, not
# secrets: hence the noqa for "hardcoded password").
SECRET_MASTER: Final = "m.cross_signing.master"  # noqa: S105
SECRET_SELF_SIGNING: Final = "m.cross_signing.self_signing"  # noqa: S105
SECRET_USER_SIGNING: Final = "m.cross_signing.user_signing"  # noqa: S105
_SECRET_NAMES: Final = {
    MASTER: SECRET_MASTER,
    SELF_SIGNING: SECRET_SELF_SIGNING,
    USER_SIGNING: SECRET_USER_SIGNING,
}

SSSS_ALGORITHM: Final = "m.secret_storage.v1.aes-hmac-sha2"
SECRET_STORAGE_KEY_PREFIX: Final = "m.secret_storage.key."  # noqa: S105
KEY_BYTES: Final = 32
IV_BYTES: Final = 16
MAC_BYTES: Final = 32
# HKDF info of the record's encrypted private keys: not a secret storage name, so a
# record's ciphertext can never be passed off as a secret or the other way round.
_RECORD_SECRET_NAME: Final = "surfaces-bot.cross_signing.v1"  # noqa: S105

# The recovery key: 0x8B 0x01, the 32 key bytes, a parity byte; base58 (Bitcoin's
# alphabet), in groups of four characters.
_RECOVERY_PREFIX: Final = b"\x8b\x01"
_RECOVERY_BYTES: Final = len(_RECOVERY_PREFIX) + KEY_BYTES + 1
_BASE58: Final = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_BASE58_INDEX: Final = {c: i for i, c in enumerate(_BASE58)}
# Every 35 bytes starting 0x8B 0x01 are 48 base58 characters (58**47 < 0x8B01 << 264
# and 0x8B02 << 264 < 58**48), so a count off by one is told as such. Longer input is
# refused before any arithmetic (bounds the big-integer work on hostile input).
_RECOVERY_CHARS: Final = 48
_MAX_RECOVERY_CHARS: Final = 64
# A key description's PBKDF2 iteration count comes from account data: bounded, so a
# hostile one cannot stall start-up for long (clients use 500 000: 0.4 s measured here;
# the bound is about 8 s).
MAX_PBKDF2_ITERATIONS: Final = 10_000_000


# ----------------------------------------------------------------------------- errors


class SecretStorageError(CryptoError):
    """Secret storage cannot be used as asked. Messages never quote keys or secrets."""


class RecoveryKeyError(SecretStorageError):
    """The recovery key text is not a well-formed recovery key (a typo, most likely).
    The message says what is wrong and where, never the key itself."""


class WrongRecoveryKey(SecretStorageError):
    """A well-formed key that is not the one the key description was made with (its
    check value does not match)."""


class SecretDecryptionError(SecretStorageError):
    """An encrypted secret that is malformed or fails its MAC (wrong key, wrong secret
    name, or tampered with)."""


# ----------------------------------------------------------------------- signing keys


class SigningKey:
    """One Ed25519 cross-signing key pair. The private half never leaves except by
    `export_seed`; repr and str show the public key only."""

    __slots__ = ("_private", "public_key")

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public_key: str = b64encode(private.public_key().public_bytes_raw())

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: object) -> SigningKey:
        """From the unpadded base64 32-byte seed (`export_seed`). ValueError for
        anything else (the message never quotes the input)."""
        raw = b64decode(seed)
        if len(raw) != KEY_BYTES:
            raise ValueError(f"a signing key seed is {KEY_BYTES} bytes, not {len(raw)}")
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    def export_seed(self) -> str:
        """The private key: its 32-byte seed, unpadded base64. A secret."""
        return b64encode(self._private.private_bytes_raw())

    @property
    def key_id(self) -> str:
        """``ed25519:<public key>``, the id cross-signing keys sign and are signed under."""
        return f"ed25519:{self.public_key}"

    def sign(self, message: bytes) -> str:
        """The unpadded base64 Ed25519 signature of ``message`` (a `canonical.Signer`)."""
        return b64encode(self._private.sign(message))

    def __repr__(self) -> str:
        return f"SigningKey(public_key={self.public_key!r})"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        # pickle/copy would carry the private key out of sight of `export_seed`.
        raise TypeError("SigningKey cannot be pickled: use export_seed")


@dataclass(frozen=True, slots=True)
class CrossSigningRecord:
    """What the store keeps of the account's cross-signing keys: the public keys in
    clear, the private ones in ``pickle`` (the three seeds encrypted with the pickle
    key, AES-CTR + HMAC as secret storage does it). Flat strings, like state.py's."""

    user_id: str
    master_key: str
    self_signing_key: str
    user_signing_key: str
    pickle: str = field(repr=False)  # never in a log line


@dataclass(frozen=True, slots=True)
class CrossSigningKeys:
    """The account's three cross-signing keys (private halves included)."""

    user_id: str
    master: SigningKey
    self_signing: SigningKey
    user_signing: SigningKey

    @classmethod
    def create(cls, user_id: str) -> CrossSigningKeys:
        """Three new keys for ``user_id``."""
        return cls(user_id, SigningKey.generate(), SigningKey.generate(), SigningKey.generate())

    # ------------------------------------------------------------------ public objects

    def _public_object(self, usage: str, key: SigningKey) -> dict[str, object]:
        return {
            "user_id": self.user_id,
            "usage": [usage],
            "keys": {key.key_id: key.public_key},
        }

    def master_key(self) -> dict[str, object]:
        """The master key object (unsigned: nothing above it)."""
        return self._public_object(MASTER, self.master)

    def self_signing_key(self) -> dict[str, object]:
        """The self-signing key object, signed by the master key."""
        return self._sign_with_master(self._public_object(SELF_SIGNING, self.self_signing))

    def user_signing_key(self) -> dict[str, object]:
        """The user-signing key object, signed by the master key."""
        return self._sign_with_master(self._public_object(USER_SIGNING, self.user_signing))

    def _sign_with_master(self, obj: Mapping[str, object]) -> dict[str, object]:
        return sign(obj, self.user_id, self.master.key_id, self.master.sign)

    def upload_body(self) -> dict[str, Any]:
        """The ``/keys/device_signing/upload`` body without ``auth`` (the caller adds
        the user-interactive auth). Signatures are deterministic: the same keys give
        the same body, so a retried upload is the "same keys" the server accepts."""
        return {
            "master_key": self.master_key(),
            "self_signing_key": self.self_signing_key(),
            "user_signing_key": self.user_signing_key(),
        }

    @property
    def public_keys(self) -> dict[str, str]:
        """usage -> unpadded base64 public key."""
        return {
            MASTER: self.master.public_key,
            SELF_SIGNING: self.self_signing.public_key,
            USER_SIGNING: self.user_signing.public_key,
        }

    def matches(
        self, master: object, self_signing: object, user_signing: object | None = None
    ) -> bool:
        """Whether the server's key objects (from ``/keys/query``) are these keys,
        validly signed. ``user_signing`` None skips that key (not every answer has it)."""
        if not verify_cross_signing_keys(self.user_id, master, self_signing, user_signing):
            return False
        found = {
            MASTER: cross_signing_public_key(master, self.user_id, MASTER),
            SELF_SIGNING: cross_signing_public_key(self_signing, self.user_id, SELF_SIGNING),
        }
        if user_signing is not None:
            found[USER_SIGNING] = cross_signing_public_key(user_signing, self.user_id, USER_SIGNING)
        mine = self.public_keys
        return all(mine[usage] == key for usage, key in found.items())

    # ---------------------------------------------------------------------- signatures

    def sign_device(self, device_keys: Mapping[str, object]) -> dict[str, Any]:
        """The ``/keys/signatures/upload`` body that adds the self-signing key's
        signature to one of the account's own devices: ``{user_id: {device_id:
        device_keys + signature}}``. Existing signatures are kept; ``unsigned`` is left
        out (the server compares without it). ValueError for device keys of another
        user or without a device id: our own input, so a bug rather than hostile."""
        if device_keys.get("user_id") != self.user_id:
            raise ValueError("device keys of another user cannot be self-signed")
        device_id = device_keys.get("device_id")
        if not isinstance(device_id, str) or not device_id:
            raise ValueError("device keys without a device_id")
        bare = {k: v for k, v in device_keys.items() if k != "unsigned"}
        signed = sign(bare, self.user_id, self.self_signing.key_id, self.self_signing.sign)
        return {self.user_id: {device_id: signed}}

    def sign_user(self, master_key: Mapping[str, object]) -> dict[str, Any]:
        """The ``/keys/signatures/upload`` body that signs another user's master key
        with our user-signing key (after verifying that user). ValueError for an
        object that is not a well-formed master key of another user."""
        other = master_key.get("user_id")
        if not isinstance(other, str) or other == self.user_id:
            raise ValueError("only another user's master key is signed by the user-signing key")
        public = cross_signing_public_key(master_key, other, MASTER)
        if public is None:
            raise ValueError("not a well-formed master key")
        bare = {k: v for k, v in master_key.items() if k != "unsigned"}
        signed = sign(bare, self.user_id, self.user_signing.key_id, self.user_signing.sign)
        return {other: {public: signed}}

    # ------------------------------------------------------------------- export/import

    def export(self) -> dict[str, str]:
        """Secret name (``m.cross_signing.*``) -> private key seed, unpadded base64:
        what secret storage keeps. Secrets: encrypt before they leave the process."""
        return {
            SECRET_MASTER: self.master.export_seed(),
            SECRET_SELF_SIGNING: self.self_signing.export_seed(),
            SECRET_USER_SIGNING: self.user_signing.export_seed(),
        }

    @classmethod
    def from_export(cls, user_id: str, exported: Mapping[str, object]) -> CrossSigningKeys:
        """The keys back from `export` (or from secret storage). ValueError naming the
        missing or malformed secret (never its value)."""
        keys: dict[str, SigningKey] = {}
        for usage, name in _SECRET_NAMES.items():
            if name not in exported:
                raise ValueError(f"{name} is missing")
            try:
                keys[usage] = SigningKey.from_seed(exported[name])
            except ValueError as exc:
                raise ValueError(f"{name} is not a private key: {exc}") from None
        return cls(user_id, keys[MASTER], keys[SELF_SIGNING], keys[USER_SIGNING])

    def to_record(self, pickle_key: bytes) -> CrossSigningRecord:
        """The record to persist; the private keys encrypted with the 32-byte key."""
        plain = json.dumps(self.export(), sort_keys=True, separators=(",", ":"))
        encrypted = encrypt_secret(pickle_key, _RECORD_SECRET_NAME, plain)
        return CrossSigningRecord(
            user_id=self.user_id,
            master_key=self.master.public_key,
            self_signing_key=self.self_signing.public_key,
            user_signing_key=self.user_signing.public_key,
            pickle=json.dumps(encrypted, sort_keys=True, separators=(",", ":")),
        )

    @classmethod
    def from_record(cls, record: CrossSigningRecord, pickle_key: bytes) -> CrossSigningKeys:
        """The keys from a stored record. `SecretDecryptionError` for a wrong pickle
        key or a damaged record; ValueError if its public keys do not match its
        private ones, or for a pickle key that is not 32 bytes."""
        try:
            encrypted = json.loads(record.pickle)
        except (ValueError, TypeError):
            raise SecretDecryptionError("the cross-signing record is damaged") from None
        plain = decrypt_secret(pickle_key, _RECORD_SECRET_NAME, encrypted)
        try:
            exported = json.loads(plain)
        except ValueError:
            raise SecretDecryptionError("the cross-signing record is damaged") from None
        if not isinstance(exported, dict):
            raise SecretDecryptionError("the cross-signing record is damaged")
        keys = cls.from_export(record.user_id, exported)
        stored = {
            MASTER: record.master_key,
            SELF_SIGNING: record.self_signing_key,
            USER_SIGNING: record.user_signing_key,
        }
        if keys.public_keys != stored:
            raise ValueError("the cross-signing record's public keys are not its private keys")
        return keys


# ----------------------------------------------------------------------- verification


def cross_signing_public_key(obj: object, user_id: str, usage: str) -> str | None:
    """The public key of a well-formed cross-signing key object of ``user_id`` for
    ``usage`` (exactly that usage, exactly one ``ed25519:<key>`` whose value is the
    same 32-byte key), else None. Signatures are not checked here. Never raises."""
    if not isinstance(obj, Mapping):
        return None
    if obj.get("user_id") != user_id or obj.get("usage") != [usage]:
        return None
    keys = obj.get("keys")
    if not isinstance(keys, Mapping) or len(keys) != 1:
        return None
    ((key_id, public),) = keys.items()
    if not isinstance(public, str) or key_id != f"ed25519:{public}":
        return None
    try:
        if len(b64decode(public)) != KEY_BYTES:
            return None
    except ValueError:
        return None
    return public


def _signed_by(obj: object, user_id: str, signer_public: str) -> bool:
    return verify(obj, user_id, f"ed25519:{signer_public}", signer_public)


def verify_cross_signing_keys(
    user_id: str, master: object, self_signing: object, user_signing: object | None = None
) -> bool:
    """Whether these are ``user_id``'s well-formed cross-signing keys with the
    self-signing (and, unless None, user-signing) key validly signed by the master
    key. Other users' user-signing keys are not visible: pass None. Never raises."""
    try:
        master_public = cross_signing_public_key(master, user_id, MASTER)
        if master_public is None:
            return False
        checks = [(self_signing, SELF_SIGNING)]
        if user_signing is not None:
            checks.append((user_signing, USER_SIGNING))
        for obj, usage in checks:
            public = cross_signing_public_key(obj, user_id, usage)
            if public is None or public == master_public:
                return False
            if not _signed_by(obj, user_id, master_public):
                return False
    except (ValueError, TypeError, RecursionError):
        return False
    return True


def device_signed_by_self_signing_key(device_keys: object, self_signing_key_obj: object) -> bool:
    """Whether ``device_keys`` (a device of the self-signing key's owner) carries a
    valid signature of that self-signing key. Does not check the self-signing key
    against the master key: that is `verify_cross_signing_keys`. A device whose id
    is the self-signing key's public key is refused (the spec's key-id collision).
    Never raises."""
    try:
        if not isinstance(device_keys, Mapping) or not isinstance(self_signing_key_obj, Mapping):
            return False
        user_id = self_signing_key_obj.get("user_id")
        if not isinstance(user_id, str) or device_keys.get("user_id") != user_id:
            return False
        public = cross_signing_public_key(self_signing_key_obj, user_id, SELF_SIGNING)
        if public is None:
            return False
        device_id = device_keys.get("device_id")
        if not isinstance(device_id, str) or not device_id or device_id == public:
            return False
        return _signed_by(device_keys, user_id, public)
    except (ValueError, TypeError, RecursionError):
        return False


# ---------------------------------------------------------------------- recovery key


def _base58_encode(data: bytes) -> str:
    number = int.from_bytes(data, "big")
    digits: list[str] = []
    while number:
        number, rest = divmod(number, 58)
        digits.append(_BASE58[rest])
    zeros = len(data) - len(data.lstrip(b"\0"))
    return "1" * zeros + "".join(reversed(digits))


def _parity(data: bytes) -> int:
    parity = 0
    for byte in data:
        parity ^= byte
    return parity


def encode_recovery_key(key: bytes) -> str:
    """The 32-byte secret storage key as the user writes it down: prefix 0x8B 0x01,
    the key, a parity byte (XOR of all the bytes before it), base58, groups of four
    characters separated by spaces."""
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ValueError(f"a secret storage key is {KEY_BYTES} bytes")
    data = _RECOVERY_PREFIX + key
    text = _base58_encode(data + bytes([_parity(data)]))
    return " ".join(text[i : i + 4] for i in range(0, len(text), 4))


def decode_recovery_key(text: object) -> bytes:
    """The 32-byte key from a recovery key (whitespace anywhere is ignored).

    `RecoveryKeyError` says what is wrong: a character base58 never uses (0, O, I,
    l...) and where, a character missing or extra (wrong length), not a recovery key
    at all (prefix), or a typo caught by the parity byte. One changed character
    passes the parity byte about once in 256; the key description's check value
    (`check_key`) catches those.
    """
    if not isinstance(text, str):
        raise RecoveryKeyError("the recovery key is not text")
    compact = "".join(text.split())
    if not compact:
        raise RecoveryKeyError("the recovery key is empty")
    if len(compact) > _MAX_RECOVERY_CHARS:
        raise RecoveryKeyError(
            f"the recovery key is too long ({len(compact)} characters without spaces; "
            f"one has {_RECOVERY_CHARS})"
        )
    number = 0
    for position, char in enumerate(compact, start=1):
        digit = _BASE58_INDEX.get(char)
        if digit is None:
            what = repr(char) if char.isascii() and char.isprintable() else "a character"
            raise RecoveryKeyError(
                f"character {position} of the recovery key ({what}) is never used in one "
                "(recovery keys have no 0, O, I or l): check for a typo"
            )
        number = number * 58 + digit
    if len(compact) != _RECOVERY_CHARS:
        raise RecoveryKeyError(
            f"the recovery key has the wrong length ({len(compact)} characters without "
            f"spaces; one has {_RECOVERY_CHARS}): a character is missing or extra"
        )
    zeros = len(compact) - len(compact.lstrip("1"))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    data = b"\0" * zeros + body
    if len(data) != _RECOVERY_BYTES or data[: len(_RECOVERY_PREFIX)] != _RECOVERY_PREFIX:
        raise RecoveryKeyError("this is not a recovery key (they start with Es)")
    if _parity(data) != 0:
        raise RecoveryKeyError(
            "the recovery key has a typo (its check byte does not match): "
            "compare it character by character"
        )
    return data[len(_RECOVERY_PREFIX) : -1]


# --------------------------------------------------------------- secret storage crypto


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ValueError(f"a secret storage key is {KEY_BYTES} bytes")


def derive_keys(key: bytes, name: str) -> tuple[bytes, bytes]:
    """(AES key, HMAC key) for the secret ``name``: HKDF-SHA256 of ``key`` with a
    salt of 32 zero bytes and ``name`` as info, 64 bytes split in two."""
    _check_key(key)
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=2 * KEY_BYTES,
        salt=bytes(KEY_BYTES),
        info=name.encode("utf-8"),
    ).derive(key)
    return okm[:KEY_BYTES], okm[KEY_BYTES:]


def _new_iv() -> bytes:
    iv = bytearray(os.urandom(IV_BYTES))
    # Bit 63 cleared, as the spec says: AES-CTR implementations with a 64-bit counter
    # would otherwise wrap differently from those with a 128-bit one.
    iv[8] &= 0x7F
    return bytes(iv)


def _aes_ctr(aes_key: bytes, iv: bytes, data: bytes) -> bytes:
    # CTR: encryption and decryption are the same keystream XOR.
    encryptor = Cipher(algorithms.AES(aes_key), modes.CTR(iv)).encryptor()
    return encryptor.update(data) + encryptor.finalize()


def _mac(mac_key: bytes, data: bytes) -> bytes:
    h = hmac.HMAC(mac_key, hashes.SHA256())
    h.update(data)
    return h.finalize()


def _mac_matches(mac_key: bytes, data: bytes, expected: bytes) -> bool:
    h = hmac.HMAC(mac_key, hashes.SHA256())
    h.update(data)
    try:
        h.verify(expected)  # constant time
    except InvalidSignature:
        return False
    return True


def encrypt_secret(
    key: bytes, name: str, secret: str, *, iv: bytes | None = None
) -> dict[str, str]:
    """``{"iv", "ciphertext", "mac"}`` (unpadded base64) of the secret ``name``
    encrypted with the 32-byte secret storage ``key``. ``iv``: tests only."""
    aes_key, mac_key = derive_keys(key, name)
    if iv is None:
        iv = _new_iv()
    elif len(iv) != IV_BYTES:
        raise ValueError(f"the IV is {IV_BYTES} bytes")
    ciphertext = _aes_ctr(aes_key, iv, secret.encode("utf-8"))
    return {
        "iv": b64encode(iv),
        "ciphertext": b64encode(ciphertext),
        "mac": b64encode(_mac(mac_key, ciphertext)),
    }


def _field(data: Mapping[str, object], name: str, size: int | None) -> bytes:
    try:
        raw = b64decode(data.get(name))
    except ValueError:
        raise SecretDecryptionError(f"the encrypted secret's {name} is not base64") from None
    if size is not None and len(raw) != size:
        raise SecretDecryptionError(f"the encrypted secret's {name} is not {size} bytes")
    return raw


def decrypt_secret(key: bytes, name: str, encrypted: object) -> str:
    """The secret ``name`` from its ``{"iv", "ciphertext", "mac"}`` (padded or
    unpadded base64). `SecretDecryptionError` for malformed data, a MAC that does not
    match (wrong key, wrong name, tampering) or a plaintext that is not UTF-8."""
    _check_key(key)
    if not isinstance(encrypted, Mapping):
        raise SecretDecryptionError("the encrypted secret is not an object")
    iv = _field(encrypted, "iv", IV_BYTES)
    ciphertext = _field(encrypted, "ciphertext", None)
    mac = _field(encrypted, "mac", MAC_BYTES)
    aes_key, mac_key = derive_keys(key, name)
    if not _mac_matches(mac_key, ciphertext, mac):
        raise SecretDecryptionError(f"the MAC of {name} does not match (wrong key?)")
    try:
        return _aes_ctr(aes_key, iv, ciphertext).decode("utf-8")
    except UnicodeDecodeError:
        raise SecretDecryptionError(f"{name} is not text") from None


def key_check(key: bytes, *, iv: bytes | None = None) -> dict[str, str]:
    """The key description's check value: ``{"iv", "mac"}`` of 32 zero bytes
    encrypted under the empty secret name (the ciphertext is dropped)."""
    encrypted = encrypt_secret(key, "", "\0" * KEY_BYTES, iv=iv)
    return {"iv": encrypted["iv"], "mac": encrypted["mac"]}


def check_key(key: bytes, description: object) -> bool:
    """Whether ``key`` is the key the ``m.secret_storage.key.*`` ``description`` was
    made with. A description without ``iv`` and ``mac`` says nothing: True, as the
    spec says. False for another algorithm or a malformed check value; never raises
    for hostile input (ValueError only for a ``key`` that is not 32 bytes)."""
    _check_key(key)
    if not isinstance(description, Mapping) or description.get("algorithm") != SSSS_ALGORITHM:
        return False
    if description.get("iv") is None and description.get("mac") is None:
        return True
    try:
        iv = b64decode(description.get("iv"))
        mac = b64decode(description.get("mac"))
    except ValueError:
        return False
    if len(iv) != IV_BYTES or len(mac) != MAC_BYTES:
        return False
    aes_key, mac_key = derive_keys(key, "")
    return _mac_matches(mac_key, _aes_ctr(aes_key, iv, bytes(KEY_BYTES)), mac)


def key_from_passphrase(passphrase: str, description: object) -> bytes:
    """The 32-byte key from a passphrase, as the description's ``passphrase``
    (``m.pbkdf2``: PBKDF2-HMAC-SHA512, its salt and iterations) says. Check the result
    with `check_key`. `SecretStorageError` for a description without a usable
    ``m.pbkdf2`` passphrase (another algorithm, bits other than 256, iterations out of
    1..`MAX_PBKDF2_ITERATIONS`)."""
    info = description.get("passphrase") if isinstance(description, Mapping) else None
    if not isinstance(info, Mapping) or info.get("algorithm") != "m.pbkdf2":
        raise SecretStorageError("the secret storage key has no m.pbkdf2 passphrase")
    salt, iterations, bits = info.get("salt"), info.get("iterations"), info.get("bits", 256)
    if not isinstance(salt, str):
        raise SecretStorageError("the passphrase's salt is not text")
    if isinstance(iterations, bool) or not isinstance(iterations, int):
        raise SecretStorageError("the passphrase's iteration count is not an integer")
    if not 1 <= iterations <= MAX_PBKDF2_ITERATIONS:
        raise SecretStorageError(
            f"the passphrase's iteration count {iterations} is out of 1..{MAX_PBKDF2_ITERATIONS}"
        )
    if bits != 8 * KEY_BYTES:
        raise SecretStorageError("only 256-bit passphrase keys are supported")
    kdf = PBKDF2HMAC(
        algorithm=hashes.SHA512(),
        length=KEY_BYTES,
        salt=salt.encode("utf-8"),
        iterations=iterations,
    )
    return kdf.derive(passphrase.encode("utf-8"))


class SecretStorageKey:
    """A secret storage key and its id: the key description to publish, secrets in
    and out of their account data. repr shows the id only."""

    __slots__ = ("_key", "key_id")

    def __init__(self, key_id: str, key: bytes) -> None:
        _check_key(key)
        self.key_id = key_id
        self._key = key

    @classmethod
    def create(cls) -> SecretStorageKey:
        """A new random key with a random 32-character id."""
        alphabet = string.ascii_letters + string.digits
        key_id = "".join(secrets.choice(alphabet) for _ in range(32))
        return cls(key_id, secrets.token_bytes(KEY_BYTES))

    @classmethod
    def from_recovery_key(
        cls, recovery_key: object, key_id: str, description: object
    ) -> SecretStorageKey:
        """The key from the recovery key the operator typed, checked against its
        published description. `RecoveryKeyError` for a malformed recovery key,
        `WrongRecoveryKey` when it is well formed but not this key, or when the
        description is not an ``m.secret_storage.v1.aes-hmac-sha2`` one."""
        key = decode_recovery_key(recovery_key)
        if not isinstance(description, Mapping) or description.get("algorithm") != SSSS_ALGORITHM:
            raise WrongRecoveryKey(f"secret storage key {key_id} is not an {SSSS_ALGORITHM} key")
        if not check_key(key, description):
            raise WrongRecoveryKey(
                f"the recovery key is not the one of secret storage key {key_id}"
            )
        return cls(key_id, key)

    @classmethod
    def from_passphrase(cls, passphrase: str, key_id: str, description: object) -> SecretStorageKey:
        """The key from a passphrase (`key_from_passphrase`), checked against its
        description. `SecretStorageError` for a description without a usable
        passphrase, `WrongRecoveryKey` for a wrong passphrase."""
        if not isinstance(description, Mapping) or description.get("algorithm") != SSSS_ALGORITHM:
            raise WrongRecoveryKey(f"secret storage key {key_id} is not an {SSSS_ALGORITHM} key")
        key = key_from_passphrase(passphrase, description)
        if not check_key(key, description):
            raise WrongRecoveryKey(f"the passphrase is not the one of secret storage key {key_id}")
        return cls(key_id, key)

    @property
    def recovery_key(self) -> str:
        """The key as the operator keeps it (a secret)."""
        return encode_recovery_key(self._key)

    @property
    def event_type(self) -> str:
        """The account data type of the key description."""
        return SECRET_STORAGE_KEY_PREFIX + self.key_id

    def description(self, name: str | None = None) -> dict[str, object]:
        """The ``m.secret_storage.key.<id>`` account data content, with a fresh check
        value."""
        content: dict[str, object] = {"algorithm": SSSS_ALGORITHM, **key_check(self._key)}
        if name is not None:
            content["name"] = name
        return content

    def default_key_content(self) -> dict[str, str]:
        """The ``m.secret_storage.default_key`` content naming this key."""
        return {"key": self.key_id}

    def encrypt(self, name: str, secret: str) -> dict[str, object]:
        """The account data content of the secret ``name``: ``{"encrypted": {key_id:
        {"iv", "ciphertext", "mac"}}}``."""
        return {"encrypted": {self.key_id: encrypt_secret(self._key, name, secret)}}

    def decrypt(self, name: str, content: object) -> str:
        """The secret ``name`` from its account data content. `SecretDecryptionError`
        when it has nothing for this key id, or it does not decrypt."""
        encrypted = content.get("encrypted") if isinstance(content, Mapping) else None
        mine = encrypted.get(self.key_id) if isinstance(encrypted, Mapping) else None
        if mine is None:
            raise SecretDecryptionError(f"{name} is not encrypted for key {self.key_id}")
        return decrypt_secret(self._key, name, mine)

    def __repr__(self) -> str:
        return f"SecretStorageKey(key_id={self.key_id!r})"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("SecretStorageKey cannot be pickled: use recovery_key")
