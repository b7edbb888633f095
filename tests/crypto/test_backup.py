"""matrix_crypto.backup: server-side key backup crypto (m.megolm_backup.v1.curve25519-aes-sha2).

The session_data format is checked three ways: against the spec's construction computed
here with `cryptography` (X25519, HKDF-SHA256, AES-CBC, the 8-byte HMAC of an empty
buffer), against matrix-rust-sdk (its WebAssembly build from tests/e2ee_client, driven by
rust_backup_peer.mjs: it backs up a room key we decrypt, and decrypts/imports one we
backed up), and with hostile entries, which must all be a `BackupError` that quotes no
key material.
"""

from __future__ import annotations

import copy
import json
import pickle
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import vodozemac
from cryptography.hazmat.primitives import hashes, hmac, padding
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from matrix_crypto import megolm
from matrix_crypto.backup import (
    ALGORITHM,
    MEGOLM_ALGORITHM,
    SECRET_NAME,
    UNAUTHENTICATED,
    BackedUpSession,
    BackupError,
    BackupKey,
    BackupKeyMismatch,
    RoomKeyToBackUp,
    authenticated_backup_data,
    backup_data,
    check_auth_data,
    decrypt_room_keys,
    decrypt_session,
    encrypt_session,
    is_better_copy,
    public_key_from_auth_data,
)
from matrix_crypto.canonical import b64decode, b64encode, verify
from matrix_crypto.cross_signing import SigningKey
from matrix_crypto.errors import CryptoError
from matrix_crypto.identity import Identity

ROOM = "!room:example.org"
USER = "@bot:example.org"
_ALICE = vodozemac.Account()
# Real keys: matrix-rust-sdk silently skips a backed-up key whose ed25519 claim is not
# a point on the curve (random bytes are about half the time).
ALICE_CURVE = _ALICE.curve25519_key.to_base64()
ALICE_ED = _ALICE.ed25519_key.to_base64()
_NOT_A_POINT = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA"  # bytes 1..32


def room_key(
    outbound: vodozemac.GroupSession | None = None,
    *,
    at: int = 0,
    shared: vodozemac.SessionKey | None = None,
    **extra: Any,
) -> RoomKeyToBackUp:
    """The room key of ``outbound`` (as ``shared`` at index 0, if given) exported at ``at``."""
    outbound = outbound or vodozemac.GroupSession()
    inbound = vodozemac.InboundGroupSession(shared or outbound.session_key)
    exported = inbound.export_at(at)
    assert exported is not None
    return RoomKeyToBackUp(
        room_id=ROOM,
        session_id=outbound.session_id,
        sender_curve25519=ALICE_CURVE,
        sender_claimed_ed25519=ALICE_ED,
        session_key=exported.to_base64(),
        first_message_index=at,
        **extra,
    )


def secrets_of(key: BackupKey, session: RoomKeyToBackUp) -> list[str]:
    return [key.to_base64(), session.session_key]


def assert_quotes_nothing(error: BaseException, secrets: list[str]) -> None:
    text = f"{error} {error!r}"
    for secret in secrets:
        assert secret not in text
        assert secret[:16] not in text


# -- the key --------------------------------------------------------------------------


def test_key_round_trip_and_repr_without_the_secret() -> None:
    key = BackupKey.create()
    exported = key.to_base64()
    assert len(b64decode(exported)) == 32
    assert not exported.endswith("=")
    again = BackupKey.from_base64(exported)
    assert again.public_key == key.public_key
    assert BackupKey.from_base64(exported + "=").public_key == key.public_key
    # The public key is Curve25519 of the private one (not some other derivation).
    secret = vodozemac.Curve25519SecretKey.from_bytes(b64decode(exported))
    assert key.public_key == secret.public_key().to_base64()
    assert exported not in repr(key)
    assert exported not in str(key)
    assert key.public_key in repr(key)
    with pytest.raises(TypeError):
        pickle.dumps(key)
    with pytest.raises(TypeError):
        copy.deepcopy(key)
    assert SECRET_NAME == "m.megolm_backup.v1"


@pytest.mark.parametrize(
    "text",
    [None, 42, "", "not base64!", "A" * 42, b64encode(bytes(31)), b64encode(bytes(33)), "\ud800"],
)
def test_key_from_garbage(text: object) -> None:
    with pytest.raises(BackupError) as caught:
        BackupKey.from_base64(text)
    if isinstance(text, str) and text:
        assert text not in str(caught.value)


def test_auth_data_signed_by_device_and_master_key() -> None:
    key = BackupKey.create()
    assert key.auth_data() == {"public_key": key.public_key}
    assert key.signed_auth_data(USER, []) == {"public_key": key.public_key}
    device = Identity.create(USER, "BOTDEV")
    master = SigningKey.generate()
    auth = key.signed_auth_data(
        USER,
        [
            lambda m: (device.signing_key_id, device.sign(m)),
            lambda m: (master.key_id, master.sign(m)),
        ],
    )
    assert set(auth["signatures"][USER]) == {device.signing_key_id, master.key_id}  # type: ignore[index]
    assert verify(auth, USER, device.signing_key_id, device.ed25519)
    assert verify(auth, USER, master.key_id, master.public_key)
    forged = {**auth, "public_key": BackupKey.create().public_key}
    assert not verify(forged, USER, master.key_id, master.public_key)
    check_auth_data(auth, key)
    assert key.matches(auth)


def test_check_auth_data() -> None:
    key = BackupKey.create()
    other = BackupKey.create()
    with pytest.raises(BackupKeyMismatch):
        check_auth_data(other.auth_data(), key)
    assert not key.matches(other.auth_data())
    padded = {"public_key": key.public_key + "="}
    check_auth_data(padded, key)
    hostiles: list[object] = [
        None,
        [],
        {},
        {"public_key": 7},
        {"public_key": "x" * 10_000},
        {"public_key": "!!!!"},
        {"public_key": b64encode(bytes(16))},
    ]
    for hostile in hostiles:
        with pytest.raises(BackupError) as caught:
            check_auth_data(hostile, key)
        assert not isinstance(caught.value, BackupKeyMismatch)
        assert not key.matches(hostile)
    assert public_key_from_auth_data({"public_key": key.public_key, "x": 1}) == key.public_key


# -- round trips ------------------------------------------------------------------------


def test_round_trip_and_the_session_decrypts() -> None:
    key = BackupKey.create()
    outbound = vodozemac.GroupSession()
    shared = outbound.session_key
    outbound.encrypt(b"zero")
    message = outbound.encrypt(b"one")
    session = room_key(
        outbound,
        at=1,
        shared=shared,
        forwarded_count=2,
        verified=True,
        forwarding_curve25519_key_chain=(ALICE_CURVE,),
    )
    data = backup_data(key.public_key, session)
    assert data["first_message_index"] == 1
    assert data["forwarded_count"] == 2
    assert data["is_verified"] is True
    assert isinstance(data["session_data"], dict)
    assert set(data["session_data"]) == {"ephemeral", "ciphertext", "mac"}
    assert session.session_key not in json.dumps(data)
    restored = decrypt_session(key, data, room_id=ROOM, session_id=session.session_id)
    assert restored.algorithm == MEGOLM_ALGORITHM
    assert restored.sender_key == ALICE_CURVE
    assert restored.sender_claimed_keys == {"ed25519": ALICE_ED}
    assert restored.sender_claimed_ed25519 == ALICE_ED
    assert restored.forwarding_curve25519_key_chain == (ALICE_CURVE,)
    assert (restored.first_known_index, restored.forwarded_count, restored.is_verified) == (
        1,
        2,
        True,
    )
    assert restored.session_key not in repr(restored)
    inbound = vodozemac.InboundGroupSession.import_session(
        vodozemac.ExportedSessionKey(restored.session_key)
    )
    assert inbound.decrypt(message).plaintext == b"one"


def test_restored_key_imports_as_an_untrusted_forwarded_key() -> None:
    key = BackupKey.create()
    outbound = vodozemac.GroupSession()
    session = room_key(outbound)
    restored = decrypt_session(
        key, backup_data(key.public_key, session), room_id=ROOM, session_id=session.session_id
    )
    groups = megolm.GroupSessions(bytes(32))
    outcome = groups.add_forwarded_room_key(
        restored.forwarded_room_key_content(), forwarder_curve25519=ALICE_CURVE
    )
    assert outcome.stored, outcome.reason
    content = {
        "algorithm": megolm.ALGORITHM,
        "sender_key": ALICE_CURVE,
        "ciphertext": outbound.encrypt(
            json.dumps(
                {"type": "m.room.message", "content": {"body": "hi"}, "room_id": ROOM}
            ).encode()
        ).to_base64(),
        "session_id": outbound.session_id,
        "device_id": "ALICEDEV",
    }
    decrypted = groups.decrypt(ROOM, "$e", 0, content)
    assert decrypted.content == {"body": "hi"}
    assert decrypted.trusted is False


def _restore(key: BackupKey, data: object, session: RoomKeyToBackUp) -> BackedUpSession:
    return decrypt_session(key, data, room_id=ROOM, session_id=session.session_id, user_id=USER)


def test_our_own_entries_are_authenticated_msc4048() -> None:
    """An entry written with the private key's MAC key reads back authenticated; the
    MAC is HMAC-SHA256 of the canonical session_data under HKDF(private key,
    "MATRIX_BACKUP_MAC_KEY"), recomputed here from the private key."""
    key = BackupKey.create()
    session = room_key(authenticated=True)
    data = authenticated_backup_data(key, USER, session)
    session_data = data["session_data"]
    assert isinstance(session_data, dict)
    [(signed_by, macs)] = session_data["signatures"].items()
    assert signed_by == USER
    mac_key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"MATRIX_BACKUP_MAC_KEY"
    ).derive(b64decode(key.to_base64()))
    mac = hmac.HMAC(mac_key, hashes.SHA256())
    unsigned = {k: v for k, v in session_data.items() if k != "signatures"}
    mac.update(json.dumps(unsigned, sort_keys=True, separators=(",", ":")).encode())
    assert macs == {"org.matrix.msc4048.hmac-sha-256:backup_mac_key": b64encode(mac.finalize())}
    assert _restore(key, data, session).authenticated is True
    # Without the account to look under, or under another account: not authenticated.
    assert (
        decrypt_session(key, data, room_id=ROOM, session_id=session.session_id).authenticated
        is False
    )
    other = decrypt_session(
        key, data, room_id=ROOM, session_id=session.session_id, user_id="@eve:example.org"
    )
    assert other.authenticated is False


def test_an_entry_anyone_could_write_is_not_authenticated() -> None:
    """The public key is public: the homeserver can file an entry of its own. Without a
    MAC only the private key's holder can make, it is worth a forwarded key."""
    key = BackupKey.create()
    session = room_key(authenticated=True)
    assert _restore(key, backup_data(key.public_key, session), session).authenticated is False
    # A MAC copied from a genuine entry onto a forged one does not fit it.
    genuine = authenticated_backup_data(key, USER, session)
    forged = backup_data(key.public_key, session)
    forged["session_data"]["signatures"] = genuine["session_data"]["signatures"]  # type: ignore[index]
    assert _restore(key, forged, session).authenticated is False
    # A MAC made with another backup key's MAC key.
    other = authenticated_backup_data(BackupKey.create(), USER, session)
    forged = backup_data(key.public_key, session)
    forged["session_data"]["signatures"] = other["session_data"]["signatures"]  # type: ignore[index]
    assert _restore(key, forged, session).authenticated is False


def test_a_key_we_did_not_get_from_its_owner_stays_unauthenticated() -> None:
    key = BackupKey.create()
    session = room_key(authenticated=False)
    data = authenticated_backup_data(key, USER, session)
    plain = rust_free_decrypt(key, data)
    assert plain[UNAUTHENTICATED] == "m.forwarded_room_key"
    assert _restore(key, data, session).authenticated is False


def rust_free_decrypt(key: BackupKey, data: dict[str, Any]) -> dict[str, Any]:
    """The plaintext of an entry, by the spec's construction (not the module under test)."""
    session_data = data["session_data"]
    shared = X25519PrivateKey.from_private_bytes(b64decode(key.to_base64())).exchange(
        X25519PublicKey.from_public_bytes(b64decode(session_data["ephemeral"]))
    )
    okm = HKDF(algorithm=hashes.SHA256(), length=80, salt=bytes(32), info=b"").derive(shared)
    decryptor = Cipher(algorithms.AES(okm[:32]), modes.CBC(okm[64:])).decryptor()
    padded = decryptor.update(b64decode(session_data["ciphertext"])) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    result: dict[str, Any] = json.loads(unpadder.update(padded) + unpadder.finalize())
    return result


@pytest.mark.parametrize(
    "signatures",
    [
        None,
        "x",
        [],
        {USER: "x"},
        {USER: {"org.matrix.msc4048.hmac-sha-256:backup_mac_key": 5}},
        {USER: {"org.matrix.msc4048.hmac-sha-256:backup_mac_key": "A" * 10_000}},
        {USER: {"org.matrix.msc4048.hmac-sha-256:backup_mac_key": "not base64 !"}},
        {USER: {"org.matrix.msc4048.hmac-sha-256:backup_mac_key": ""}},
    ],
)
def test_hostile_macs_are_not_authenticated_and_never_raise(signatures: object) -> None:
    key = BackupKey.create()
    session = room_key(authenticated=True)
    data = authenticated_backup_data(key, USER, session)
    data["session_data"]["signatures"] = signatures  # type: ignore[index]
    assert _restore(key, data, session).authenticated is False


def test_a_session_data_that_is_not_canonical_json_is_not_authenticated() -> None:
    key = BackupKey.create()
    session = room_key(authenticated=True)
    data = authenticated_backup_data(key, USER, session)
    data["session_data"]["extra"] = 1.5  # type: ignore[index]  # no float in canonical JSON
    assert _restore(key, data, session).authenticated is False


def test_session_data_is_the_spec_construction() -> None:
    """Recompute everything the spec says from the private key: HKDF-SHA256 (zero salt,
    empty info) of the ECDH secret, AES-256-CBC with PKCS#7, and the libolm MAC: the
    first 8 bytes of HMAC-SHA256 over an empty buffer (not over the ciphertext)."""
    key = BackupKey.create()
    session = room_key(authenticated=True)  # no MSC4048 marker in the plaintext
    data = encrypt_session(key.public_key, session)
    private = X25519PrivateKey.from_private_bytes(b64decode(key.to_base64()))
    shared = private.exchange(X25519PublicKey.from_public_bytes(b64decode(data["ephemeral"])))
    okm = HKDF(hashes.SHA256(), 80, bytes(32), b"").derive(shared)
    aes_key, mac_key, iv = okm[:32], okm[32:64], okm[64:]
    ciphertext = b64decode(data["ciphertext"])
    empty = hmac.HMAC(mac_key, hashes.SHA256())
    assert b64decode(data["mac"]) == empty.finalize()[:8]
    over_ciphertext = hmac.HMAC(mac_key, hashes.SHA256())
    over_ciphertext.update(ciphertext)
    assert b64decode(data["mac"]) != over_ciphertext.finalize()[:8]
    decryptor = Cipher(algorithms.AES(aes_key), modes.CBC(iv)).decryptor()
    unpadder = padding.PKCS7(128).unpadder()
    plain = (
        unpadder.update(decryptor.update(ciphertext) + decryptor.finalize()) + unpadder.finalize()
    )
    assert json.loads(plain) == {
        "algorithm": MEGOLM_ALGORITHM,
        "sender_key": ALICE_CURVE,
        "sender_claimed_keys": {"ed25519": ALICE_ED},
        "session_key": session.session_key,
        "forwarding_curve25519_key_chain": [],
    }


def _spec_encrypt(public_key: str, plain: bytes) -> dict[str, str]:
    """The spec's construction with `cryptography` alone (an independent writer)."""
    ephemeral = X25519PrivateKey.generate()
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(b64decode(public_key)))
    okm = HKDF(hashes.SHA256(), 80, bytes(32), b"").derive(shared)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plain) + padder.finalize()
    encryptor = Cipher(algorithms.AES(okm[:32]), modes.CBC(okm[64:])).encryptor()
    mac = hmac.HMAC(okm[32:64], hashes.SHA256())
    return {
        "ephemeral": b64encode(ephemeral.public_key().public_bytes_raw()),
        "ciphertext": b64encode(encryptor.update(padded) + encryptor.finalize()),
        "mac": b64encode(mac.finalize()[:8]),
    }


def _entry(key: BackupKey, plain: object, **meta: Any) -> dict[str, Any]:
    raw = plain if isinstance(plain, bytes) else json.dumps(plain).encode()
    return {
        "first_message_index": 0,
        "forwarded_count": 0,
        "is_verified": False,
        "session_data": _spec_encrypt(key.public_key, raw),
        **meta,
    }


def _plain(session: RoomKeyToBackUp, **changes: Any) -> dict[str, Any]:
    plain: dict[str, Any] = {
        "algorithm": MEGOLM_ALGORITHM,
        "sender_key": session.sender_curve25519,
        "sender_claimed_keys": {"ed25519": session.sender_claimed_ed25519},
        "session_key": session.session_key,
        "forwarding_curve25519_key_chain": [],
        "org.matrix.msc3061.shared_history": True,
    }
    plain.update(changes)
    return {k: v for k, v in plain.items() if v is not _DROP}


_DROP = object()


def test_an_independent_writer_is_read() -> None:
    key = BackupKey.create()
    session = room_key()
    restored = decrypt_session(
        key, _entry(key, _plain(session)), room_id=ROOM, session_id=session.session_id
    )
    assert restored.session_key == session.session_key
    # No forwarding chain at all: empty (older writers leave it out).
    restored = decrypt_session(
        key,
        _entry(key, _plain(session, forwarding_curve25519_key_chain=_DROP)),
        room_id=ROOM,
        session_id=session.session_id,
    )
    assert restored.forwarding_curve25519_key_chain == ()


# -- hostile entries --------------------------------------------------------------------


def _refused(key: BackupKey, data: object, session: RoomKeyToBackUp, contains: str) -> None:
    with pytest.raises(BackupError) as caught:
        decrypt_session(key, data, room_id=ROOM, session_id=session.session_id)
    assert isinstance(caught.value, CryptoError)
    assert contains in caught.value.reason, caught.value.reason
    assert_quotes_nothing(caught.value, secrets_of(key, session))
    if isinstance(data, dict) and isinstance(data.get("session_data"), dict):
        for value in data["session_data"].values():
            if isinstance(value, str) and len(value) > 8:
                assert value not in str(caught.value)


def test_hostile_session_data() -> None:
    key = BackupKey.create()
    session = room_key()
    good = backup_data(key.public_key, session)
    sd = good["session_data"]
    assert isinstance(sd, dict)

    def with_sd(**changes: Any) -> dict[str, Any]:
        new = {**sd, **changes}
        return {**good, "session_data": {k: v for k, v in new.items() if v is not _DROP}}

    flipped = bytearray(b64decode(sd["mac"]))
    flipped[0] ^= 1
    ciphertext = b64decode(sd["ciphertext"])
    cases: list[tuple[object, str]] = [
        (None, "not an object"),
        ([good], "not an object"),
        ({**good, "session_data": "x"}, "session_data"),
        (with_sd(ciphertext=_DROP), "ciphertext"),
        (with_sd(ciphertext="!!!!"), "base64"),
        (with_sd(ciphertext="A" * 1_000_000), "too long"),
        (with_sd(ephemeral=_DROP), "ephemeral"),
        (with_sd(ephemeral="garbage!"), "ephemeral"),
        (with_sd(ephemeral=b64encode(bytes(16))), "ephemeral"),
        # An all-zero point: vodozemac refuses the non-contributory shared secret.
        (with_sd(ephemeral=b64encode(bytes(32))), "does not decrypt"),
        (with_sd(mac=_DROP), "base64"),
        (with_sd(mac=b64encode(bytes(flipped))), "mac does not match"),
        # vodozemac alone accepts a truncated or empty MAC: we do not.
        (with_sd(mac=sd["mac"][:6]), "8 bytes"),
        (with_sd(mac=""), "8 bytes"),
        (with_sd(ciphertext=b64encode(ciphertext[:-1])), "whole AES blocks"),
        (with_sd(ciphertext=b64encode(ciphertext[:-16])), "does not decrypt"),
        ({**good, "first_message_index": -1}, "first_message_index"),
        ({**good, "first_message_index": 2**32}, "first_message_index"),
        ({**good, "first_message_index": True}, "first_message_index"),
        ({**good, "first_message_index": 1.0}, "first_message_index"),
        ({**good, "forwarded_count": 10**30}, "forwarded_count"),
        ({k: v for k, v in good.items() if k != "forwarded_count"}, "forwarded_count"),
        ({**good, "is_verified": "yes"}, "is_verified"),
    ]
    for data, reason in cases:
        _refused(key, data, session, reason)


def test_wrong_key() -> None:
    key = BackupKey.create()
    session = room_key()
    data = backup_data(BackupKey.create().public_key, session)
    _refused(key, data, session, "mac does not match")


def test_hostile_plaintexts() -> None:
    key = BackupKey.create()
    session = room_key()
    other = room_key()
    cases: list[tuple[object, str]] = [
        (b"\xff\xfe not utf-8", "not JSON"),
        (b"not json", "not JSON"),
        (b"[" * 40_000, "not JSON"),  # deeper than json.loads recurses
        ([1, 2], "not a JSON object"),
        ("a string", "not a JSON object"),
        (None, "not a JSON object"),
        (_plain(session, algorithm="m.megolm.v2.aes-sha2"), "m.megolm.v1.aes-sha2"),
        (_plain(session, algorithm=_DROP), "m.megolm.v1.aes-sha2"),
        (_plain(session, sender_key=_DROP), "sender_key"),
        (_plain(session, sender_key=b64encode(bytes(31))), "sender_key"),
        (_plain(session, sender_key="\ud800" * 43), "sender_key"),
        (_plain(session, sender_key=["x"]), "sender_key"),
        (_plain(session, sender_claimed_keys=_DROP), "sender_claimed_keys"),
        (_plain(session, sender_claimed_keys={}), "ed25519"),
        (_plain(session, sender_claimed_keys={"ed25519": 5}), "ed25519"),
        (_plain(session, sender_claimed_keys={"ed25519": "short"}), "ed25519"),
        (_plain(session, sender_claimed_keys={"ed25519": _NOT_A_POINT}), "ed25519"),
        (
            _plain(session, sender_claimed_keys={f"k{i}": "v" for i in range(100)}),
            "sender_claimed_keys",
        ),
        (_plain(session, forwarding_curve25519_key_chain="x"), "forwarding"),
        (_plain(session, forwarding_curve25519_key_chain=[ALICE_CURVE] * 1000), "forwarding"),
        (_plain(session, forwarding_curve25519_key_chain=["nope"]), "forwarding chain key"),
        (_plain(session, session_key=_DROP), "session_key"),
        (_plain(session, session_key=""), "session_key"),
        (_plain(session, session_key=12), "session_key"),
        (_plain(session, session_key="A" * 5000), "session_key"),
        (_plain(session, session_key=session.session_key[:-10]), "session_key"),
        (_plain(session, session_key="\ud800"), "session_key"),
        # Another session's key filed under this session's id.
        (_plain(session, session_key=other.session_key), "filed under"),
    ]
    for plain, reason in cases:
        _refused(key, _entry(key, plain), session, reason)


def test_decrypt_room_keys_keeps_the_good_and_says_why_for_the_rest() -> None:
    key = BackupKey.create()
    good = room_key()
    bad = room_key()
    rooms: dict[str, Any] = {
        ROOM: {
            good.session_id: backup_data(key.public_key, good),
            bad.session_id: backup_data(BackupKey.create().public_key, bad),
            "misfiled": backup_data(key.public_key, bad),
        },
        "!broken:example.org": "not an object",
    }
    sessions, refused = decrypt_room_keys(key, rooms)
    assert [s.session_id for s in sessions] == [good.session_id]
    assert isinstance(sessions[0], BackedUpSession)
    reasons = {(r.room_id, r.session_id): r.reason for r in refused}
    assert set(reasons) == {(ROOM, bad.session_id), (ROOM, "misfiled"), ("!broken:example.org", "")}
    assert "mac" in reasons[(ROOM, bad.session_id)]
    assert "filed under" in reasons[(ROOM, "misfiled")]


# -- our own input ------------------------------------------------------------------------


def test_encrypt_refuses_a_malformed_session_or_public_key() -> None:
    key = BackupKey.create()
    session = room_key()
    other = room_key()
    for public in ["", "!!!", b64encode(bytes(31)), "A" * 1000]:
        with pytest.raises(ValueError, match="public key"):
            encrypt_session(public, session)
    bad = [
        RoomKeyToBackUp(**{**_fields(session), "session_key": other.session_key}),
        RoomKeyToBackUp(**{**_fields(session), "session_key": "garbage"}),
        RoomKeyToBackUp(**{**_fields(session), "first_message_index": 3}),
        RoomKeyToBackUp(**{**_fields(session), "first_message_index": -1}),
        RoomKeyToBackUp(**{**_fields(session), "forwarded_count": True}),
        RoomKeyToBackUp(**{**_fields(session), "room_id": ""}),
        RoomKeyToBackUp(**{**_fields(session), "verified": 1}),
    ]
    for session_ in bad:
        with pytest.raises(ValueError, match=r"session|index|count|verified") as caught:
            encrypt_session(key.public_key, session_)
        assert session.session_key[:16] not in str(caught.value)
    assert session.session_key not in repr(session)


def _fields(session: RoomKeyToBackUp) -> dict[str, Any]:
    return {name: getattr(session, name) for name in RoomKeyToBackUp.__dataclass_fields__}


def test_each_encryption_is_fresh() -> None:
    key = BackupKey.create()
    session = room_key()
    one = encrypt_session(key.public_key, session)
    two = encrypt_session(key.public_key, session)
    assert one["ephemeral"] != two["ephemeral"]
    assert one["ciphertext"] != two["ciphertext"]


# -- which copy is better ----------------------------------------------------------------


def _meta(verified: bool, index: int, forwarded: int) -> dict[str, object]:
    return {
        "is_verified": verified,
        "first_message_index": index,
        "forwarded_count": forwarded,
        "session_data": {},
    }


def test_better_copy_follows_the_spec_order() -> None:
    assert is_better_copy(_meta(True, 9, 9), _meta(False, 0, 0))
    assert not is_better_copy(_meta(False, 0, 0), _meta(True, 9, 9))
    assert is_better_copy(_meta(False, 1, 9), _meta(False, 2, 0))
    assert not is_better_copy(_meta(False, 2, 0), _meta(False, 1, 9))
    assert is_better_copy(_meta(True, 1, 0), _meta(True, 1, 1))
    assert not is_better_copy(_meta(True, 1, 1), _meta(True, 1, 0))
    assert not is_better_copy(_meta(True, 1, 1), _meta(True, 1, 1))  # equal: keep
    assert is_better_copy(_meta(False, 5, 5), None)
    assert is_better_copy(_meta(False, 5, 5), {"is_verified": "true"})
    assert not is_better_copy({"is_verified": True}, _meta(False, 5, 5))
    assert not is_better_copy(None, None)
    assert not is_better_copy(_meta(True, -1, 0), None)
    session = room_key()
    key = BackupKey.create()
    assert is_better_copy(backup_data(key.public_key, session), None)


# -- matrix-rust-sdk ---------------------------------------------------------------------

_PEER = Path(__file__).with_name("rust_backup_peer.mjs")
_WASM = _PEER.parent.parent / "e2ee_client/node_modules/@matrix-org/matrix-sdk-crypto-wasm"


def rust(op: str, **args: Any) -> Any:
    if shutil.which("node") is None or not _WASM.is_dir():
        pytest.skip("node or tests/e2ee_client's packages (npm ci) are not installed")
    done = subprocess.run(
        ["node", str(_PEER)],
        input=json.dumps({"op": op, **args}),
        capture_output=True,
        text=True,
        cwd=_PEER.parent,
        timeout=60,
        check=True,
    )
    answer = json.loads(done.stdout)
    assert answer["ok"], answer.get("error")
    return answer["result"]


def test_rust_backs_up_a_room_key_we_restore() -> None:
    key = BackupKey.create()
    result = rust(
        "backup", key=key.to_base64(), room=ROOM, user="@alice:example.org", device="ALICEDEV"
    )
    # Same private key, same public key on both sides.
    assert result["public_key"] == key.public_key
    rooms = {room: body["sessions"] for room, body in result["request"]["rooms"].items()}
    sessions, refused = decrypt_room_keys(key, rooms)
    assert refused == []
    (restored,) = sessions
    event = result["event"]
    assert (restored.room_id, restored.session_id) == (ROOM, event["session_id"])
    assert restored.sender_key == event["sender_key"]
    assert restored.first_known_index == 0
    inbound = vodozemac.InboundGroupSession.import_session(
        vodozemac.ExportedSessionKey(restored.session_key)
    )
    plain = inbound.decrypt(vodozemac.MegolmMessage.from_base64(event["ciphertext"]))
    assert json.loads(plain.plaintext)["content"] == {"body": "from rust"}
    # A wrong key is told as such, not as a crash.
    _, refused = decrypt_room_keys(BackupKey.create(), rooms)
    assert ["mac" in r.reason for r in refused] == [True]


def test_rust_restores_a_room_key_we_backed_up() -> None:
    key = BackupKey.create()
    outbound = vodozemac.GroupSession()
    session = room_key(outbound)
    data = backup_data(key.public_key, session)
    plain = rust("decrypt", key=key.to_base64(), session_data=data["session_data"])
    assert plain["session_key"] == session.session_key
    assert plain["sender_claimed_keys"] == {"ed25519": ALICE_ED}
    ciphertext = outbound.encrypt(
        json.dumps(
            {"type": "m.room.message", "content": {"body": "from python"}, "room_id": ROOM}
        ).encode()
    ).to_base64()
    event = {
        "type": "m.room.encrypted",
        "sender": "@alice:example.org",
        "event_id": "$e",
        "origin_server_ts": 1,
        "room_id": ROOM,
        "content": {
            "algorithm": megolm.ALGORITHM,
            "sender_key": ALICE_CURVE,
            "ciphertext": ciphertext,
            "session_id": session.session_id,
            "device_id": "ALICEDEV",
        },
    }
    result = rust(
        "import",
        key=key.to_base64(),
        room=ROOM,
        session_id=session.session_id,
        session_data=data["session_data"],
        user="@bob:example.org",
        device="BOBDEV",
        event=event,
    )
    assert (result["imported"], result["total"]) == (1, 1)
    assert result["event"]["content"] == {"body": "from python"}


def test_rust_restores_an_authenticated_entry_too() -> None:
    """The MSC4048 additions (a signatures object beside the ciphertext, the marker in
    the plaintext) do not stop matrix-rust-sdk from reading our entries."""
    key = BackupKey.create()
    for authenticated in (True, False):
        session = room_key(authenticated=authenticated)
        data = authenticated_backup_data(key, USER, session)
        plain = rust("decrypt", key=key.to_base64(), session_data=data["session_data"])
        assert plain["session_key"] == session.session_key


def test_algorithm_name() -> None:
    assert ALGORITHM == "m.megolm_backup.v1.curve25519-aes-sha2"
