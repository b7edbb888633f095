"""Decoding /sync and /messages: typed values, and one bad event never sinks the batch."""

from __future__ import annotations

import copy
import json
from typing import Any

import msgspec
import pytest

from matrix_api.errors import BadResponse
from matrix_api.models import (
    DeviceLists,
    Event,
    EventID,
    JoinedRoom,
    RoomEvent,
    RoomID,
    SkippedEvent,
    StrippedStateEvent,
    SyncResponse,
    SyncToken,
    ToDeviceEvent,
    UserID,
    decode_sync,
)
from matrix_api.models.responses import decode_messages
from matrix_mock import NO_RETRY, ScriptedServer, ok, raw, room_event

ROOM = RoomID("!chat:example.org")
INVITED = RoomID("!invite:example.org")
LEFT = RoomID("!left:example.org")
ALICE = UserID("@alice:example.org")
BOT = UserID("@bot:example.org")


def member(user: str, membership: str, event_id: str) -> dict[str, Any]:
    return room_event(
        event_id,
        type="m.room.member",
        sender=user,
        state_key=user,
        content={"membership": membership},
    )


# A /sync answer as the spec shows it, with the unknown fields servers add everywhere.
SYNC: dict[str, Any] = {
    "next_batch": "s72595_4483_1934",
    "org.example.top_level_extension": {"anything": [1, 2]},
    "account_data": {
        "events": [{"type": "m.direct", "content": {ALICE: [ROOM]}, "org.example.x": 1}]
    },
    "presence": {
        "events": [
            {
                "type": "m.presence",
                "sender": ALICE,
                "content": {"presence": "online", "last_active_ago": 2478593},
            }
        ]
    },
    "to_device": {
        "events": [
            {
                "type": "m.new_device",
                "sender": ALICE,
                "content": {"device_id": "XYZABCDE"},
                "unknown": True,
            }
        ]
    },
    "device_lists": {"changed": [ALICE], "left": []},
    "device_one_time_keys_count": {"signed_curve25519": 20},
    "rooms": {
        "join": {
            ROOM: {
                "summary": {"m.heroes": [ALICE], "m.joined_member_count": 2},
                "unread_notifications": {"highlight_count": 1, "notification_count": 5},
                "unread_thread_notifications": {},
                "org.example.room_extension": "x",
                "state": {
                    "events": [
                        room_event(
                            "$create",
                            type="m.room.create",
                            sender=BOT,
                            state_key="",
                            content={"room_version": "11", "creator": BOT},
                        ),
                        member(ALICE, "join", "$alice-join"),
                    ]
                },
                "timeline": {
                    "events": [
                        room_event(
                            "$msg1/with+slash",
                            content={"msgtype": "m.text", "body": "hello"},
                            unsigned={"age": 1234, "transaction_id": "t1"},
                            extra_field="ignored",
                        ),
                        room_event(
                            "$name",
                            type="m.room.name",
                            sender=BOT,
                            state_key="",
                            content={"name": "The chat"},
                        ),
                        room_event(
                            "$redacted",
                            content={},
                            unsigned={"redacted_because": {"type": "m.room.redaction"}},
                        ),
                    ],
                    "limited": True,
                    "prev_batch": "t34-23535_0_0",
                },
                "account_data": {
                    "events": [
                        {"type": "m.tag", "content": {"tags": {"u.work": {"order": 0.9}}}},
                        {"type": "org.example.chat", "content": {"chat_id": "c1"}},
                    ]
                },
                "ephemeral": {
                    "events": [
                        {"type": "m.typing", "content": {"user_ids": [ALICE]}},
                        {
                            "type": "m.receipt",
                            "content": {"$msg1/with+slash": {"m.read": {ALICE: {"ts": 1}}}},
                        },
                    ]
                },
            }
        },
        "invite": {
            INVITED: {
                "invite_state": {
                    "events": [
                        {
                            "type": "m.room.name",
                            "state_key": "",
                            "sender": ALICE,
                            "content": {"name": "Join us"},
                        },
                        {
                            "type": "m.room.member",
                            "state_key": BOT,
                            "sender": ALICE,
                            "content": {"membership": "invite"},
                        },
                    ]
                }
            }
        },
        "leave": {
            LEFT: {
                "state": {"events": []},
                "timeline": {
                    "events": [member(BOT, "leave", "$bot-leave")],
                    "limited": False,
                },
                "account_data": {"events": []},
            }
        },
    },
}


def encode(body: Any) -> bytes:
    return json.dumps(body).encode()


def sync_with_timeline(*events: Any) -> dict[str, Any]:
    return {"next_batch": "s1", "rooms": {"join": {ROOM: {"timeline": {"events": list(events)}}}}}


# --- a clean response ----------------------------------------------------------------------


def test_a_spec_shaped_sync_decodes_without_skipping_anything() -> None:
    sync = decode_sync(encode(SYNC))

    assert isinstance(sync, SyncResponse)
    assert sync.next_batch == "s72595_4483_1934"
    assert sync.skipped == []
    assert set(sync.rooms.join) == {ROOM}
    assert set(sync.rooms.invite) == {INVITED}
    assert set(sync.rooms.leave) == {LEFT}
    assert sync.rooms.knock == {}


def test_a_joined_room_has_its_state_timeline_and_gap() -> None:
    room = decode_sync(encode(SYNC)).rooms.join[ROOM]

    assert [event.event_id for event in room.state] == ["$create", "$alice-join"]
    assert all(event.is_state for event in room.state)
    timeline = room.timeline
    assert timeline.limited is True
    assert timeline.prev_batch == "t34-23535_0_0"
    first, name, redacted = timeline.events
    assert first == RoomEvent(
        type="m.room.message",
        event_id=EventID("$msg1/with+slash"),
        sender=ALICE,
        origin_server_ts=1_700_000_000_000,
        content={"msgtype": "m.text", "body": "hello"},
        unsigned={"age": 1234, "transaction_id": "t1"},
    )
    assert not first.is_state
    assert not first.is_redacted
    assert first.room_id is None
    assert (name.is_state, name.state_key, name.content) == (True, "", {"name": "The chat"})
    assert redacted.is_redacted


def test_a_joined_room_has_its_account_data_ephemeral_and_counts() -> None:
    room = decode_sync(encode(SYNC)).rooms.join[ROOM]

    assert [event.type for event in room.account_data] == ["m.tag", "org.example.chat"]
    assert room.ephemeral[0] == Event(type="m.typing", content={"user_ids": [ALICE]})
    assert room.ephemeral[1].type == "m.receipt"
    assert room.summary["m.joined_member_count"] == 2
    assert room.unread_notifications == {"highlight_count": 1, "notification_count": 5}


def test_invited_and_left_rooms_decode() -> None:
    sync = decode_sync(encode(SYNC))

    invite_state = sync.rooms.invite[INVITED].invite_state
    assert invite_state[0] == StrippedStateEvent(
        type="m.room.name", state_key="", sender=ALICE, content={"name": "Join us"}
    )
    assert invite_state[1].content == {"membership": "invite"}
    left = sync.rooms.leave[LEFT]
    assert left.timeline.limited is False
    assert left.timeline.prev_batch is None
    assert [(e.state_key, e.content) for e in left.timeline.events] == [
        (BOT, {"membership": "leave"})
    ]


def test_top_level_sections_decode() -> None:
    sync = decode_sync(encode(SYNC))

    assert sync.account_data == [Event(type="m.direct", content={ALICE: [ROOM]})]
    assert sync.presence[0].content["presence"] == "online"
    assert sync.to_device == [
        ToDeviceEvent(type="m.new_device", sender=ALICE, content={"device_id": "XYZABCDE"})
    ]
    assert sync.device_lists == DeviceLists(changed=[UserID(ALICE)], left=[])


def test_a_minimal_sync_has_empty_sections() -> None:
    sync = decode_sync(b'{"next_batch": "s1"}')

    assert sync.next_batch == "s1"
    assert (sync.rooms.join, sync.rooms.invite, sync.rooms.leave) == ({}, {}, {})
    assert (sync.account_data, sync.presence, sync.to_device, sync.skipped) == ([], [], [], [])


def test_a_knocked_room_decodes_its_knock_state() -> None:
    body = {
        "next_batch": "s1",
        "rooms": {
            "knock": {
                "!k:example.org": {
                    "knock_state": {
                        "events": [
                            {
                                "type": "m.room.member",
                                "state_key": BOT,
                                "sender": BOT,
                                "content": {"membership": "knock"},
                            }
                        ]
                    }
                }
            }
        },
    }
    knocked = decode_sync(encode(body)).rooms.knock[RoomID("!k:example.org")]
    assert knocked.invite_state[0].content == {"membership": "knock"}


async def test_client_sync_returns_the_decoded_response() -> None:
    server = ScriptedServer(ok(SYNC))
    async with server.client() as client:
        sync = await client.sync(since=SyncToken("s72595_4483_1933"), timeout_ms=30_000)

    assert sync == decode_sync(encode(SYNC))
    assert sync.rooms.join[ROOM].timeline.events[0].content["body"] == "hello"


# --- account data of a room -----------------------------------------------------------


def test_account_data_of_finds_a_delivered_type() -> None:
    room = decode_sync(encode(SYNC)).rooms.join[ROOM]
    assert room.account_data_of("org.example.chat") == {"chat_id": "c1"}
    assert room.account_data_of("m.fully_read") is None


def test_account_data_of_prefers_the_last_delivered() -> None:
    room = JoinedRoom(
        account_data=[
            Event(type="org.example.chat", content={"chat_id": "old"}),
            Event(type="m.tag", content={}),
            Event(type="org.example.chat", content={"chat_id": "new"}),
        ]
    )
    assert room.account_data_of("org.example.chat") == {"chat_id": "new"}


def test_account_data_of_an_empty_room_is_none() -> None:
    assert JoinedRoom().account_data_of("m.tag") is None


# --- bad events and rooms are skipped, not fatal --------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({k: v for k, v in room_event("$bad").items() if k != "event_id"}, id="no-id"),
        pytest.param(room_event("$bad", content="not an object"), id="content-string"),
        pytest.param(room_event("$bad", content=["a"]), id="content-list"),
        pytest.param(room_event("$bad", type=7), id="type-not-string"),
        pytest.param(room_event("$bad", ts="yesterday"), id="ts-not-int"),
        pytest.param(room_event("$bad", state_key=5), id="state-key-not-string"),
        pytest.param("just a string", id="string"),
        pytest.param(None, id="null"),
        pytest.param([room_event("$bad")], id="nested-list"),
    ],
)
def test_one_bad_timeline_event_is_skipped_and_the_others_survive(bad: Any) -> None:
    sync = decode_sync(encode(sync_with_timeline(room_event("$one"), bad, room_event("$three"))))

    events = sync.rooms.join[ROOM].timeline.events
    assert [event.event_id for event in events] == ["$one", "$three"]
    assert len(sync.skipped) == 1
    assert sync.skipped[0].where == f"rooms.join.{ROOM}.timeline[1]"
    assert sync.skipped[0].reason


def test_bad_events_everywhere_are_each_recorded_where_they_were() -> None:
    body = copy.deepcopy(SYNC)
    joined = body["rooms"]["join"][ROOM]
    joined["state"]["events"].insert(0, {"type": "m.room.create"})
    joined["account_data"]["events"].append({"type": "m.tag", "content": "x"})
    joined["ephemeral"]["events"].insert(1, {"content": {}})
    body["rooms"]["invite"][INVITED]["invite_state"]["events"].append({"type": "m.room.topic"})
    body["rooms"]["leave"][LEFT]["timeline"]["events"].insert(0, 42)
    body["account_data"]["events"].append({"type": None, "content": {}})
    body["presence"]["events"].insert(0, {"type": "m.presence", "content": 1})
    body["to_device"]["events"].append({"type": "m.x", "content": {}})  # no sender

    sync = decode_sync(encode(body))

    assert {skipped.where for skipped in sync.skipped} == {
        f"rooms.join.{ROOM}.state[0]",
        f"rooms.join.{ROOM}.account_data[2]",
        f"rooms.join.{ROOM}.ephemeral[1]",
        f"rooms.invite.{INVITED}.invite_state[2]",
        f"rooms.leave.{LEFT}.timeline[0]",
        "account_data[1]",
        "presence[0]",
        "to_device[1]",
    }
    # Everything that was good before is still there.
    clean = decode_sync(encode(SYNC))
    assert sync.rooms == clean.rooms
    assert (sync.account_data, sync.presence, sync.to_device) == (
        clean.account_data,
        clean.presence,
        clean.to_device,
    )


@pytest.mark.parametrize(
    ("bad_room", "where"),
    [
        pytest.param([], "", id="room-list"),
        pytest.param(None, "", id="room-null"),
    ],
)
def test_a_room_that_is_no_object_is_skipped_alone(bad_room: Any, where: str) -> None:
    body = copy.deepcopy(SYNC)
    body["rooms"]["join"]["!broken:example.org"] = bad_room

    sync = decode_sync(encode(body))

    assert set(sync.rooms.join) == {ROOM}
    assert sync.rooms.join[ROOM] == decode_sync(encode(SYNC)).rooms.join[ROOM]
    assert [skipped.where for skipped in sync.skipped] == ["rooms.join.!broken:example.org"]


@pytest.mark.parametrize(
    ("broken", "where"),
    [
        pytest.param({"timeline": "not an object"}, "timeline", id="timeline-string"),
        pytest.param({"timeline": {"events": "nope"}}, "timeline.events", id="events-string"),
        pytest.param({"limited": "yes"}, "timeline.limited", id="limited-string"),
        pytest.param({"prev_batch": 7}, "timeline.prev_batch", id="prev-batch-number"),
        pytest.param({"state": []}, "state", id="state-list"),
        pytest.param({"unread_notifications": []}, "unread_notifications", id="counts-list"),
        pytest.param({"summary": 5}, "summary", id="summary-number"),
        pytest.param({"ephemeral": {"events": {}}}, "ephemeral.events", id="ephemeral-object"),
    ],
)
def test_a_room_with_a_broken_part_keeps_the_rest(broken: dict[str, Any], where: str) -> None:
    body = copy.deepcopy(SYNC)
    room = body["rooms"]["join"][ROOM]
    if "limited" in broken or "prev_batch" in broken:
        room["timeline"].update(broken)
    else:
        room.update(broken)

    sync = decode_sync(encode(body))

    clean = decode_sync(encode(SYNC)).rooms.join[ROOM]
    assert sync.rooms.join[ROOM].timeline.events == (
        []
        if where.startswith("timeline") and "limited" not in where and "prev" not in where
        else clean.timeline.events
    )
    assert sync.rooms.join[ROOM].account_data == clean.account_data
    assert [s.where for s in sync.skipped] == [f"rooms.join.{ROOM}.{where}"]
    assert sync.skipped[0].room_id == ROOM


def test_a_bad_invited_room_keeps_its_id_and_records_the_unreadable_state() -> None:
    body = copy.deepcopy(SYNC)
    body["rooms"]["invite"]["!bad:example.org"] = {"invite_state": {"events": {}}}

    sync = decode_sync(encode(body))

    assert set(sync.rooms.invite) == {INVITED, "!bad:example.org"}
    assert sync.rooms.invite["!bad:example.org"].invite_state == []
    assert sync.skipped == [
        SkippedEvent(
            "rooms.invite.!bad:example.org.invite_state.events",
            sync.skipped[0].reason,
            room_id="!bad:example.org",
        )
    ]


# --- a broken envelope fails the whole response -----------------------------------------

BROKEN_ENVELOPES = [
    pytest.param(b'{"rooms": {}}', id="no-next-batch"),
    pytest.param(b'{"next_batch": 5}', id="next-batch-not-string"),
    pytest.param(b'{"next_batch": "s1", "rooms": {"join": {"!a": {"timel', id="truncated"),
    pytest.param(b"[]", id="list"),
    pytest.param(b"[" * 100_000, id="deep-list"),
]


@pytest.mark.parametrize(
    ("body", "where"),
    [
        pytest.param(b'{"next_batch": "s1", "rooms": []}', "rooms", id="rooms-list"),
        pytest.param(b'{"next_batch": "s1", "rooms": {"join": []}}', "rooms.join", id="join"),
        pytest.param(
            b'{"next_batch": "s1", "account_data": {"events": {}}}',
            "account_data.events",
            id="events-object",
        ),
        pytest.param(b'{"next_batch": "s1", "to_device": []}', "to_device", id="to-device"),
        pytest.param(b'{"next_batch": "s1", "device_lists": 3}', "device_lists", id="devices"),
    ],
)
def test_an_envelope_with_a_wrong_part_moves_on_without_it(body: bytes, where: str) -> None:
    sync = decode_sync(body)

    assert sync.next_batch == "s1"
    assert [s.where for s in sync.skipped] == [where]


def test_an_envelope_with_a_wrong_part_keeps_the_parts_that_read() -> None:
    body = copy.deepcopy(SYNC)
    body["presence"] = "junk"

    sync = decode_sync(encode(body))

    clean = decode_sync(encode(SYNC))
    assert sync.rooms == clean.rooms
    assert sync.account_data == clean.account_data
    assert [s.where for s in sync.skipped] == ["presence"]


@pytest.mark.parametrize("body", BROKEN_ENVELOPES)
def test_decode_sync_rejects_a_broken_envelope(body: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        decode_sync(body)


@pytest.mark.parametrize("body", BROKEN_ENVELOPES)
async def test_client_sync_raises_bad_response_for_a_broken_envelope(body: bytes) -> None:
    server = ScriptedServer(raw(200, body))
    async with server.client(retry_policy=NO_RETRY) as client:
        with pytest.raises(BadResponse) as caught:
            await client.sync()
    assert caught.value.status == 200


def nested_event(depth: int) -> bytes:
    content = b'{"x": ' + b"[" * depth + b"]" * depth + b"}"
    return (
        b'{"type": "m.room.message", "event_id": "$deep", "sender": "@a:b",'
        b' "origin_server_ts": 1, "content": ' + content + b"}"
    )


@pytest.mark.parametrize("depth", [100, 1_000, 100_000])
async def test_a_deeply_nested_event_is_skipped_alone(depth: int) -> None:
    body = b'{"next_batch": "s1", "rooms": {"join": {"!r:x": {"timeline": {"events": [%s, %s]}}}}}'
    ok = json.dumps(room_event("$ok")).encode()
    server = ScriptedServer(raw(200, body % (nested_event(depth), ok)))
    async with server.client(retry_policy=NO_RETRY) as client:
        sync = await client.sync()

    assert [event.event_id for event in sync.rooms.join["!r:x"].timeline.events] == ["$ok"]
    [skipped] = sync.skipped
    assert (skipped.event_id, skipped.sender, skipped.room_id) == ("$deep", "@a:b", "!r:x")
    assert "nested deeper than" in skipped.reason


# --- /messages ----------------------------------------------------------------------------


def test_messages_skip_bad_events_and_keep_the_rest() -> None:
    page = decode_messages(
        encode(
            {
                "start": "t1",
                "end": "t2",
                "chunk": [room_event("$a"), {"event_id": "$no-type"}, room_event("$c")],
                "state": [member(ALICE, "join", "$m"), {"type": "m.room.member"}],
            }
        )
    )

    assert [event.event_id for event in page.chunk] == ["$a", "$c"]
    assert [event.event_id for event in page.state] == ["$m"]
    assert [skipped.where for skipped in page.skipped] == ["chunk[1]", "state[1]"]
    assert (page.start, page.end) == ("t1", "t2")


def test_a_messages_page_without_end_is_the_last() -> None:
    page = decode_messages(encode({"start": "t1", "chunk": []}))
    assert page.end is None
    assert page.state == []
    assert page.skipped == []


def test_an_empty_messages_page_with_end_is_not_the_last() -> None:
    page = decode_messages(encode({"start": "t1", "chunk": [], "end": "t2"}))
    assert page.chunk == []
    assert page.end == "t2"


async def test_client_messages_returns_the_decoded_page() -> None:
    server = ScriptedServer(ok({"start": "t1", "end": "t0", "chunk": [room_event("$a"), 3]}))
    async with server.client() as client:
        page = await client.messages(ROOM, direction="b", from_token=SyncToken("t1"))
    assert [event.event_id for event in page.chunk] == ["$a"]
    assert page.skipped[0].where == "chunk[1]"
    assert page.end == "t0"


@pytest.mark.parametrize(
    "body",
    [b'{"chunk": []}', b'{"start": "t", "chunk": {}}', b'{"start": "t", "chunk": [], "end": 3}'],
)
def test_a_broken_messages_envelope_is_rejected(body: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        decode_messages(body)
