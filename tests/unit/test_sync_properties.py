"""Property: whatever a server puts inside a valid /sync envelope, decoding never crashes."""

from __future__ import annotations

import json
from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from matrix_api.models import RoomID, decode_sync
from matrix_mock import room_event

ROOM = RoomID("!room:example.org")
INVITED = RoomID("!inv:example.org")
SURVIVOR = room_event("$survivor")

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=15,
)


def field_or_junk(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return good | json_values


# Random JSON rarely looks like an event; these are events with some fields wrong or missing.
almost_events = st.fixed_dictionaries(
    {},
    optional={
        "type": field_or_junk(st.sampled_from(["m.room.message", "m.room.member", ""])),
        "event_id": field_or_junk(st.text(min_size=1, max_size=10).map(lambda s: "$" + s)),
        "sender": field_or_junk(st.just("@alice:example.org")),
        "origin_server_ts": field_or_junk(st.integers()),
        "content": field_or_junk(st.dictionaries(st.text(max_size=5), json_values, max_size=3)),
        "state_key": field_or_junk(st.text(max_size=5)),
        "unsigned": field_or_junk(st.dictionaries(st.text(max_size=5), json_values, max_size=3)),
    },
)
anything_in_an_event_list = st.lists(json_values | almost_events, max_size=8)
a_few_of_anything = st.lists(json_values | almost_events, max_size=3)


def encode(body: Any) -> bytes:
    return json.dumps(body).encode()


@settings(max_examples=200)
@given(anything_in_an_event_list)
def test_any_timeline_event_is_decoded_or_skipped_never_raised(raws: list[Any]) -> None:
    events = [*raws, SURVIVOR]
    body = {"next_batch": "s1", "rooms": {"join": {ROOM: {"timeline": {"events": events}}}}}

    sync = decode_sync(encode(body))

    decoded = sync.rooms.join[ROOM].timeline.events
    assert decoded[-1].event_id == "$survivor"
    skipped_at = [skipped.where for skipped in sync.skipped]
    assert len(decoded) + len(skipped_at) == len(events)
    assert all(where.startswith(f"rooms.join.{ROOM}.timeline[") for where in skipped_at)
    # Each skipped index names a distinct event of the input.
    indices = {int(where.rpartition("[")[2].rstrip("]")) for where in skipped_at}
    assert len(indices) == len(skipped_at)
    assert indices <= set(range(len(raws)))


@given(
    state=a_few_of_anything,
    account_data=a_few_of_anything,
    ephemeral=a_few_of_anything,
    invite_state=a_few_of_anything,
    to_device=a_few_of_anything,
    presence=a_few_of_anything,
)
def test_any_event_in_any_list_is_decoded_or_skipped(
    state: list[Any],
    account_data: list[Any],
    ephemeral: list[Any],
    invite_state: list[Any],
    to_device: list[Any],
    presence: list[Any],
) -> None:
    body = {
        "next_batch": "s1",
        "rooms": {
            "join": {
                ROOM: {
                    "state": {"events": state},
                    "account_data": {"events": account_data},
                    "ephemeral": {"events": ephemeral},
                }
            },
            "invite": {INVITED: {"invite_state": {"events": invite_state}}},
        },
        "to_device": {"events": to_device},
        "presence": {"events": presence},
    }

    sync = decode_sync(encode(body))

    room = sync.rooms.join[ROOM]
    kept = (
        len(room.state)
        + len(room.account_data)
        + len(room.ephemeral)
        + len(sync.rooms.invite[INVITED].invite_state)
        + len(sync.to_device)
        + len(sync.presence)
    )
    given_events = state + account_data + ephemeral + invite_state + to_device + presence
    assert kept + len(sync.skipped) == len(given_events)


@given(bad_room=json_values | st.dictionaries(st.sampled_from(["state", "timeline"]), json_values))
def test_any_room_is_decoded_or_skipped_and_the_others_survive(bad_room: Any) -> None:
    good_room = {"timeline": {"events": [SURVIVOR]}}
    body = {"next_batch": "s1", "rooms": {"join": {"!other:x": bad_room, ROOM: good_room}}}

    sync = decode_sync(encode(body))

    assert sync.rooms.join[ROOM].timeline.events[0].event_id == "$survivor"
    room_skipped = "rooms.join.!other:x" in {skipped.where for skipped in sync.skipped}
    assert room_skipped is ("!other:x" not in sync.rooms.join)


@given(envelope=json_values)
def test_a_sync_envelope_either_decodes_or_raises_decode_error(envelope: Any) -> None:
    try:
        sync = decode_sync(encode(envelope))
    except msgspec.DecodeError:
        return
    assert isinstance(sync.next_batch, str)
