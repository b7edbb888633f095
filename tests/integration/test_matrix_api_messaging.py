"""`MatrixClient` messaging against a real Synapse: send, get, redact, typing, receipts."""

from __future__ import annotations

from typing import Any

import pytest

from matrix_api import MatrixClient, MatrixError, NotFound, new_txn_id
from matrix_api.models import EventID, RoomID, SyncResponse
from matrix_api.testing.synapse import SynapseServer
from matrix_helpers import (
    MakeUser,
    bodies,
    client_for,
    ephemeral,
    send_text,
    sync_until,
    text,
)


async def test_send_is_idempotent_per_transaction_id(
    synapse: SynapseServer, make_user: MakeUser
) -> None:
    alice = make_user("alice")
    txn_id = new_txn_id()

    async with client_for(synapse, alice) as client:
        room_id = await client.create_room()
        first = await client.send_event(room_id, "m.room.message", text("only once"), txn_id)
        # A retried send: same transaction id, so the server answers with the first event.
        retried = await client.send_event(room_id, "m.room.message", text("only once"), txn_id)
        other = await client.send_event(room_id, "m.room.message", text("second"), new_txn_id())

        event = await client.get_event(room_id, first)
        page = await client.messages(room_id, direction="b", limit=20)

    assert retried == first
    assert other != first
    assert (event.event_id, event.type, event.sender) == (first, "m.room.message", alice.user_id)
    assert event.content == text("only once")
    assert event.origin_server_ts > 0
    assert not event.is_state
    assert not event.is_redacted
    assert bodies(page.chunk) == ["second", "only once"]


async def test_transaction_ids_are_per_device(synapse: SynapseServer, make_user: MakeUser) -> None:
    alice = make_user("alice")
    txn_id = new_txn_id()

    async with client_for(synapse, alice) as client:
        room_id = await client.create_room()
        first = await client.send_event(room_id, "m.room.message", text("device one"), txn_id)

        login = await client.login_password(alice.user_id, alice.password)  # a new device
        assert login.device_id != alice.device_id
        second = await client.send_event(room_id, "m.room.message", text("device two"), txn_id)

    assert second != first


async def test_redact_and_get_redacted_event(synapse: SynapseServer, make_user: MakeUser) -> None:
    alice = make_user("alice")

    async with client_for(synapse, alice) as client:
        room_id = await client.create_room()
        event_id = await send_text(client, room_id, "regrettable")
        txn_id = new_txn_id()
        redaction = await client.redact(room_id, event_id, txn_id, reason="oops")
        # The redaction is a send like any other: its transaction id de-duplicates it.
        assert await client.redact(room_id, event_id, txn_id, reason="oops") == redaction

        redacted = await client.get_event(room_id, event_id)
        redaction_event = await client.get_event(room_id, redaction)

    assert redacted.event_id == event_id
    assert redacted.content == {}
    assert redacted.is_redacted
    assert redacted.unsigned["redacted_because"]["event_id"] == redaction
    assert redaction_event.type == "m.room.redaction"
    assert redaction_event.content["redacts"] == event_id
    assert redaction_event.content["reason"] == "oops"


async def send_until_event_id_has(
    client: MatrixClient, room_id: RoomID, character: str, attempts: int = 40
) -> EventID:
    """Send messages until the server hands out an event id containing ``character``.

    A v3 event id has 43 base64 characters, so each send has about a 50 % chance.
    """
    for index in range(attempts):
        event_id = await send_text(client, room_id, f"probe {index}")
        if character in event_id:
            return event_id
    pytest.fail(f"no event id with {character!r} in {attempts} sends")


def typing_in(response: SyncResponse, room_id: RoomID) -> list[str] | None:
    """Who is typing in the room, per the last ``m.typing`` of this response (None: none)."""
    typing = ephemeral(response, room_id, "m.typing")
    return typing[-1]["user_ids"] if typing else None


def receipts_in(
    response: SyncResponse, room_id: RoomID, event_id: EventID, receipt_type: str
) -> dict[str, Any]:
    """``{user_id: {"ts": ...}}`` of the receipts of one type on one event in this response."""
    found: dict[str, Any] = {}
    for content in ephemeral(response, room_id, "m.receipt"):
        found.update(content.get(event_id, {}).get(receipt_type, {}))
    return found


async def test_event_ids_with_slash_and_plus(synapse: SynapseServer, make_user: MakeUser) -> None:
    # Room version 3 event ids are standard base64 ("+" and "/"); from version 4 on they are
    # URL-safe, so only a v3 room gives the path encoding a real "/" to carry.
    alice, bob = make_user("alice"), make_user("bob")

    async with client_for(synapse, alice) as a, client_for(synapse, bob) as b:
        room_id = await a.create_room(room_version="3", invite=[bob.user_id])
        await b.join_room(room_id)
        bob_since = (await b.sync(timeout_ms=0)).next_batch

        slashed = await send_until_event_id_has(b, room_id, "/")
        assert "/" in slashed

        fetched = await a.get_event(room_id, slashed)
        assert fetched.event_id == slashed

        await a.send_receipt(room_id, slashed)
        await sync_until(
            b, bob_since, lambda s: alice.user_id in receipts_in(s, room_id, slashed, "m.read")
        )

        redaction = await b.redact(room_id, slashed, new_txn_id())
        assert (await a.get_event(room_id, slashed)).is_redacted
        assert (await a.get_event(room_id, redaction)).content["redacts"] == slashed

        plussed = await send_until_event_id_has(b, room_id, "+")
        assert (await a.get_event(room_id, plussed)).event_id == plussed

        # A transaction id derived from such an event id (a reply keyed on what it answers)
        # is a path segment too, and still de-duplicates.
        txn_id = f"reply-to-{plussed}-{slashed}"
        reply = await a.send_event(room_id, "m.room.message", text("reply"), txn_id)
        assert await a.send_event(room_id, "m.room.message", text("reply"), txn_id) == reply


async def test_fabricated_event_id_with_slash_gives_a_matrix_error(
    synapse: SynapseServer, make_user: MakeUser
) -> None:
    alice = make_user("alice")
    fabricated = EventID("$not/a+real/event")

    async with client_for(synapse, alice) as client:
        room_id = await client.create_room()
        # Routed to the event endpoint (not a routing 404 with an HTML or unrecognised body).
        with pytest.raises(NotFound) as caught:
            await client.get_event(room_id, fabricated)
        # Synapse 1.163 answers 200 to a receipt and to a redaction of an event it has never
        # seen; the redaction's event id is made up and never becomes an event of the room.
        await client.send_receipt(room_id, fabricated)
        redaction = await client.redact(room_id, fabricated, new_txn_id())
        assert redaction.startswith("$")
        with pytest.raises(NotFound):
            await client.get_event(room_id, redaction)
        page = await client.messages(room_id, direction="b", limit=50)
        assert redaction not in {event.event_id for event in page.chunk}

    assert isinstance(caught.value, MatrixError)
    assert (caught.value.status, caught.value.code) == (404, "M_NOT_FOUND")


async def test_typing_and_read_receipts_reach_the_other_user(
    synapse: SynapseServer, make_user: MakeUser
) -> None:
    alice, bob = make_user("alice"), make_user("bob")

    async with client_for(synapse, alice) as a, client_for(synapse, bob) as b:
        room_id = await a.create_room(invite=[bob.user_id])
        await b.join_room(room_id)
        first = await send_text(a, room_id, "did you read this?")
        second = await send_text(a, room_id, "and this?")
        since = (await a.sync(timeout_ms=0)).next_batch
        bob_since = (await b.sync(timeout_ms=0)).next_batch

        await b.set_typing(room_id, True, timeout_ms=20_000)
        _, since = await sync_until(a, since, lambda s: typing_in(s, room_id) == [bob.user_id])
        await b.set_typing(room_id, False)
        _, since = await sync_until(a, since, lambda s: typing_in(s, room_id) == [])

        await b.send_receipt(room_id, first, "m.read")
        response, since = await sync_until(
            a, since, lambda s: bob.user_id in receipts_in(s, room_id, first, "m.read")
        )
        assert receipts_in(response, room_id, first, "m.read")[bob.user_id]["ts"] > 0

        # A private receipt reaches only its sender; sending it twice is harmless.
        await b.send_receipt(room_id, second, "m.read.private")
        await b.send_receipt(room_id, second, "m.read.private")
        await sync_until(
            b,
            bob_since,
            lambda s: bob.user_id in receipts_in(s, room_id, second, "m.read.private"),
        )
        # Bob then reads in public: alice sees that, and never the private one.
        await b.send_receipt(room_id, second, "m.read")
        response, since = await sync_until(
            a, since, lambda s: bob.user_id in receipts_in(s, room_id, second, "m.read")
        )
        assert receipts_in(response, room_id, second, "m.read.private") == {}

        # A threaded receipt ("main" is the room's main timeline) carries its thread id.
        third = await send_text(a, room_id, "in the main thread")
        await b.send_receipt(room_id, third, thread_id="main")
        response, _ = await sync_until(
            a, since, lambda s: bob.user_id in receipts_in(s, room_id, third, "m.read")
        )
        assert receipts_in(response, room_id, third, "m.read")[bob.user_id]["thread_id"] == "main"


def in_thread(body: str, root: EventID) -> dict[str, Any]:
    """A thread reply's content, with the reply fallback the spec describes."""
    return {
        **text(body),
        "m.relates_to": {
            "rel_type": "m.thread",
            "event_id": root,
            "is_falling_back": True,
            "m.in_reply_to": {"event_id": root},
        },
    }


async def test_relations_of_a_thread(synapse: SynapseServer, make_user: MakeUser) -> None:
    alice = make_user("alice")

    async with client_for(synapse, alice) as client:
        room_id = await client.create_room()
        root = await send_text(client, room_id, "root")
        replies = [
            await client.send_event(
                room_id, "m.room.message", in_thread(f"reply {n}", root), new_txn_id()
            )
            for n in range(4)
        ]
        await send_text(client, room_id, "main timeline, not in the thread")
        edit_content = {
            **text("* reply 1 edited"),
            "m.new_content": text("reply 1 edited"),
            "m.relates_to": {"rel_type": "m.replace", "event_id": replies[1]},
        }
        edit = await client.send_event(room_id, "m.room.message", edit_content, new_txn_id())

        thread = await client.relations(room_id, root, "m.thread")
        assert [event.event_id for event in thread.chunk] == replies[::-1]  # newest first
        assert thread.next_batch is None
        assert thread.recursion_depth is None  # only when asked to recurse
        # The server shows the replacement's content as the event's, the original's
        # stays in the event; the edit is bundled in unsigned.
        assert thread.chunk[2].content["body"] == "reply 1"
        relations = thread.chunk[2].unsigned["m.relations"]
        assert relations["m.replace"]["event_id"] == edit

        # Pages of two: the second starts at the first's next_batch and ends the thread.
        first = await client.relations(room_id, root, "m.thread", limit=2)
        assert [event.event_id for event in first.chunk] == [replies[3], replies[2]]
        assert first.next_batch is not None
        second = await client.relations(
            room_id, root, "m.thread", limit=2, from_token=first.next_batch
        )
        assert [event.event_id for event in second.chunk] == [replies[1], replies[0]]
        assert second.prev_batch == first.next_batch
        assert second.next_batch is None  # Synapse knows the last page (the spec allows
        # an empty one after it: callers page until next_batch is None)

        # Oldest first on request.
        forward = await client.relations(room_id, root, "m.thread", direction="f")
        assert [event.event_id for event in forward.chunk] == replies

        # recurse=true follows the edit of a reply, but a rel_type filter applies to
        # every event found (Synapse 1.163): with m.thread the edit stays out ...
        filtered = await client.relations(room_id, root, "m.thread", recurse=True)
        assert [event.event_id for event in filtered.chunk] == replies[::-1]
        assert filtered.recursion_depth is not None
        # ... and without rel_type the thread's replies and the edit come together.
        everything = await client.relations(room_id, root, recurse=True)
        assert [event.event_id for event in everything.chunk] == [edit, *replies[::-1]]
        # Not recursing, the edit relates to a reply, not to the root.
        direct = await client.relations(room_id, root)
        assert [event.event_id for event in direct.chunk] == replies[::-1]
        by_type = await client.relations(room_id, replies[1], "m.replace", "m.room.message")
        assert [event.event_id for event in by_type.chunk] == [edit]

        with pytest.raises(MatrixError) as unknown:
            await client.relations(room_id, EventID("$not/a+real/event"), "m.thread")

        # The edit is bundled whole; the root carries the thread's summary.
        assert relations["m.replace"]["content"]["m.new_content"] == text("reply 1 edited")
        summary = (await client.get_event(room_id, root)).unsigned["m.relations"]["m.thread"]
        assert (summary["count"], summary["latest_event"]["event_id"]) == (4, replies[3])
        assert summary["current_user_participated"] is True

        # A redacted reply relates to nothing any more; a page is 5 events unless asked.
        await client.redact(room_id, replies[2], new_txn_id())
        more = [
            await client.send_event(
                room_id, "m.room.message", in_thread(f"reply {n}", root), new_txn_id()
            )
            for n in range(4, 7)
        ]
        expected = [*more[::-1], replies[3], replies[1], replies[0]]
        page = await client.relations(room_id, root, "m.thread")
        assert [event.event_id for event in page.chunk] == expected[:5]
        assert page.next_batch is not None
        rest = await client.relations(room_id, root, "m.thread", from_token=page.next_batch)
        assert [event.event_id for event in rest.chunk] == expected[5:]
        assert rest.next_batch is None
        summary = (await client.get_event(room_id, root)).unsigned["m.relations"]["m.thread"]
        assert (summary["count"], summary["latest_event"]["event_id"]) == (6, more[-1])

    # The spec says M_NOT_FOUND; Synapse 1.163 says M_UNKNOWN ("Unknown parent event."),
    # and tests/ordering/fake_homeserver.py answers the same: callers test the status.
    assert (unknown.value.status, unknown.value.code) == (404, "M_UNKNOWN")
