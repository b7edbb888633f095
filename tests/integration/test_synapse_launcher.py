"""Smoke tests for the Synapse launcher the integration suite stands on."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import httpx
import pytest

from matrix_api.testing.synapse import RegisteredUser, SynapseServer


def whoami(server: SynapseServer, user: RegisteredUser) -> str:
    response = httpx.get(
        f"{server.base_url}/_matrix/client/v3/account/whoami",
        headers={"Authorization": f"Bearer {user.access_token}"},
    )
    assert response.status_code == 200, response.text
    user_id: str = response.json()["user_id"]
    return user_id


def test_registered_users_can_authenticate(
    synapse: SynapseServer, make_user: Callable[..., RegisteredUser]
) -> None:
    alice = make_user("alice")
    bob = make_user("bob")

    assert alice.user_id.startswith("@alice-")
    assert alice.user_id.endswith(f":{synapse.server_name}")
    assert alice.user_id != bob.user_id
    assert whoami(synapse, alice) == alice.user_id
    assert whoami(synapse, bob) == bob.user_id


def test_tokens_are_kept_out_of_reprs(make_user: Callable[..., RegisteredUser]) -> None:
    user = make_user()

    assert user.access_token not in repr(user)
    assert user.password not in repr(user)


def test_user_survives_stop_and_start(
    synapse: SynapseServer, make_user: Callable[..., RegisteredUser]
) -> None:
    carol = make_user("carol")
    old_pid, old_url = synapse.pid, synapse.base_url
    try:
        synapse.stop()
        assert (synapse.running, synapse.pid) == (False, None)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{old_url}/_matrix/client/versions")
        synapse.start()
    finally:
        if not synapse.running:  # the session server must outlive this test
            synapse.start()

    assert synapse.pid not in (None, old_pid)
    assert synapse.base_url == old_url  # nothing else took the port meanwhile
    assert whoami(synapse, carol) == carol.user_id


def send_until_rate_limited(server: SynapseServer, user: RegisteredUser, attempts: int) -> int:
    """Send up to `attempts` messages to a new room; return how many went through before a 429."""
    auth = {"Authorization": f"Bearer {user.access_token}"}
    with httpx.Client(base_url=f"{server.base_url}/_matrix/client/v3", headers=auth) as client:
        created = client.post("/createRoom", json={})
        assert created.status_code == 200, created.text
        room_id = created.json()["room_id"]
        for sent in range(attempts):
            response = client.put(
                f"/rooms/{room_id}/send/m.room.message/txn{sent}",
                json={"msgtype": "m.text", "body": f"message {sent}"},
            )
            if response.status_code == 429:
                assert response.json()["retry_after_ms"] > 0
                return sent
            assert response.status_code == 200, response.text
    return attempts


def test_relaxed_server_does_not_rate_limit(
    synapse: SynapseServer, make_user: Callable[..., RegisteredUser]
) -> None:
    assert send_until_rate_limited(synapse, make_user("chatty"), attempts=40) == 40


def test_strict_server_keeps_synapse_rate_limits(strict_synapse: SynapseServer) -> None:
    # rc_message defaults to a burst of 10 per user; a fresh user leaves other tests' users alone.
    user = strict_synapse.register_user(f"chatty-{uuid.uuid4().hex[:12]}")

    assert send_until_rate_limited(strict_synapse, user, attempts=40) < 40
