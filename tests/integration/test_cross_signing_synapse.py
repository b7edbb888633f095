"""matrix_crypto.cross_signing against a real Synapse: the server accepts what the module
builds and hands back what the module's verification accepts.

- the three key objects go up through ``/keys/device_signing/upload`` (with password
  user-interactive auth if Synapse asks for it: it does not for the first keys), the
  same body again is accepted without auth (deterministic signatures: a retried
  upload is "the same keys"), and new keys replacing them need the password;
- the device's self-signing signature goes up through ``/keys/signatures/upload``
  with no failures, and a forged one (sent first) is refused by Synapse too;
- another user sees, through ``/keys/query``, a master and self-signing key that
  `verify_cross_signing_keys` accepts and the device `device_signed_by_self_signing_key`
  accepts; the owner also sees the user-signing key;
- that user signs the first one's master key with their user-signing key (accepted);
- secret storage through account data: the private keys stored encrypted under a new
  recovery key come back with only that key, after a "lost store".

Plain httpx on purpose: the endpoints of ``matrix_api`` are built and tested elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from matrix_api.testing.synapse import RegisteredUser, SynapseServer
from matrix_crypto.cross_signing import (
    SECRET_MASTER,
    SECRET_SELF_SIGNING,
    SECRET_USER_SIGNING,
    CrossSigningKeys,
    SecretStorageKey,
    device_signed_by_self_signing_key,
    verify_cross_signing_keys,
)
from matrix_crypto.identity import Identity
from matrix_helpers import MakeUser


@pytest.fixture
def http(synapse: SynapseServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{synapse.base_url}/_matrix/client/v3", timeout=30.0) as client:
        yield client


def _auth(user: RegisteredUser) -> dict[str, str]:
    return {"Authorization": f"Bearer {user.access_token}"}


def _post(http: httpx.Client, user: RegisteredUser, path: str, body: dict[str, Any]) -> Any:
    response = http.post(path, json=body, headers=_auth(user))
    assert response.status_code == 200, (path, response.status_code, response.text)
    return response.json()


def _upload_device(http: httpx.Client, user: RegisteredUser) -> Identity:
    identity = Identity.create(user.user_id, user.device_id)
    _post(http, user, "/keys/upload", {"device_keys": identity.device_keys()})
    return identity


def _upload_cross_signing(http: httpx.Client, user: RegisteredUser, body: dict[str, Any]) -> int:
    """Upload, answering a UIA challenge with the password; returns the first status."""
    response = http.post("/keys/device_signing/upload", json=body, headers=_auth(user))
    first = response.status_code
    if first == 401:
        session = response.json().get("session")
        auth = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user.user_id},
            "password": user.password,
            "session": session,
        }
        response = http.post(
            "/keys/device_signing/upload", json={**body, "auth": auth}, headers=_auth(user)
        )
    assert response.status_code == 200, response.text
    return first


def test_synapse_accepts_and_hands_back_cross_signing(
    http: httpx.Client, make_user: MakeUser
) -> None:
    alice, bob = make_user("xsign-alice"), make_user("xsign-bob")
    device = _upload_device(http, alice)
    keys = CrossSigningKeys.create(alice.user_id)

    # No master key yet: Synapse asks no user-interactive auth (spec 1.11).
    assert _upload_cross_signing(http, alice, keys.upload_body()) == 200
    # The same body again needs no auth: the spec's idempotent retry.
    again = http.post("/keys/device_signing/upload", json=keys.upload_body(), headers=_auth(alice))
    assert again.status_code == 200, again.text

    # A forged signature (by the master key, under the self-signing key's id) is
    # refused by Synapse as it is by device_signed_by_self_signing_key. First: once a
    # device has a self-signing signature, Synapse skips any other one unchecked.
    forged = CrossSigningKeys(alice.user_id, keys.master, keys.master, keys.user_signing)
    forged_body = forged.sign_device(device.device_keys())
    signed = forged_body[alice.user_id][device.device_id]
    signature = signed["signatures"][alice.user_id].pop(f"ed25519:{keys.master.public_key}")
    signed["signatures"][alice.user_id][f"ed25519:{keys.self_signing.public_key}"] = signature
    refused = _post(http, alice, "/keys/signatures/upload", forged_body)
    assert device.device_id in refused["failures"][alice.user_id], refused

    signatures = _post(
        http, alice, "/keys/signatures/upload", keys.sign_device(device.device_keys())
    )
    assert signatures.get("failures", {}) == {}

    # Bob's view: master and self-signing keys, the cross-signed device; no USK.
    seen = _post(http, bob, "/keys/query", {"device_keys": {alice.user_id: []}})
    master = seen["master_keys"][alice.user_id]
    ssk = seen["self_signing_keys"][alice.user_id]
    assert alice.user_id not in seen.get("user_signing_keys", {})
    assert verify_cross_signing_keys(alice.user_id, master, ssk)
    assert keys.matches(master, ssk)
    device_keys = seen["device_keys"][alice.user_id][device.device_id]
    assert device_signed_by_self_signing_key(device_keys, ssk)
    assert not device_signed_by_self_signing_key(
        device_keys, CrossSigningKeys.create(alice.user_id).self_signing_key()
    )

    # Alice's own view includes her user-signing key.
    own = _post(http, alice, "/keys/query", {"device_keys": {alice.user_id: []}})
    usk = own["user_signing_keys"][alice.user_id]
    assert verify_cross_signing_keys(alice.user_id, master, ssk, usk)
    assert keys.matches(master, ssk, usk)

    # Bob verifies Alice: his user-signing key signs her master key.
    bob_keys = CrossSigningKeys.create(bob.user_id)
    _upload_cross_signing(http, bob, bob_keys.upload_body())
    signed_user = _post(http, bob, "/keys/signatures/upload", bob_keys.sign_user(master))
    assert signed_user.get("failures", {}) == {}
    bob_view = _post(http, bob, "/keys/query", {"device_keys": {alice.user_id: []}})
    bob_signature_id = f"ed25519:{bob_keys.user_signing.public_key}"
    master_signatures = bob_view["master_keys"][alice.user_id]["signatures"]
    assert bob_signature_id in master_signatures[bob.user_id]

    # New keys replacing existing ones need the password (UIA), then are taken.
    replacement = CrossSigningKeys.create(alice.user_id)
    assert _upload_cross_signing(http, alice, replacement.upload_body()) == 401
    latest = _post(http, bob, "/keys/query", {"device_keys": {alice.user_id: []}})
    assert replacement.matches(
        latest["master_keys"][alice.user_id], latest["self_signing_keys"][alice.user_id]
    )
    # The device's old cross-signature is by a self-signing key no longer current.
    device_keys = latest["device_keys"][alice.user_id][device.device_id]
    assert not device_signed_by_self_signing_key(
        device_keys, latest["self_signing_keys"][alice.user_id]
    )


def test_secret_storage_round_trip_through_account_data(
    http: httpx.Client, make_user: MakeUser
) -> None:
    alice = make_user("xsign-ssss")
    keys = CrossSigningKeys.create(alice.user_id)
    storage = SecretStorageKey.create()
    base = f"/user/{quote(alice.user_id, safe='')}/account_data"

    def put(event_type: str, content: dict[str, Any]) -> None:
        response = http.put(f"{base}/{event_type}", json=content, headers=_auth(alice))
        assert response.status_code == 200, response.text

    def get(event_type: str) -> Any:
        response = http.get(f"{base}/{event_type}", headers=_auth(alice))
        assert response.status_code == 200, response.text
        return response.json()

    put(storage.event_type, storage.description(name="surfaces-bot"))
    put("m.secret_storage.default_key", storage.default_key_content())
    for name, seed in keys.export().items():
        put(name, storage.encrypt(name, seed))
    recovery_key = storage.recovery_key
    del storage

    key_id = get("m.secret_storage.default_key")["key"]
    restored_storage = SecretStorageKey.from_recovery_key(
        recovery_key, key_id, get(f"m.secret_storage.key.{key_id}")
    )
    restored = CrossSigningKeys.from_export(
        alice.user_id,
        {
            name: restored_storage.decrypt(name, get(name))
            for name in (SECRET_MASTER, SECRET_SELF_SIGNING, SECRET_USER_SIGNING)
        },
    )
    assert restored.public_keys == keys.public_keys
