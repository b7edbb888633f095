"""The fake homeserver's /relations and /event answer as Synapse 1.163 does: the same thread
as tests/integration/test_matrix_api_messaging.py::test_relations_of_a_thread, with the same
assertions, then what only the fake can script (hostile timelines, redactions, the bot's sends)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from fake_homeserver import ALICE, BOT, DEVICE, HOMESERVER, FakeHomeserver, text_event
from matrix_api import MatrixClient, MatrixError, NotFound, RetryPolicy
from matrix_api.models import EventID, RoomID

ROOM = RoomID("!threads:hs.test")
ROOT = EventID("$root")
REPLIES = [EventID(f"$reply{n}") for n in range(4)]
EDIT = EventID("$edit")


def in_thread(event_id: str, body: str, root: str = ROOT, sender: str = ALICE) -> dict[str, Any]:
    event = text_event(event_id, sender, body)
    event["content"]["m.relates_to"] = {
        "rel_type": "m.thread",
        "event_id": root,
        "is_falling_back": True,
        "m.in_reply_to": {"event_id": root},
    }
    return event


def edit_of(event_id: str, target: str, body: str, sender: str = ALICE) -> dict[str, Any]:
    event = text_event(event_id, sender, f"* {body}")
    event["content"]["m.new_content"] = {"msgtype": "m.text", "body": body}
    event["content"]["m.relates_to"] = {"rel_type": "m.replace", "event_id": target}
    return event


def ids(events: list[Any]) -> list[str]:
    return [event.event_id for event in events]


@pytest.fixture
async def client(hs: FakeHomeserver) -> AsyncIterator[MatrixClient]:
    hs.add_room(
        ROOM,
        timeline=[
            text_event(ROOT, ALICE, "root"),
            *(in_thread(reply, f"reply {n}") for n, reply in enumerate(REPLIES)),
            text_event("$main", ALICE, "main timeline, not in the thread"),
            edit_of(EDIT, REPLIES[1], "reply 1 edited"),
        ],
    )
    async with MatrixClient(
        HOMESERVER,
        access_token="t",
        user_id=BOT,
        device_id=DEVICE,
        transport=hs.transport(),
        retry_policy=RetryPolicy(max_attempts=1),
    ) as client:
        # Nothing here waits: /event and /relations answer at once (no `delays` set), over
        # a MockTransport, so a test cannot hang on them.
        yield client


async def test_a_thread_as_synapse_serves_it(client: MatrixClient) -> None:
    thread = await client.relations(ROOM, ROOT, "m.thread")
    assert ids(thread.chunk) == REPLIES[::-1]
    assert thread.next_batch is None
    assert thread.recursion_depth is None
    assert thread.chunk[2].content["body"] == "reply 1"
    assert thread.chunk[2].unsigned["m.relations"]["m.replace"]["event_id"] == EDIT

    first = await client.relations(ROOM, ROOT, "m.thread", limit=2)
    assert ids(first.chunk) == [REPLIES[3], REPLIES[2]]
    assert first.next_batch is not None
    second = await client.relations(ROOM, ROOT, "m.thread", limit=2, from_token=first.next_batch)
    assert ids(second.chunk) == [REPLIES[1], REPLIES[0]]
    assert second.prev_batch == first.next_batch
    assert second.next_batch is None

    forward = await client.relations(ROOM, ROOT, "m.thread", direction="f")
    assert ids(forward.chunk) == REPLIES

    filtered = await client.relations(ROOM, ROOT, "m.thread", recurse=True)
    assert ids(filtered.chunk) == REPLIES[::-1]
    assert filtered.recursion_depth is not None
    everything = await client.relations(ROOM, ROOT, recurse=True)
    assert ids(everything.chunk) == [EDIT, *REPLIES[::-1]]
    direct = await client.relations(ROOM, ROOT)
    assert ids(direct.chunk) == REPLIES[::-1]
    by_type = await client.relations(ROOM, REPLIES[1], "m.replace", "m.room.message")
    assert ids(by_type.chunk) == [EDIT]

    with pytest.raises(MatrixError) as unknown:
        await client.relations(ROOM, EventID("$not/a+real/event"), "m.thread")
    assert (unknown.value.status, unknown.value.code) == (404, "M_UNKNOWN")


async def test_the_default_page_is_five(hs: FakeHomeserver, client: MatrixClient) -> None:
    hs.queue_sync({ROOM: [in_thread(f"$more{n}", "more") for n in range(3)]})
    page = await client.relations(ROOM, ROOT, "m.thread")
    assert ids(page.chunk) == ["$more2", "$more1", "$more0", REPLIES[3], REPLIES[2]]
    rest = await client.relations(ROOM, ROOT, "m.thread", from_token=page.next_batch)
    assert (ids(rest.chunk), rest.next_batch) == ([REPLIES[1], REPLIES[0]], None)


async def test_get_event_serves_known_events_with_their_bundles(client: MatrixClient) -> None:
    root = await client.get_event(ROOM, ROOT)
    assert (root.event_id, root.room_id, root.content["body"]) == (ROOT, ROOM, "root")
    summary = root.unsigned["m.relations"]["m.thread"]
    assert (summary["count"], summary["latest_event"]["event_id"]) == (4, REPLIES[3])
    assert summary["current_user_participated"] is False
    edited = await client.get_event(ROOM, REPLIES[1])
    assert edited.unsigned["m.relations"]["m.replace"]["content"]["m.new_content"] == {
        "msgtype": "m.text",
        "body": "reply 1 edited",
    }
    with pytest.raises(NotFound):
        await client.get_event(ROOM, EventID("$unknown"))
    with pytest.raises(NotFound):
        await client.get_event(RoomID("!elsewhere:hs.test"), ROOT)


async def test_the_bots_sends_and_queued_events_are_the_rooms_events(
    hs: FakeHomeserver, client: MatrixClient
) -> None:
    answer = in_thread("unused", "the bot's answer")["content"]
    answer["m.relates_to"]["m.in_reply_to"] = {"event_id": REPLIES[3]}
    sent = await client.send_event(ROOM, "m.room.message", answer, "txn1")
    streamed = edit_of("unused", sent, "the bot's answer, streamed", sender=BOT)["content"]
    edit = await client.send_event(ROOM, "m.room.message", streamed, "txn2")
    hs.queue_sync({ROOM: [in_thread("$later", "a later question")]})

    thread = await client.relations(ROOM, ROOT, recurse=True)
    assert ids(thread.chunk)[:3] == ["$later", edit, sent]
    assert thread.chunk[1].sender == BOT
    bundled = thread.chunk[2].unsigned["m.relations"]["m.replace"]
    assert bundled["event_id"] == edit
    root = await client.get_event(ROOM, ROOT)
    assert root.unsigned["m.relations"]["m.thread"]["current_user_participated"] is True


async def test_a_redacted_event_relates_to_nothing(
    hs: FakeHomeserver, client: MatrixClient
) -> None:
    redaction = {
        "type": "m.room.redaction",
        "event_id": "$redaction",
        "sender": ALICE,
        "origin_server_ts": 1,
        "content": {"redacts": REPLIES[2]},
    }
    hs.queue_sync({ROOM: [redaction]})
    thread = await client.relations(ROOM, ROOT, "m.thread")
    assert ids(thread.chunk) == [REPLIES[3], REPLIES[1], REPLIES[0]]
    gone = await client.get_event(ROOM, REPLIES[2])
    assert gone.content == {}
    assert gone.is_redacted
    assert gone.unsigned["redacted_because"]["event_id"] == "$redaction"
    summary = (await client.get_event(ROOM, ROOT)).unsigned["m.relations"]["m.thread"]
    assert (summary["count"], summary["latest_event"]["event_id"]) == (3, REPLIES[3])


async def test_junk_in_the_timeline_is_no_relation(
    hs: FakeHomeserver, client: MatrixClient
) -> None:
    junk: list[Any] = [
        "not an event",
        {"event_id": "$no-content", "type": "m.room.message"},
        {**text_event("$content-list", ALICE, "x"), "content": []},
        {**in_thread("$id-number", "x"), "event_id": 7},
    ]
    bad_target = in_thread("$bad-target", "x")
    bad_target["content"]["m.relates_to"]["event_id"] = {"not": "an id"}
    cycle_a, cycle_b = edit_of("$cycle-a", "$cycle-b", "a"), edit_of("$cycle-b", "$cycle-a", "b")
    hs.queue_sync({ROOM: [*junk, bad_target, cycle_a, cycle_b]})

    thread = await client.relations(ROOM, ROOT, recurse=True)
    assert ids(thread.chunk) == [EDIT, *REPLIES[::-1]]
    looped = await client.relations(ROOM, EventID("$cycle-a"), recurse=True)
    assert ids(looped.chunk) == ["$cycle-b"]


@pytest.mark.parametrize(
    "query",
    [
        {"dir": "sideways"},
        {"limit": "-1"},
        {"limit": "many"},
        {"from": "s12"},
        {"recurse": "yes"},
    ],
)
async def test_bad_parameters_are_refused(hs: FakeHomeserver, query: dict[str, str]) -> None:
    hs.add_room(ROOM, timeline=[text_event(ROOT, ALICE, "root")])
    status, body = await hs._relations(ROOM, ROOT, ["m.thread"], query)
    assert (status, body["errcode"]) == (400, "M_INVALID_PARAM")


async def test_a_room_the_server_does_not_have_is_forbidden(client: MatrixClient) -> None:
    with pytest.raises(MatrixError) as refused:
        await client.relations(RoomID("!elsewhere:hs.test"), ROOT)
    assert (refused.value.status, refused.value.code) == (403, "M_FORBIDDEN")
