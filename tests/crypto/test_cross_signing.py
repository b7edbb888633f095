"""matrix_crypto.cross_signing: cross-signing keys and secret storage crypto.

Known-answer vectors from two independent implementations:
- matrix-js-sdk 37.5 (tests/e2ee_client/node_modules): `encodeRecoveryKey`,
  `calculateKeyCheck` and `encryptAESSecretStorageItem` for a fixed key and IVs;
- matrix-rust-sdk's `secret_storage.rs` tests: a recovery key with its key description
  (padded base64), a passphrase with its description, and base58 parsing of a key
  with stray whitespace.
Signatures are checked with vodozemac (`Ed25519PublicKey.verify_signature`, and
`canonical.verify`), never only with the code that made them.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import vodozemac
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from matrix_crypto.canonical import b64decode, b64encode, canonical_json, verify
from matrix_crypto.cross_signing import (
    MASTER,
    SECRET_MASTER,
    SECRET_SELF_SIGNING,
    SECRET_USER_SIGNING,
    SELF_SIGNING,
    SSSS_ALGORITHM,
    USER_SIGNING,
    CrossSigningKeys,
    CrossSigningRecord,
    RecoveryKeyError,
    SecretDecryptionError,
    SecretStorageError,
    SecretStorageKey,
    SigningKey,
    WrongRecoveryKey,
    check_key,
    cross_signing_public_key,
    decode_recovery_key,
    decrypt_secret,
    derive_keys,
    device_signed_by_self_signing_key,
    encode_recovery_key,
    encrypt_secret,
    key_check,
    key_from_passphrase,
    verify_cross_signing_keys,
)
from matrix_crypto.identity import Identity

ALICE = "@alice:example.org"
BOB = "@bob:example.org"
PICKLE_KEY = bytes(range(32))

# matrix-js-sdk 37.5.0, generated with node from tests/e2ee_client (see module doc).
JS_KEY = bytes.fromhex("030a11181f262d343b424950575e656c737a81888f969da4abb2b9c0c7ced5dc")
JS_RECOVERY_KEY = "EsT1 t3bE JPZs Bz9H xApv jfQh PY9X gmGM bhbN Kz2L 2t9n aeKB"
JS_CHECK = {
    "iv": "AAECAwQFBgcICQoLDA0ODw==",
    "mac": "LjcEP1luoAJ3Uv8Du7d9QnDFLQ/ydqGaZ4KJyXKM0sg=",
}
JS_SECRET_NAME = "m.cross_signing.master"
JS_SECRET_PLAIN = "c2VlZCBvZiB0aGUgbWFzdGVyIGtleQ"
JS_SECRET = {
    "iv": "8PDw8PDw8PBw8PDw8PDw8A==",
    "ciphertext": "9e7ygNGMMzIrufCvZVSAiQgDpp0CWR7NSm/MWXZT",
    "mac": "y0O3YRc6yywmK4nzaVIceFSpi9G1thAZNZJiqglKhzM=",
}

# matrix-rust-sdk crates/matrix-sdk-crypto/src/secret_storage.rs tests.
RUST_RECOVERY_KEY = "EsTj 3yST y93F SLpB jJsz eAXc 2XzA ygD3 w69H fGaN TKBj jXEd"
RUST_KEY_ID = "bmur2d9ypPUH1msSwCxQOJkuKRmJI55e"
RUST_DESCRIPTION = {
    "algorithm": "m.secret_storage.v1.aes-hmac-sha2",
    "iv": "xv5b6/p3ExEw++wTyfSHEg==",
    "mac": "ujBBbXahnTAMkmPUX2/0+VTfUh63pGyVRuBcDMgmJC8=",
}
RUST_SPACED = "EsT           pRvZTnjck8    YrhRAtw XLS84Nr2r9S9LGAWDaExVAPBvLRK   "
# Its DECODED_KEY, as hex.
RUST_SPACED_BYTES = bytes.fromhex(
    "9fbd46bb345171c6f6022c9a25d5681ba54eec6a6c4953f3adc0b96e9d91ada3"
)


@pytest.fixture(scope="module")
def keys() -> CrossSigningKeys:
    return CrossSigningKeys.create(ALICE)


@pytest.fixture(scope="module")
def device() -> Identity:
    return Identity.create(ALICE, "BOTDEVICE")


def vodozemac_verifies(obj: dict[str, Any], user_id: str, public: str) -> bool:
    """The signature under ``ed25519:<public>`` checked by vodozemac directly."""
    signature = obj["signatures"][user_id][f"ed25519:{public}"]
    message = canonical_json({k: v for k, v in obj.items() if k not in ("signatures", "unsigned")})
    try:
        vodozemac.Ed25519PublicKey.from_base64(public).verify_signature(
            message, vodozemac.Ed25519Signature.from_base64(signature)
        )
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------- public key objects


def test_upload_body_shape_and_signatures(keys: CrossSigningKeys) -> None:
    body = keys.upload_body()
    assert set(body) == {"master_key", "self_signing_key", "user_signing_key"}
    master, ssk, usk = body["master_key"], body["self_signing_key"], body["user_signing_key"]
    mpub, spub, upub = (keys.public_keys[u] for u in (MASTER, SELF_SIGNING, USER_SIGNING))
    assert master == {"user_id": ALICE, "usage": ["master"], "keys": {f"ed25519:{mpub}": mpub}}
    assert ssk["usage"] == ["self_signing"]
    assert ssk["keys"] == {f"ed25519:{spub}": spub}
    assert usk["usage"] == ["user_signing"]
    assert usk["keys"] == {f"ed25519:{upub}": upub}
    assert len({mpub, spub, upub}) == 3
    for obj in (ssk, usk):
        assert isinstance(obj, dict)
        assert list(obj["signatures"]) == [ALICE]
        assert list(obj["signatures"][ALICE]) == [f"ed25519:{mpub}"]
        assert vodozemac_verifies(obj, ALICE, mpub)
        assert verify(obj, ALICE, f"ed25519:{mpub}", mpub)
        # Not signed by itself or another of the keys.
        assert not verify(obj, ALICE, f"ed25519:{mpub}", spub)
    assert verify_cross_signing_keys(ALICE, master, ssk, usk)
    assert verify_cross_signing_keys(ALICE, master, ssk)  # another user's view: no USK
    assert len(b64decode(mpub)) == 32
    assert "=" not in mpub


def test_upload_body_is_deterministic(keys: CrossSigningKeys) -> None:
    # A retried upload must be byte-identical: the server accepts the same keys again
    # without user-interactive auth.
    assert canonical_json(keys.upload_body()) == canonical_json(keys.upload_body())


def test_signing_key_matches_its_seed() -> None:
    key = SigningKey.generate()
    again = SigningKey.from_seed(key.export_seed())
    assert again.public_key == key.public_key
    assert again.sign(b"message") == key.sign(b"message")
    vodozemac.Ed25519PublicKey.from_base64(key.public_key).verify_signature(
        b"message", vodozemac.Ed25519Signature.from_base64(key.sign(b"message"))
    )


# ------------------------------------------------------------------------ signatures


def test_sign_device_for_signatures_upload(keys: CrossSigningKeys, device: Identity) -> None:
    device_keys = device.device_keys()
    device_keys["unsigned"] = {"device_display_name": "surfaces-bot"}
    body = keys.sign_device(device_keys)
    assert list(body) == [ALICE]
    by_device = body[ALICE]
    assert isinstance(by_device, dict)
    assert list(by_device) == ["BOTDEVICE"]
    signed = by_device["BOTDEVICE"]
    spub = keys.self_signing.public_key
    # The device's own signature stays; the self-signing key's is added.
    assert set(signed["signatures"][ALICE]) == {"ed25519:BOTDEVICE", f"ed25519:{spub}"}
    assert "unsigned" not in signed
    assert {k: v for k, v in signed.items() if k != "signatures"} == {
        k: v for k, v in device_keys.items() if k not in ("signatures", "unsigned")
    }
    assert vodozemac_verifies(signed, ALICE, spub)
    assert verify(signed, ALICE, "ed25519:BOTDEVICE", device.ed25519)
    assert device_signed_by_self_signing_key(signed, keys.self_signing_key())
    # The input is not changed.
    own = device_keys["signatures"]
    assert isinstance(own, dict)
    assert set(own[ALICE]) == {"ed25519:BOTDEVICE"}


def test_sign_device_refuses_other_users_and_missing_ids(keys: CrossSigningKeys) -> None:
    bob = Identity.create(BOB, "BOBDEVICE").device_keys()
    with pytest.raises(ValueError, match="another user"):
        keys.sign_device(bob)
    no_id = {k: v for k, v in Identity.create(ALICE, "X").device_keys().items() if k != "device_id"}
    with pytest.raises(ValueError, match="device_id"):
        keys.sign_device(no_id)


def test_sign_user_signs_another_users_master_key(keys: CrossSigningKeys) -> None:
    bob = CrossSigningKeys.create(BOB)
    body = keys.sign_user(bob.master_key())
    bpub = bob.master.public_key
    signed = body[BOB][bpub]
    assert vodozemac_verifies(signed, ALICE, keys.user_signing.public_key)
    assert signed["keys"] == {f"ed25519:{bpub}": bpub}
    with pytest.raises(ValueError, match="another user"):
        keys.sign_user(keys.master_key())
    with pytest.raises(ValueError, match="well-formed"):
        keys.sign_user({**bob.master_key(), "usage": ["self_signing"]})


# ------------------------------------------------------------ verification (hostile)


def _other_master_ssk() -> dict[str, object]:
    # Alice's user id, but signed by a master key that is not hers.
    return CrossSigningKeys.create(ALICE).self_signing_key()


def _mutations(
    keys: CrossSigningKeys,
) -> dict[str, Callable[[dict[str, Any], dict[str, Any], dict[str, Any]], None]]:
    mpub = keys.master.public_key
    spub = keys.self_signing.public_key

    def set_(obj: dict[str, Any], k: str, v: object) -> None:
        obj[k] = v

    def ssk_sig(s: dict[str, Any]) -> str:
        return str(s["signatures"][ALICE][f"ed25519:{mpub}"])

    return {
        "master wrong usage": lambda m, s, u: set_(m, "usage", ["self_signing"]),
        "master two usages": lambda m, s, u: set_(m, "usage", ["master", "self_signing"]),
        "master usage not a list": lambda m, s, u: set_(m, "usage", "master"),
        "master of another user": lambda m, s, u: set_(m, "user_id", BOB),
        "master truncated key": lambda m, s, u: set_(
            m, "keys", {f"ed25519:{mpub[:20]}": mpub[:20]}
        ),
        "master garbage base64": lambda m, s, u: set_(m, "keys", {"ed25519:!!!!": "!!!!"}),
        "master key id != value": lambda m, s, u: set_(m, "keys", {f"ed25519:{spub}": mpub}),
        "master two keys": lambda m, s, u: m["keys"].update({f"ed25519:{spub}": spub}),
        "master no keys": lambda m, s, u: set_(m, "keys", {}),
        "master key not a string": lambda m, s, u: set_(m, "keys", {f"ed25519:{mpub}": 1}),
        "ssk wrong usage": lambda m, s, u: set_(s, "usage", ["user_signing"]),
        "ssk missing signature": lambda m, s, u: s.pop("signatures"),
        "ssk signature of another key id": lambda m, s, u: set_(
            s, "signatures", {ALICE: {f"ed25519:{spub}": ssk_sig(s)}}
        ),
        "ssk signature under another user": lambda m, s, u: set_(
            s, "signatures", {BOB: {f"ed25519:{mpub}": ssk_sig(s)}}
        ),
        "ssk signature truncated": lambda m, s, u: set_(
            s, "signatures", {ALICE: {f"ed25519:{mpub}": ssk_sig(s)[:40]}}
        ),
        "ssk signature garbage": lambda m, s, u: set_(
            s, "signatures", {ALICE: {f"ed25519:{mpub}": "*" * 86}}
        ),
        "ssk signature of usk": lambda m, s, u: set_(
            s, "signatures", copy.deepcopy(u["signatures"])
        ),
        "ssk signed by another master": lambda m, s, u: s.update(_other_master_ssk()),
        "ssk changed after signing": lambda m, s, u: set_(s, "extra", "x"),
        "ssk is the master key": lambda m, s, u: set_(s, "keys", dict(m["keys"])),
        "ssk float": lambda m, s, u: set_(s, "extra", 1.5),
        "ssk not an object": lambda m, s, u: s.clear(),
        "usk wrong usage": lambda m, s, u: set_(u, "usage", ["master"]),
        "usk missing signature": lambda m, s, u: u.pop("signatures"),
        "usk of another user": lambda m, s, u: set_(u, "user_id", BOB),
    }


def test_hostile_cross_signing_keys_are_refused(keys: CrossSigningKeys) -> None:
    body = keys.upload_body()
    for name, mutate in _mutations(keys).items():
        master, ssk, usk = (copy.deepcopy(body[k]) for k in body)
        assert isinstance(master, dict)
        assert isinstance(ssk, dict)
        assert isinstance(usk, dict)
        mutate(master, ssk, usk)
        assert not verify_cross_signing_keys(ALICE, master, ssk, usk), name
        assert not keys.matches(master, ssk, usk), name


@pytest.mark.parametrize(
    "junk",
    [None, 1, "master", [], {"user_id": ALICE}, {"usage": None}, {"keys": [1]}, b"x"],
)
def test_junk_objects_never_raise(keys: CrossSigningKeys, junk: object) -> None:
    body = keys.upload_body()
    assert not verify_cross_signing_keys(ALICE, junk, body["self_signing_key"])
    assert not verify_cross_signing_keys(ALICE, body["master_key"], junk)
    if junk is not None:  # None: no user-signing key to check (another user's view)
        assert not verify_cross_signing_keys(
            ALICE, body["master_key"], body["self_signing_key"], junk
        )
    assert cross_signing_public_key(junk, ALICE, MASTER) is None
    assert not device_signed_by_self_signing_key(junk, body["self_signing_key"])
    assert not device_signed_by_self_signing_key({"user_id": ALICE}, junk)


def test_deeply_nested_junk_is_refused(keys: CrossSigningKeys) -> None:
    nested: dict[str, Any] = {}
    for _ in range(5000):
        nested = {"a": nested}
    ssk = {**keys.self_signing_key(), "extra": nested}
    assert not verify_cross_signing_keys(ALICE, keys.master_key(), ssk)


def test_device_signature_hostile(keys: CrossSigningKeys, device: Identity) -> None:
    ssk = keys.self_signing_key()
    signed = keys.sign_device(device.device_keys())[ALICE]["BOTDEVICE"]
    assert device_signed_by_self_signing_key(signed, ssk)

    # Only the device's own signature: not cross-signed.
    assert not device_signed_by_self_signing_key(device.device_keys(), ssk)
    # Keys changed after signing (a server swapping the curve25519 key).
    changed = copy.deepcopy(signed)
    changed["keys"]["curve25519:BOTDEVICE"] = (
        vodozemac.Curve25519SecretKey().public_key().to_base64()
    )
    assert not device_signed_by_self_signing_key(changed, ssk)
    # Signed by the master key under the self-signing key's id.
    forged = keys.sign_device(device.device_keys())[ALICE]["BOTDEVICE"]
    spub = keys.self_signing.public_key
    bare = {k: v for k, v in device.device_keys().items() if k != "signatures"}
    forged["signatures"][ALICE][f"ed25519:{spub}"] = keys.master.sign(canonical_json(bare))
    assert not device_signed_by_self_signing_key(forged, ssk)
    # Another user's self-signing key, or the master key object passed instead.
    assert not device_signed_by_self_signing_key(
        signed, CrossSigningKeys.create(BOB).self_signing_key()
    )
    assert not device_signed_by_self_signing_key(signed, keys.master_key())
    # Same user id, another self-signing key.
    assert not device_signed_by_self_signing_key(signed, _other_master_ssk())
    # A device of another user signed by Alice's key (a server relabelling it).
    assert not device_signed_by_self_signing_key({**signed, "user_id": BOB}, ssk)
    # A device whose id is the self-signing key's public key (spec: key-id collision).
    collide = Identity.create(ALICE, spub)
    tricky = keys.sign_device(collide.device_keys())[ALICE][spub]
    assert not device_signed_by_self_signing_key(tricky, ssk)


# ------------------------------------------------------------------- export / record


def test_export_round_trip(keys: CrossSigningKeys) -> None:
    exported = keys.export()
    assert set(exported) == {SECRET_MASTER, SECRET_SELF_SIGNING, SECRET_USER_SIGNING}
    for seed in exported.values():
        assert len(b64decode(seed)) == 32
        assert "=" not in seed
    again = CrossSigningKeys.from_export(ALICE, exported)
    assert again.public_keys == keys.public_keys
    assert again.upload_body() == keys.upload_body()
    assert again.matches(*keys.upload_body().values())
    assert not CrossSigningKeys.create(ALICE).matches(*keys.upload_body().values())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({SECRET_MASTER: None}, "m.cross_signing.master is not a private key"),
        ({SECRET_SELF_SIGNING: "AAAA"}, "m.cross_signing.self_signing is not a private key"),
        ({SECRET_USER_SIGNING: "not base64!"}, "m.cross_signing.user_signing is not a private"),
        ({SECRET_MASTER: b64encode(bytes(33))}, "33"),
    ],
)
def test_from_export_refuses_bad_seeds(
    keys: CrossSigningKeys, change: dict[str, object], message: str
) -> None:
    exported: dict[str, object] = {**keys.export(), **change}
    with pytest.raises(ValueError, match=message) as info:
        CrossSigningKeys.from_export(ALICE, exported)
    for seed in keys.export().values():
        assert seed not in str(info.value)
    missing = {k: v for k, v in keys.export().items() if k != SECRET_USER_SIGNING}
    with pytest.raises(ValueError, match="user_signing is missing"):
        CrossSigningKeys.from_export(ALICE, missing)


def test_record_round_trip_and_refusals(keys: CrossSigningKeys) -> None:
    record = keys.to_record(PICKLE_KEY)
    assert record.master_key == keys.master.public_key
    assert record.self_signing_key == keys.self_signing.public_key
    assert record.user_signing_key == keys.user_signing.public_key
    for seed in keys.export().values():
        assert seed not in record.pickle  # encrypted, not just hidden
    again = CrossSigningKeys.from_record(record, PICKLE_KEY)
    assert again.public_keys == keys.public_keys
    assert again.export() == keys.export()

    with pytest.raises(SecretDecryptionError, match="MAC"):
        CrossSigningKeys.from_record(record, bytes(32))
    with pytest.raises(ValueError, match="32 bytes"):
        CrossSigningKeys.from_record(record, b"short")
    with pytest.raises(SecretDecryptionError, match="damaged"):
        CrossSigningKeys.from_record(_replace(record, pickle="{not json"), PICKLE_KEY)
    with pytest.raises(SecretDecryptionError):
        CrossSigningKeys.from_record(_replace(record, pickle='{"iv": 1}'), PICKLE_KEY)
    other = CrossSigningKeys.create(ALICE).to_record(PICKLE_KEY)
    with pytest.raises(ValueError, match="public keys"):
        CrossSigningKeys.from_record(_replace(record, pickle=other.pickle), PICKLE_KEY)
    # A record's ciphertext is not a secret storage secret and the other way round.
    with pytest.raises(SecretDecryptionError):
        decrypt_secret(PICKLE_KEY, SECRET_MASTER, __import__("json").loads(record.pickle))


def _replace(record: CrossSigningRecord, **changes: str) -> CrossSigningRecord:
    fields = {
        "user_id": record.user_id,
        "master_key": record.master_key,
        "self_signing_key": record.self_signing_key,
        "user_signing_key": record.user_signing_key,
        "pickle": record.pickle,
    }
    return CrossSigningRecord(**{**fields, **changes})


def test_private_keys_never_in_repr_or_str(keys: CrossSigningKeys) -> None:
    storage = SecretStorageKey.create()
    record = keys.to_record(PICKLE_KEY)
    secrets_ = [*keys.export().values(), record.pickle, storage.recovery_key]
    raw = [b64decode(s) for s in keys.export().values()]
    shown = [
        repr(keys),
        str(keys),
        repr(keys.master),
        str(keys.self_signing),
        repr(record),
        str(record),
        repr(storage),
        str(storage),
        f"{keys} {record} {storage}",
    ]
    for text in shown:
        for secret in secrets_:
            assert secret not in text
            assert secret.replace(" ", "") not in text
        for seed in raw:
            assert seed.hex() not in text
            assert b64encode(seed)[:16] not in text
    assert keys.master.public_key in repr(keys)
    assert storage.key_id in repr(storage)
    for obj in (keys, keys.master, storage):
        with pytest.raises(TypeError, match="pickled"):
            pickle.dumps(obj)


# ---------------------------------------------------------------------- recovery key


def test_recovery_key_matches_matrix_js_sdk() -> None:
    assert encode_recovery_key(JS_KEY) == JS_RECOVERY_KEY
    assert decode_recovery_key(JS_RECOVERY_KEY) == JS_KEY
    assert decode_recovery_key(JS_RECOVERY_KEY.replace(" ", "")) == JS_KEY
    assert decode_recovery_key(f"\n  {JS_RECOVERY_KEY}\t\n") == JS_KEY


def test_recovery_key_vectors_of_matrix_rust_sdk() -> None:
    assert decode_recovery_key(RUST_SPACED) == RUST_SPACED_BYTES
    with pytest.raises(RecoveryKeyError, match="typo"):
        decode_recovery_key("EsTpRvZTnjck8YrhRAtwXLS84Nr2r9S9LGAWDaExVAPBvLRk")
    with pytest.raises(RecoveryKeyError, match="not a recovery key"):
        decode_recovery_key("AATpRvZTnjck8YrhRAtwXLS84Nr2r9S9LGAWDaExVAPBvLRk")
    with pytest.raises(RecoveryKeyError, match="missing or extra"):
        decode_recovery_key("AATpRvZTnjck8YrhRAtwXLS84Nr2r9S9")
    with pytest.raises(RecoveryKeyError, match="never used"):
        decode_recovery_key("AATpRvZTnjck8YrhRAtwXLS84Nr0OIl")


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=32, max_size=32))
def test_recovery_key_round_trip(key: bytes) -> None:
    text = encode_recovery_key(key)
    groups = text.split(" ")
    assert all(len(g) == 4 for g in groups[:-1])
    assert 1 <= len(groups[-1]) <= 4
    assert text.startswith("Es")
    assert len(text.replace(" ", "")) == 48
    assert decode_recovery_key(text) == key


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("   \n ", "empty"),
        (None, "not text"),
        (b"EsT1", "not text"),
        (JS_RECOVERY_KEY[:-1], "missing or extra"),  # one character dropped
        (JS_RECOVERY_KEY + "z", "missing or extra"),  # one too many
        ("EsT1 " * 20, "too long"),
        (JS_RECOVERY_KEY.replace("t3bE", "t0bE"), "character 6 .*'0'.* no 0, O, I or l"),
        (JS_RECOVERY_KEY.replace("aeKB", "aeKl"), "character 48 .*'l'"),
        (JS_RECOVERY_KEY.replace("EsT1", "EsT\u00e9"), "character 4 .*\\(a character\\)"),
        ("1" * 48, "not a recovery key"),
    ],
)
def test_recovery_key_typos_are_clear_errors(text: object, message: str) -> None:
    with pytest.raises(RecoveryKeyError, match=message) as info:
        decode_recovery_key(text)
    assert JS_RECOVERY_KEY.replace(" ", "")[8:] not in str(info.value)


def test_one_changed_character_never_unlocks_storage() -> None:
    """Every single-character substitution of a recovery key is either refused with
    a RecoveryKeyError (nearly all: the parity byte) or a key whose check value does
    not match (the few that pass the parity byte)."""
    compact = JS_RECOVERY_KEY.replace(" ", "")
    alphabet = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
    refused = wrong = 0
    for i, original in enumerate(compact):
        for char in alphabet:
            if char == original:
                continue
            typo = compact[:i] + char + compact[i + 1 :]
            try:
                key = decode_recovery_key(typo)
            except RecoveryKeyError:
                refused += 1
                continue
            assert key != JS_KEY
            assert not check_key(key, {"algorithm": SSSS_ALGORITHM, **JS_CHECK})
            wrong += 1
    assert refused + wrong == 48 * 57
    assert refused > 0.95 * (refused + wrong)


# ------------------------------------------------------------- secret storage crypto


def test_check_value_matches_matrix_js_sdk() -> None:
    iv = b64decode(JS_CHECK["iv"])
    assert key_check(JS_KEY, iv=iv) == {k: v.rstrip("=") for k, v in JS_CHECK.items()}
    assert check_key(JS_KEY, {"algorithm": SSSS_ALGORITHM, **JS_CHECK})  # padded base64
    assert not check_key(bytes(32), {"algorithm": SSSS_ALGORITHM, **JS_CHECK})


def test_secret_matches_matrix_js_sdk() -> None:
    assert decrypt_secret(JS_KEY, JS_SECRET_NAME, JS_SECRET) == JS_SECRET_PLAIN
    again = encrypt_secret(JS_KEY, JS_SECRET_NAME, JS_SECRET_PLAIN, iv=b64decode(JS_SECRET["iv"]))
    assert again == {k: v.rstrip("=") for k, v in JS_SECRET.items()}


def test_recovery_key_of_matrix_rust_sdk_unlocks_its_description() -> None:
    key = SecretStorageKey.from_recovery_key(RUST_RECOVERY_KEY, RUST_KEY_ID, RUST_DESCRIPTION)
    assert key.key_id == RUST_KEY_ID
    assert key.recovery_key == RUST_RECOVERY_KEY
    assert key.event_type == f"m.secret_storage.key.{RUST_KEY_ID}"


def test_wrong_recovery_key_is_told_by_the_check_value() -> None:
    with pytest.raises(WrongRecoveryKey, match=f"not the one of secret storage key {RUST_KEY_ID}"):
        SecretStorageKey.from_recovery_key(JS_RECOVERY_KEY, RUST_KEY_ID, RUST_DESCRIPTION)
    with pytest.raises(WrongRecoveryKey, match=r"not an m\.secret_storage\.v1\.aes-hmac-sha2 key"):
        SecretStorageKey.from_recovery_key(
            RUST_RECOVERY_KEY, RUST_KEY_ID, {**RUST_DESCRIPTION, "algorithm": "m.custom"}
        )
    with pytest.raises(WrongRecoveryKey):
        SecretStorageKey.from_recovery_key(RUST_RECOVERY_KEY, RUST_KEY_ID, None)
    with pytest.raises(RecoveryKeyError):
        SecretStorageKey.from_recovery_key(RUST_RECOVERY_KEY[:-2], RUST_KEY_ID, RUST_DESCRIPTION)


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ({"algorithm": SSSS_ALGORITHM}, True),  # no check value: spec says assume valid
        ({"algorithm": SSSS_ALGORITHM, "name": "x"}, True),
        ({**RUST_DESCRIPTION, "iv": b64encode(bytes(14))}, False),
        ({**RUST_DESCRIPTION, "mac": b64encode(bytes(10))}, False),
        ({**RUST_DESCRIPTION, "iv": "not base64!"}, False),
        ({**RUST_DESCRIPTION, "mac": None}, False),  # half a check value
        ({**RUST_DESCRIPTION, "iv": 12}, False),
        ({**RUST_DESCRIPTION, "algorithm": "m.secret_storage.v1.curve25519-aes-sha2"}, False),
        ([], False),
        (None, False),
    ],
)
def test_check_key_hostile_descriptions(description: object, expected: bool) -> None:
    key = decode_recovery_key(RUST_RECOVERY_KEY)
    assert check_key(key, description) is expected


def test_derive_keys_uses_the_secret_name() -> None:
    aes, mac = derive_keys(JS_KEY, "m.cross_signing.master")
    assert len(aes) == len(mac) == 32
    assert aes != mac
    assert derive_keys(JS_KEY, "m.cross_signing.self_signing") != (aes, mac)
    assert derive_keys(JS_KEY, "") != (aes, mac)
    with pytest.raises(ValueError, match="32 bytes"):
        derive_keys(b"short", "")


def test_generated_ivs_clear_bit_63() -> None:
    for _ in range(64):
        iv = b64decode(encrypt_secret(JS_KEY, "x", "secret")["iv"])
        assert len(iv) == 16
        assert iv[8] & 0x80 == 0
    ivs = {encrypt_secret(JS_KEY, "x", "secret")["iv"] for _ in range(16)}
    assert len(ivs) == 16  # random


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=300), st.text(min_size=1, max_size=40))
def test_secret_round_trip(secret: str, name: str) -> None:
    try:
        secret.encode("utf-8")
        name.encode("utf-8")
    except UnicodeEncodeError:
        return  # lone surrogates are not text a secret can hold
    assert decrypt_secret(JS_KEY, name, encrypt_secret(JS_KEY, name, secret)) == secret


def _non_utf8_secret(key: bytes, name: str) -> dict[str, str]:
    aes_key, mac_key = derive_keys(key, name)
    iv = bytes(16)
    encryptor = Cipher(algorithms.AES(aes_key), modes.CTR(iv)).encryptor()
    ciphertext = encryptor.update(b"\xff\xfe") + encryptor.finalize()
    h = hmac.HMAC(mac_key, hashes.SHA256())
    h.update(ciphertext)
    return {
        "iv": b64encode(iv),
        "ciphertext": b64encode(ciphertext),
        "mac": b64encode(h.finalize()),
    }


def _flip(text: str) -> str:
    raw = bytearray(b64decode(text))
    raw[0] ^= 1
    return b64encode(bytes(raw))


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("m.cross_signing.self_signing", JS_SECRET, "MAC"),  # another secret's name
        (JS_SECRET_NAME, {**JS_SECRET, "ciphertext": _flip(JS_SECRET["ciphertext"])}, "MAC"),
        (JS_SECRET_NAME, {**JS_SECRET, "mac": _flip(JS_SECRET["mac"])}, "MAC"),
        (JS_SECRET_NAME, {**JS_SECRET, "mac": JS_SECRET["mac"][:20]}, "mac is not 32 bytes"),
        (JS_SECRET_NAME, {**JS_SECRET, "iv": JS_SECRET["iv"][:10]}, "iv is not 16 bytes"),
        (JS_SECRET_NAME, {**JS_SECRET, "ciphertext": "%%%%"}, "ciphertext is not base64"),
        (JS_SECRET_NAME, {**JS_SECRET, "ciphertext": None}, "ciphertext is not base64"),
        (JS_SECRET_NAME, {"iv": JS_SECRET["iv"], "mac": JS_SECRET["mac"]}, "ciphertext"),
        (JS_SECRET_NAME, [], "not an object"),
        (JS_SECRET_NAME, "x", "not an object"),
        ("n", _non_utf8_secret(JS_KEY, "n"), "not text"),
    ],
)
def test_decrypt_secret_hostile(name: str, data: object, message: str) -> None:
    with pytest.raises(SecretDecryptionError, match=message) as info:
        decrypt_secret(JS_KEY, name, data)
    assert JS_SECRET_PLAIN not in str(info.value)


def test_decrypt_with_wrong_key_fails_the_mac() -> None:
    with pytest.raises(SecretDecryptionError, match="MAC"):
        decrypt_secret(bytes(32), JS_SECRET_NAME, JS_SECRET)


# ------------------------------------------------------------------------ end to end


def test_lost_store_restores_cross_signing_from_secret_storage(device: Identity) -> None:
    """First start: keys created, uploaded, stored in secret storage under a new
    recovery key. After a lost store: only the recovery key and the account data are
    left; the keys come back and sign the new device, which verifies against the
    public keys the server kept."""
    keys = CrossSigningKeys.create(ALICE)
    server_keys = keys.upload_body()
    storage = SecretStorageKey.create()
    account_data: dict[str, object] = {
        storage.event_type: storage.description(name="surfaces-bot"),
        "m.secret_storage.default_key": storage.default_key_content(),
    }
    for name, seed in keys.export().items():
        account_data[name] = storage.encrypt(name, seed)
    recovery_key = storage.recovery_key
    del keys, storage

    default = account_data["m.secret_storage.default_key"]
    assert isinstance(default, dict)
    key_id = default["key"]
    storage = SecretStorageKey.from_recovery_key(
        recovery_key, key_id, account_data[f"m.secret_storage.key.{key_id}"]
    )
    restored = CrossSigningKeys.from_export(
        ALICE,
        {
            name: storage.decrypt(name, account_data[name])
            for name in (SECRET_MASTER, SECRET_SELF_SIGNING, SECRET_USER_SIGNING)
        },
    )
    assert restored.matches(*server_keys.values())
    new_device = Identity.create(ALICE, "NEWDEVICE")
    signed = restored.sign_device(new_device.device_keys())[ALICE]["NEWDEVICE"]
    assert device_signed_by_self_signing_key(signed, server_keys["self_signing_key"])
    assert verify_cross_signing_keys(ALICE, *server_keys.values())

    # A secret for another key id, or a secret storage key that is not this one.
    with pytest.raises(SecretDecryptionError, match="not encrypted for key"):
        SecretStorageKey.create().decrypt(SECRET_MASTER, account_data[SECRET_MASTER])
    with pytest.raises(SecretDecryptionError, match="not encrypted for key"):
        storage.decrypt(SECRET_MASTER, {"encrypted": []})
    with pytest.raises(SecretDecryptionError, match="MAC"):
        SecretStorageKey(key_id, bytes(32)).decrypt(SECRET_MASTER, account_data[SECRET_MASTER])


# ------------------------------------------------------------------------ passphrase

# matrix-rust-sdk secret_storage.rs `from_account_data_and_passphrase`.
RUST_PASSPHRASE = "It's a secret to everybody"
RUST_PASSPHRASE_DESCRIPTION = {
    "algorithm": "m.secret_storage.v1.aes-hmac-sha2",
    "iv": "gH2iNpiETFhApvW6/FFEJQ",
    "mac": "9Lw12m5SKDipNghdQXKjgpfdj1/K7HFI2brO+UWAGoM",
    "passphrase": {
        "algorithm": "m.pbkdf2",
        "salt": "IuLnH7S85YtZmkkBJKwNUKxWF42g9O1H",
        "iterations": 10,
    },
}


def test_passphrase_of_matrix_rust_sdk_unlocks_its_description() -> None:
    key = SecretStorageKey.from_passphrase(
        RUST_PASSPHRASE, "DZkbKc0RtKSq0z8V61w6KBmJCK6OCiIu", RUST_PASSPHRASE_DESCRIPTION
    )
    assert key.key_id == "DZkbKc0RtKSq0z8V61w6KBmJCK6OCiIu"
    with pytest.raises(WrongRecoveryKey, match="passphrase is not the one"):
        SecretStorageKey.from_passphrase(
            "It's a secret to nobody", "k", RUST_PASSPHRASE_DESCRIPTION
        )
    with pytest.raises(WrongRecoveryKey, match="not an"):
        SecretStorageKey.from_passphrase(RUST_PASSPHRASE, "k", {"passphrase": {}})


@pytest.mark.parametrize(
    ("passphrase", "message"),
    [
        (None, "no m.pbkdf2 passphrase"),
        ({"algorithm": "m.scrypt", "salt": "s", "iterations": 10}, "no m.pbkdf2"),
        ({"algorithm": "m.pbkdf2", "iterations": 10}, "salt is not text"),
        ({"algorithm": "m.pbkdf2", "salt": "s", "iterations": "10"}, "not an integer"),
        ({"algorithm": "m.pbkdf2", "salt": "s", "iterations": True}, "not an integer"),
        ({"algorithm": "m.pbkdf2", "salt": "s", "iterations": 0}, "out of 1"),
        ({"algorithm": "m.pbkdf2", "salt": "s", "iterations": 10**12}, "out of 1"),
        ({"algorithm": "m.pbkdf2", "salt": "s", "iterations": 10, "bits": 128}, "256-bit"),
    ],
)
def test_hostile_passphrase_descriptions(passphrase: object, message: str) -> None:
    description = {**RUST_PASSPHRASE_DESCRIPTION, "passphrase": passphrase}
    with pytest.raises(SecretStorageError, match=message):
        key_from_passphrase(RUST_PASSPHRASE, description)
    with pytest.raises(SecretStorageError, match=message):
        SecretStorageKey.from_passphrase(RUST_PASSPHRASE, "k", description)
