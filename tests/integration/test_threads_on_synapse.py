"""Threads through the whole bot against a real Synapse (issue 23).

The person is matrix-js-sdk (tests/e2ee_client/driver.mjs, js_client.py), a client nobody
here wrote, with its thread support on as Element runs it: the SDK itself writes the
thread relation of what the person sends in a thread. The model backend talks to the fake
OpenAI server of tests/backends, which records every context it receives: each thread is
its own conversation, starting with its root as the room shows it, and the main timeline
is another one that leaves every thread out. The bot's answers are read as the js client
sees them: ``m.relates_to`` of each (the thread relation with the reply fallback in a
thread, a rich reply in the main timeline).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx
import trio

from js_client import JsClient, open_js_client
from matrix_api.testing.synapse import RegisteredUser, SynapseServer
from matrix_helpers import MakeUser

TIMEOUT = 60.0
"""Seconds any one wait of these tests may take (a loaded machine is slow, never this slow)."""


async def logged_in(client: JsClient, synapse: SynapseServer, user: RegisteredUser) -> None:
    await client.login(synapse.base_url, user.user_id, user.password, thread_support=True)


async def thread_on_server(
    synapse: SynapseServer, user: RegisteredUser, room_id: str, root: str
) -> list[dict[str, Any]]:
    """The thread as Synapse serves it (``/relations/{root}/m.thread``), oldest first:
    read with plain HTTP, not with the bot's own client."""
    path = (
        f"/_matrix/client/v1/rooms/{quote(room_id, safe='')}/relations/"
        f"{quote(root, safe='')}/m.thread"
    )
    async with httpx.AsyncClient(timeout=30) as http:
        answer = await http.get(
            f"{synapse.base_url}{path}",
            params={"dir": "f", "limit": "50"},
            headers={"Authorization": f"Bearer {user.access_token}"},
        )
    answer.raise_for_status()
    chunk: list[dict[str, Any]] = answer.json()["chunk"]
    return chunk


async def test_the_js_client_writes_and_reads_threads(
    synapse: SynapseServer, make_user: MakeUser
) -> None:
    # The harness the bot's test stands on: what the SDK sends in a thread, and what a
    # listing shows of each message's relations.
    alice_user, bob_user = make_user("alice"), make_user("bob")
    with trio.fail_after(120):
        async with open_js_client("alice") as alice, open_js_client("bob") as bob:
            await logged_in(alice, synapse, alice_user)
            await logged_in(bob, synapse, bob_user)
            room_id = await alice.create_room(encrypted=False, invite=[bob_user.user_id])
            await bob.join(room_id)
            root = await alice.send_text(room_id, "root")
            await bob.wait_for_message(room_id, body_contains="root", timeout=TIMEOUT)
            first = await bob.send_text(room_id, "first in thread", thread_id=root)
            seen = await alice.wait_for_message(room_id, body_contains="first", timeout=TIMEOUT)
            assert seen.event_id == first
            # No reply fallback: the SDK adds one only for a thread it has a model of.
            assert seen.wire_relates_to == {
                "rel_type": "m.thread",
                "event_id": root,
                "is_falling_back": True,
            }
            assert seen.relates_to == seen.wire_relates_to
            assert seen.thread_root_id == root
            # The SDK's reply fallback is the thread's latest message once it knows it.
            second = await alice.send_text(room_id, "second in thread", thread_id=root)
            got = await bob.wait_for_message(room_id, in_reply_to=first, timeout=TIMEOUT)
            assert got.event_id == second
            assert got.wire_relates_to is not None
            assert got.wire_relates_to["rel_type"] == "m.thread"
            assert got.wire_relates_to["event_id"] == root
            main = await bob.send_text(room_id, "main again")
            await alice.wait_for_message(room_id, body_contains="main again", timeout=TIMEOUT)

            listing = {m.event_id: m for m in await alice.messages(room_id)}
            assert [listing[e].body for e in (root, first, second, main)] == [
                "root",
                "first in thread",
                "second in thread",
                "main again",
            ]
            assert [listing[e].thread_root_id for e in (root, first, second, main)] == [
                root,  # the SDK counts a root as in its own thread
                root,
                root,
                None,
            ]
            assert listing[main].wire_relates_to is None
            on_server = await thread_on_server(synapse, alice_user, room_id, root)
            assert [e["event_id"] for e in on_server] == [first, second]
