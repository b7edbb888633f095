"""`MatrixClient` /sync, filters and /messages against a real Synapse."""

from __future__ import annotations

import trio

from matrix_api import MatrixClient
from matrix_api.models import RoomEvent, RoomID, SyncToken
from matrix_api.testing.synapse import SynapseServer
from matrix_helpers import MakeUser, bodies, client_for, send_text

LIMIT_5 = {"room": {"timeline": {"limit": 5}}}


async def test_initial_then_incremental_sync(synapse: SynapseServer, make_user: MakeUser) -> None:
    alice = make_user("alice")

    async with client_for(synapse, alice) as client:
        room_id = await client.create_room(name="Synced", topic="t")
        first = await send_text(client, room_id, "before the first sync")

        initial = await client.sync(full_state=True, timeout_ms=0)
        assert initial.skipped == []
        room = initial.rooms.join[room_id]
        # The room's state at the start of the timeline, plus the timeline, is its state now.
        state = {(e.type, e.state_key): e.content for e in [*room.state, *room.timeline.events]}
        assert state[("m.room.name", "")] == {"name": "Synced"}
        assert state[("m.room.member", alice.user_id)]["membership"] == "join"
        assert ("m.room.create", "") in state
        assert first in {event.event_id for event in room.timeline.events}

        second = await send_text(client, room_id, "after the first sync")
        incremental = await client.sync(since=initial.next_batch, timeout_ms=0)

    assert incremental.next_batch != initial.next_batch
    timeline = incremental.rooms.join[room_id].timeline
    assert [event.event_id for event in timeline.events] == [second]
    assert timeline.events[0].content["body"] == "after the first sync"
    assert timeline.limited is False
    assert incremental.rooms.join[room_id].state == []


async def test_long_poll_waits_for_its_timeout(synapse: SynapseServer, make_user: MakeUser) -> None:
    alice = make_user("alice")

    async with client_for(synapse, alice) as client:
        await client.create_room()
        since = (await client.sync(timeout_ms=0)).next_batch

        started = trio.current_time()
        quiet = await client.sync(since=since, timeout_ms=2000, set_presence="offline")
        two_seconds = trio.current_time() - started

        # Longer than httpx's default 5 s timeout: the client raises the read timeout.
        started = trio.current_time()
        longer = await client.sync(since=quiet.next_batch, timeout_ms=6000)
        six_seconds = trio.current_time() - started

    assert 1.9 <= two_seconds < 4.0
    assert quiet.rooms.join == {}
    assert 5.9 <= six_seconds < 9.0
    assert longer.rooms.join == {}


async def test_long_poll_returns_when_something_happens(
    synapse: SynapseServer, make_user: MakeUser
) -> None:
    alice, bob = make_user("alice"), make_user("bob")

    async with client_for(synapse, alice) as a, client_for(synapse, bob) as b:
        room_id = await a.create_room(invite=[bob.user_id])
        await b.join_room(room_id)
        since = (await a.sync(timeout_ms=0)).next_batch

        async def send_soon() -> None:
            await trio.sleep(0.5)
            await send_text(b, room_id, "wake up")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_soon)
            started = trio.current_time()
            woken = await a.sync(since=since, timeout_ms=20_000)
            elapsed = trio.current_time() - started

    assert 0.4 <= elapsed < 5.0
    assert bodies(woken.rooms.join[room_id].timeline.events) == ["wake up"]


async def test_inline_and_uploaded_filters_limit_the_timeline(
    synapse: SynapseServer, make_user: MakeUser
) -> None:
    alice = make_user("alice")

    async with client_for(synapse, alice) as client:
        room_id = await client.create_room()
        for index in range(8):
            await send_text(client, room_id, f"message {index}")

        inline = await client.sync(filter=LIMIT_5, timeout_ms=0)
        filter_id = await client.upload_filter(
            {"room": {"timeline": {"limit": 3, "types": ["m.room.message"]}}}
        )
        uploaded = await client.sync(filter=filter_id, timeout_ms=0)
        unfiltered = await client.sync(timeout_ms=0)

    inline_timeline = inline.rooms.join[room_id].timeline
    assert bodies(inline_timeline.events) == [f"message {i}" for i in range(3, 8)]
    assert len(inline_timeline.events) == 5
    assert inline_timeline.limited is True
    assert inline_timeline.prev_batch is not None

    uploaded_timeline = uploaded.rooms.join[room_id].timeline
    assert [event.type for event in uploaded_timeline.events] == ["m.room.message"] * 3
    assert bodies(uploaded_timeline.events) == ["message 5", "message 6", "message 7"]
    assert uploaded_timeline.limited is True

    # Synapse's default filter has a timeline limit of 10.
    assert len(unfiltered.rooms.join[room_id].timeline.events) == 10


async def page_back(
    client: MatrixClient, room_id: RoomID, prev_batch: SyncToken, until: SyncToken
) -> tuple[list[RoomEvent], int]:
    """Page back from ``prev_batch`` to ``until``; the events oldest first, and the page count."""
    newest_first: list[RoomEvent] = []
    pages = 0
    token: SyncToken | None = prev_batch
    while token is not None:
        page = await client.messages(
            room_id, direction="b", from_token=token, to_token=until, limit=7
        )
        pages += 1
        assert page.start == token
        assert page.skipped == []
        newest_first.extend(page.chunk)
        token = page.end
        assert pages < 20, "pagination does not end"
    return newest_first[::-1], pages


async def test_backfill_a_limited_timeline(synapse: SynapseServer, make_user: MakeUser) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    sent = [f"message {index:02}" for index in range(30)]

    async with client_for(synapse, alice) as a, client_for(synapse, bob) as b:
        room_id = await a.create_room(invite=[bob.user_id])
        await b.join_room(room_id)
        await send_text(a, room_id, "already seen")
        before = (await b.sync(timeout_ms=0)).next_batch

        event_ids = [await send_text(a, room_id, body) for body in sent]

        response = await b.sync(since=before, filter=LIMIT_5, timeout_ms=0)
        timeline = response.rooms.join[room_id].timeline
        assert timeline.limited is True
        assert timeline.prev_batch is not None
        assert bodies(timeline.events) == sent[-5:]

        missing, pages = await page_back(b, room_id, timeline.prev_batch, before)

    assert pages >= 4  # 25 events at 7 a page, then the empty last page
    combined = [*missing, *timeline.events]
    assert [event.event_id for event in combined] == event_ids
    assert bodies(combined) == sent
    assert len({event.event_id for event in combined}) == 30


async def test_messages_forward_from_a_back_page(
    synapse: SynapseServer, make_user: MakeUser
) -> None:
    alice = make_user("alice")

    async with client_for(synapse, alice) as client:
        room_id = await client.create_room()
        for index in range(4):
            await send_text(client, room_id, f"m{index}")

        back = await client.messages(room_id, direction="b", limit=2)
        assert bodies(back.chunk) == ["m3", "m2"]
        assert back.end is not None
        forward = await client.messages(
            room_id,
            direction="f",
            from_token=back.end,
            filter={"types": ["m.room.message"]},
        )

    assert bodies(forward.chunk) == ["m2", "m3"]


async def test_synapse_caches_identical_sync_requests(
    synapse: SynapseServer, make_user: MakeUser
) -> None:
    """Synapse answers a repeat of a /sync request (same parameters) from a 2-minute cache.

    Worth knowing for reconciliation: a second plain initial sync shortly after the first
    does not show what happened in between; change any parameter (``full_state``, the
    filter, the timeout) or sync incrementally to get a fresh answer.
    """
    alice = make_user("alice")

    async with client_for(synapse, alice) as client:
        first = await client.sync(timeout_ms=0)
        room_id = await client.create_room()
        repeated = await client.sync(timeout_ms=0)
        varied = await client.sync(timeout_ms=0, full_state=True)
        incremental = await client.sync(since=first.next_batch, timeout_ms=0)

    assert repeated.next_batch == first.next_batch
    assert room_id not in repeated.rooms.join
    assert room_id in varied.rooms.join
    assert room_id in incremental.rooms.join
