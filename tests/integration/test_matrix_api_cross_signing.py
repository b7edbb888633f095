"""The cross-signing endpoints against a real Synapse: a user's first cross-signing keys
go up without auth (MSC3967), replacing them takes the password through user-interactive
auth (refused when wrong, asked for when missing), a device signed by the self-signing
key via /keys/signatures/upload comes back to another user with that signature, and it
verifies, as do the master key's signatures over the other two keys.

The keys are `cryptography` Ed25519 keys and the signing a few lines of canonical JSON
written for the test, on purpose: the crypto layer is tested on its own.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import pytest
import trio
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from matrix_api import MatrixClient
from matrix_api.models import UserID
from matrix_api.testing.synapse import RegisteredUser, SynapseServer
from matrix_api.uia import AuthRequired, PasswordRefused
from matrix_helpers import MakeUser, RecordingTransport, client_for

OLM = "m.olm.v1.curve25519-aes-sha2"
MEGOLM = "m.megolm.v1.aes-sha2"
UPLOAD = "/_matrix/client/v3/keys/device_signing/upload"


def canonical(value: Any) -> bytes:
    """Matrix canonical JSON: sorted keys, no spaces, UTF-8 unescaped."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode()


def unpadded(raw: bytes) -> str:
    return base64.b64encode(raw).decode().rstrip("=")


def from_unpadded(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


class SigningKey:
    """One Ed25519 key pair; ``key_id`` is ``ed25519:<public key>`` (cross-signing keys)
    or ``ed25519:<device id>`` (a device)."""

    def __init__(self, name: str | None = None) -> None:
        self.private = Ed25519PrivateKey.generate()
        self.public = unpadded(
            self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        )
        self.key_id = f"ed25519:{name or self.public}"

    def sign(self, user_id: str, value: dict[str, Any]) -> dict[str, Any]:
        """``value`` with this key's signature added to those it carries."""
        unsigned = {k: v for k, v in value.items() if k not in ("signatures", "unsigned")}
        signature = unpadded(self.private.sign(canonical(unsigned)))
        signatures = {user: dict(by_key) for user, by_key in value.get("signatures", {}).items()}
        signatures.setdefault(user_id, {})[self.key_id] = signature
        return {**value, "signatures": signatures}


def verifies(signed: dict[str, Any], user_id: str, key_id: str, public: str) -> bool:
    """Whether ``signed``, as received, carries a valid signature by ``public``."""
    unsigned = {k: v for k, v in signed.items() if k not in ("signatures", "unsigned")}
    signature = signed.get("signatures", {}).get(user_id, {}).get(key_id)
    if not isinstance(signature, str):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(from_unpadded(public)).verify(
            from_unpadded(signature), canonical(unsigned)
        )
    except (InvalidSignature, ValueError):
        return False
    return True


class CrossSigning:
    """A user's three cross-signing keys and their key objects, signed by the master."""

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.master, self.self_signing, self.user_signing = SigningKey(), SigningKey(), SigningKey()

    def key_object(self, key: SigningKey, usage: str) -> dict[str, Any]:
        return {"user_id": self.user_id, "usage": [usage], "keys": {key.key_id: key.public}}

    def uploads(self) -> dict[str, dict[str, Any]]:
        return {
            "master_key": self.key_object(self.master, "master"),
            "self_signing_key": self.master.sign(
                self.user_id, self.key_object(self.self_signing, "self_signing")
            ),
            "user_signing_key": self.master.sign(
                self.user_id, self.key_object(self.user_signing, "user_signing")
            ),
        }


def device_keys(user: RegisteredUser, key: SigningKey) -> dict[str, Any]:
    """The device's key object, self-signed (its curve25519 key is random bytes: the
    server does not look at it)."""
    return key.sign(
        user.user_id,
        {
            "user_id": user.user_id,
            "device_id": user.device_id,
            "algorithms": [OLM, MEGOLM],
            "keys": {
                f"curve25519:{user.device_id}": unpadded(os.urandom(32)),
                f"ed25519:{user.device_id}": key.public,
            },
        },
    )


def recording_client(
    synapse: SynapseServer, user: RegisteredUser
) -> tuple[MatrixClient, RecordingTransport]:
    transport = RecordingTransport()
    return client_for(synapse, user, transport=transport), transport


def uploads_seen(transport: RecordingTransport) -> list[int]:
    return [exchange.status for exchange in transport.exchanges if exchange.path == UPLOAD]


async def test_a_device_signed_by_its_owner_comes_back_to_another_user_verifying(
    synapse: SynapseServer, make_user: MakeUser
) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    device_key = SigningKey(alice.device_id)
    keys = CrossSigning(alice.user_id)
    device = device_keys(alice, device_key)
    a, recorded = recording_client(synapse, alice)

    async with a, client_for(synapse, bob) as b:
        with trio.fail_after(30):
            await a.upload_keys(device_keys=device)
            # A first upload: taken without auth (MSC3967), so no password is needed.
            await a.upload_cross_signing_keys(**keys.uploads())
            # The same keys again (a retry after a lost answer): taken, still no auth.
            await a.upload_cross_signing_keys(**keys.uploads())
            signed = keys.self_signing.sign(alice.user_id, device)
            answer = await a.upload_signatures({alice.user_id: {alice.device_id: signed}})
            seen_by_bob = await b.query_keys({alice.user_id: []})
            seen_by_alice = await a.query_keys({alice.user_id: []})

    assert uploads_seen(recorded) == [200, 200]
    assert (answer.failures, answer.skipped) == ({}, [])
    alice_id = UserID(alice.user_id)

    got = seen_by_bob.device_keys[alice_id][alice.device_id]
    assert verifies(got, alice.user_id, device_key.key_id, device_key.public)
    assert verifies(got, alice.user_id, keys.self_signing.key_id, keys.self_signing.public)

    master = seen_by_bob.master_keys[alice_id]
    assert master["keys"] == {keys.master.key_id: keys.master.public}
    self_signing = seen_by_bob.self_signing_keys[alice_id]
    assert self_signing["keys"] == {keys.self_signing.key_id: keys.self_signing.public}
    assert verifies(self_signing, alice.user_id, keys.master.key_id, keys.master.public)
    # Only the user's own user-signing key is ever shown.
    assert alice_id not in seen_by_bob.user_signing_keys
    user_signing = seen_by_alice.user_signing_keys[alice_id]
    assert verifies(user_signing, alice.user_id, keys.master.key_id, keys.master.public)
    assert (seen_by_bob.skipped, seen_by_alice.skipped) == ([], [])


async def test_a_badly_signed_device_is_a_failure_in_the_answer(
    synapse: SynapseServer, make_user: MakeUser
) -> None:
    alice = make_user("alice")
    device_key = SigningKey(alice.device_id)
    keys = CrossSigning(alice.user_id)
    device = device_keys(alice, device_key)

    async with client_for(synapse, alice) as a:
        with trio.fail_after(30):
            await a.upload_keys(device_keys=device)
            await a.upload_cross_signing_keys(**keys.uploads())
            # Signed by a key that is not the self-signing key, under its id.
            forged = SigningKey()
            forged.key_id = keys.self_signing.key_id
            answer = await a.upload_signatures(
                {alice.user_id: {alice.device_id: forged.sign(alice.user_id, device)}}
            )
            after = await a.query_keys({alice.user_id: []})

    failure = answer.failures[UserID(alice.user_id)][alice.device_id]
    assert failure["errcode"] == "M_INVALID_SIGNATURE"
    got = after.device_keys[UserID(alice.user_id)][alice.device_id]
    assert keys.self_signing.key_id not in got["signatures"][alice.user_id]


async def test_replacing_the_keys_takes_the_password_through_interactive_auth(
    synapse: SynapseServer, make_user: MakeUser
) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    first, second = CrossSigning(alice.user_id), CrossSigning(alice.user_id)
    a, recorded = recording_client(synapse, alice)

    async with a, client_for(synapse, bob) as b:
        with trio.fail_after(60):
            await a.upload_cross_signing_keys(**first.uploads())
            assert uploads_seen(recorded) == [200]

            with pytest.raises(AuthRequired) as no_password:
                await a.upload_cross_signing_keys(**second.uploads())
            assert uploads_seen(recorded)[1:] == [401]

            wrong = "not-" + alice.password
            with pytest.raises(PasswordRefused) as refused:
                await a.upload_cross_signing_keys(**second.uploads(), password=wrong)
            assert uploads_seen(recorded)[2:] == [401, 401]

            still = await b.query_keys({alice.user_id: []})
            await a.upload_cross_signing_keys(**second.uploads(), password=alice.password)
            replaced = await b.query_keys({alice.user_id: []})

    # One challenge, one answer with the password: no more.
    assert uploads_seen(recorded)[4:] == [401, 200]
    challenge = no_password.value.challenge
    assert challenge is not None
    assert challenge.session
    assert challenge.offers_password()
    for error in (no_password.value, refused.value):
        assert alice.password not in str(error)
        assert alice.password not in repr(error)
        assert wrong not in str(error)
        assert wrong not in repr(error)
    alice_id = UserID(alice.user_id)
    assert still.master_keys[alice_id]["keys"] == {first.master.key_id: first.master.public}
    assert replaced.master_keys[alice_id]["keys"] == {second.master.key_id: second.master.public}
    self_signing = replaced.self_signing_keys[alice_id]
    assert verifies(self_signing, alice.user_id, second.master.key_id, second.master.public)
