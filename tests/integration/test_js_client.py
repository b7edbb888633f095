"""The independent E2EE client (matrix-js-sdk + Rust crypto, js_client.py) works against Synapse.

This proves the harness the E2EE tests stand on: two js clients talk encrypted to each other,
and a broken expectation fails fast with a clear error instead of hanging.
"""

from __future__ import annotations

import json

import pytest
import trio

from js_client import JsClient, JsClientError, JsClientTimeout, open_js_client
from matrix_api.testing.synapse import RegisteredUser, SynapseServer
from matrix_helpers import MakeUser


async def logged_in(client: JsClient, synapse: SynapseServer, user: RegisteredUser) -> None:
    login = await client.login(synapse.base_url, user.user_id, user.password)
    assert login.user_id == user.user_id
    assert login.device_id != user.device_id  # a device of its own, with keys
    assert login.ed25519
    assert login.curve25519


async def test_encrypted_direct_chat_both_ways(synapse: SynapseServer, make_user: MakeUser) -> None:
    alice_user, bob_user = make_user("alice"), make_user("bob")
    with trio.fail_after(120):
        async with open_js_client("alice") as alice, open_js_client("bob") as bob:
            assert alice.versions["matrix-js-sdk"]
            await logged_in(alice, synapse, alice_user)
            await logged_in(bob, synapse, bob_user)

            room_id = await alice.create_encrypted_dm(bob_user.user_id)
            assert await bob.join(room_id) == alice_user.user_id  # a direct-chat invite
            assert await alice.room_encrypted(room_id)

            sent = await alice.send_text(room_id, "hello")
            got = await bob.wait_for_message(
                room_id, sender=alice_user.user_id, body_contains="hello"
            )
            assert got.event_id == sent
            assert got.body == "hello"
            assert got.msgtype == "m.text"
            assert got.encrypted
            assert not got.decryption_failure
            assert got.relates_to is None

            answer = await bob.send_text(room_id, "hi alice")
            back = await alice.wait_for_message(
                room_id, sender=bob_user.user_id, body_contains="hi"
            )
            assert (back.event_id, back.body, back.encrypted) == (answer, "hi alice", True)
            assert not back.decryption_failure

            # Each side knows the other's device with keys (the bot's tests rely on this).
            bob_devices = await alice.devices(bob_user.user_id)
            assert any(d.curve25519 and d.ed25519 for d in bob_devices)
            assert [m.body for m in await bob.messages(room_id)] == ["hello", "hi alice"]


async def test_a_late_joiner_sees_earlier_messages_as_undecryptable(
    synapse: SynapseServer, make_user: MakeUser
) -> None:
    # Room keys go to the members of the moment: carol, invited after "before you", has no key
    # for it. The harness must report that as a failure (the late-key tests depend on it).
    alice_user, carol_user = make_user("alice"), make_user("carol")
    with trio.fail_after(120):
        async with open_js_client("alice") as alice, open_js_client("carol") as carol:
            await logged_in(alice, synapse, alice_user)
            await logged_in(carol, synapse, carol_user)
            room_id = await alice.create_room(encrypted=True, name="late")
            before = await alice.send_text(room_id, "before you")
            await alice.invite(room_id, carol_user.user_id)
            await carol.join(room_id)
            after = await alice.send_text(room_id, "after you")

            old = await carol.wait_for_message(room_id, sender=alice_user.user_id)
            assert old.event_id == before
            assert old.encrypted
            assert old.decryption_failure
            assert old.body != "before you"
            # A substring wait never matches an undecryptable message.
            new = await carol.wait_for_message(room_id, body_contains="you")
            assert (new.event_id, new.decryption_failure) == (after, False)


async def test_a_plain_room_stays_plain(synapse: SynapseServer, make_user: MakeUser) -> None:
    alice_user, bob_user = make_user("alice"), make_user("bob")
    with trio.fail_after(120):
        async with open_js_client("alice") as alice, open_js_client("bob") as bob:
            await logged_in(alice, synapse, alice_user)
            await logged_in(bob, synapse, bob_user)
            room_id = await alice.create_room(encrypted=False, name="plain")
            await alice.invite(room_id, bob_user.user_id)
            assert await bob.join(room_id) is None
            assert not await alice.room_encrypted(room_id)
            await alice.send_text(room_id, "in clear")
            got = await bob.wait_for_message(room_id, body_contains="in clear")
            assert not got.encrypted
            await bob.leave(room_id)

            await bob.stop()  # the process exits; later calls fail at once
            with pytest.raises(JsClientError, match="closed"):
                await bob.room_encrypted(room_id)


async def test_failures_come_back_fast_and_clear(
    synapse: SynapseServer, make_user: MakeUser
) -> None:
    alice_user = make_user("alice")
    with trio.fail_after(60):
        async with open_js_client("alice") as alice:
            # Before login: an error answer, not a hang.
            with pytest.raises(JsClientError, match="not_logged_in"):
                await alice.create_encrypted_dm("@nobody:localhost")
            with pytest.raises(JsClientError, match="unknown_command"):
                await alice.call("no_such_command", {})
            with pytest.raises(JsClientError, match="M_FORBIDDEN"):
                await alice.login(synapse.base_url, alice_user.user_id, "wrong password")

            await logged_in(alice, synapse, alice_user)
            room_id = await alice.create_room(encrypted=True)
            # A wait for something that never comes ends at its deadline, with a clear message.
            # (The driver's own answer: Python's fallback deadline would say "no answer".)
            with pytest.raises(JsClientTimeout, match="timed out waiting for a message"):
                await alice.wait_for_message(room_id, body_contains="never sent", timeout=1.0)
            with pytest.raises(JsClientError, match="bad_request"):
                await alice.send_text(room_id, "")
            with pytest.raises(JsClientTimeout, match="to be joined in this client"):
                await alice.send_text("!nosuchroom:localhost", "hello", timeout=1.0)

            # Requests run concurrently: a pending wait does not hold up other commands.
            async with trio.open_nursery() as nursery:

                async def wait_long() -> None:
                    await alice.wait_for_message(room_id, body_contains="nope", timeout=60.0)

                nursery.start_soon(wait_long)
                assert await alice.room_encrypted(room_id)
                nursery.cancel_scope.cancel()  # its late answer is dropped (nobody waits)
            assert await alice.room_encrypted(room_id)

            # A garbled line gets an uncorrelated error; the client keeps answering.
            assert alice._process.stdin is not None
            await alice._process.stdin.send_all(b"{not json\n" + json.dumps([1]).encode() + b"\n")
            assert await alice.room_encrypted(room_id)

            # The process dies: calls fail at once, with the reason.
            alice._process.kill()
            with pytest.raises(JsClientError, match="closed"):
                await alice.room_encrypted(room_id)
