"""`MatrixClient` session endpoints against a real Synapse: versions, login, whoami, logout."""

from __future__ import annotations

import time

import pytest

from matrix_api import MatrixClient, UnknownToken, new_txn_id
from matrix_api.errors import MissingToken
from matrix_api.testing.synapse import SynapseServer
from matrix_helpers import MakeUser, client_for, text


async def test_versions_lists_the_spec_versions_without_a_token(synapse: SynapseServer) -> None:
    async with MatrixClient(synapse.base_url) as client:
        versions = await client.versions()

    assert "v1.1" in versions.versions
    assert all(isinstance(flag, bool) for flag in versions.unstable_features.values())


async def test_the_servers_clock_comes_from_its_answers(synapse: SynapseServer) -> None:
    async with MatrixClient(synapse.base_url) as client:
        assert client.server_time_ms() is None
        for _ in range(3):
            await client.versions()
        told = client.server_time_ms()
        here = time.time() * 1000

    # Synapse runs on this machine, on this clock: the two agree, the server's
    # reading never ahead, and behind by no more than the second Date leaves open.
    assert told is not None
    assert here - 1100 <= told <= here + 50


async def test_password_login_gives_a_new_device_and_whoami_confirms_it(
    synapse: SynapseServer, make_user: MakeUser
) -> None:
    user = make_user("login")

    async with MatrixClient(synapse.base_url) as client:
        assert (client.user_id, client.device_id) == (None, None)
        login = await client.login_password(
            user.user_id, user.password, initial_device_display_name="integration test"
        )

        assert login.user_id == user.user_id
        assert login.device_id not in ("", user.device_id)  # a device of its own
        assert login.access_token not in repr(login)
        assert (client.user_id, client.device_id) == (user.user_id, login.device_id)
        assert client.has_access_token

        # A fresh client with only the token learns who it is from whoami.
        async with MatrixClient(synapse.base_url, access_token=login.access_token) as fresh:
            who = await fresh.whoami()
            assert (who.user_id, who.device_id, who.is_guest) == (
                user.user_id,
                login.device_id,
                False,
            )
            assert (fresh.user_id, fresh.device_id) == (user.user_id, login.device_id)


async def test_login_with_the_bare_localpart(synapse: SynapseServer, make_user: MakeUser) -> None:
    user = make_user("localpart")
    localpart = user.user_id.removeprefix("@").split(":", 1)[0]

    async with MatrixClient(synapse.base_url) as client:
        login = await client.login_password(localpart, user.password)

    assert login.user_id == user.user_id


async def test_relogin_on_the_same_device_keeps_transaction_ids(
    synapse: SynapseServer, make_user: MakeUser
) -> None:
    user = make_user("relogin")
    txn_id = new_txn_id()

    async with client_for(synapse, user) as client:
        room_id = await client.create_room(name="txn across logins")
        first = await client.send_event(room_id, "m.room.message", text("once"), txn_id)

        login = await client.login_password(user.user_id, user.password, device_id=user.device_id)
        assert login.device_id == user.device_id
        assert login.access_token != user.access_token
        assert (await client.whoami()).device_id == user.device_id

        # Same device, new token: the server still knows this transaction.
        again = await client.send_event(room_id, "m.room.message", text("twice?"), txn_id)
        page = await client.messages(room_id, direction="b", limit=10)

    # Logging in again on a device does not revoke the device's earlier token.
    async with client_for(synapse, user) as old_token:
        assert (await old_token.whoami()).device_id == user.device_id

    assert again == first
    assert [e.event_id for e in page.chunk if e.type == "m.room.message"] == [first]
    assert page.chunk[0].content["body"] == "once"


async def test_logout_invalidates_the_token(synapse: SynapseServer, make_user: MakeUser) -> None:
    user = make_user("logout")

    async with MatrixClient(synapse.base_url) as client:
        login = await client.login_password(user.user_id, user.password)
        await client.whoami()
        await client.logout()

        assert not client.has_access_token
        # The client itself refuses to send without a token, before any request.
        with pytest.raises(MissingToken):
            await client.whoami()

    async with MatrixClient(synapse.base_url, access_token=login.access_token) as stale:
        with pytest.raises(UnknownToken) as caught:
            await stale.whoami()

    error = caught.value
    assert error.status == 401
    assert error.code == "M_UNKNOWN_TOKEN"
    assert error.soft_logout is False
    assert login.access_token not in str(error)

    # Other sessions of the same user are not affected.
    async with client_for(synapse, user) as other:
        assert (await other.whoami()).user_id == user.user_id
