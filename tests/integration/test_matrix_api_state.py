"""`MatrixClient` room state against a real Synapse: awkward types and state keys."""

from __future__ import annotations

import pytest

from matrix_api import Forbidden, NotFound
from matrix_api.testing.synapse import SynapseServer
from matrix_helpers import MakeUser, client_for

# Every path segment here needs percent-encoding: "/", " ", "#", "?", "%" and non-ASCII.
UNICODE_TYPE = "org.exämple.ünï/cødé ☃"
UNICODE_KEY = "ключ/☃ #?&=%2F"


async def test_state_events_round_trip(synapse: SynapseServer, make_user: MakeUser) -> None:
    alice, bob = make_user("alice"), make_user("bob")

    async with client_for(synapse, alice) as client:
        room_id = await client.create_room(name="State")
        empty_key = await client.put_state_event(room_id, "org.example.settings", {"mode": "a"})
        # A state key that is a user id belongs to that user: even the creator may not set
        # someone else's (Synapse: 403 "You are not allowed to set others state").
        user_key = await client.put_state_event(
            room_id, "org.example.per_user", {"seen": True}, alice.user_id
        )
        with pytest.raises(Forbidden):
            await client.put_state_event(
                room_id, "org.example.per_user", {"seen": True}, bob.user_id
            )
        unicode = await client.put_state_event(
            room_id, UNICODE_TYPE, {"text": "snow ☃"}, UNICODE_KEY
        )

        assert await client.get_state_event(room_id, "org.example.settings") == {"mode": "a"}
        assert await client.get_state_event(room_id, "org.example.settings", "") == {"mode": "a"}
        assert await client.get_state_event(room_id, "org.example.per_user", alice.user_id) == {
            "seen": True
        }
        assert await client.get_state_event(room_id, UNICODE_TYPE, UNICODE_KEY) == {
            "text": "snow ☃"
        }

        # Replacing a state event: the new content wins, the event id changes.
        replaced = await client.put_state_event(room_id, "org.example.settings", {"mode": "b"})
        assert replaced != empty_key
        assert await client.get_state_event(room_id, "org.example.settings") == {"mode": "b"}

        state = await client.get_state(room_id)

    by_key = {(event.type, event.state_key): event for event in state}
    assert by_key[("org.example.settings", "")].event_id == replaced
    assert by_key[("org.example.settings", "")].content == {"mode": "b"}
    assert by_key[("org.example.per_user", alice.user_id)].event_id == user_key
    assert by_key[(UNICODE_TYPE, UNICODE_KEY)].event_id == unicode
    assert by_key[(UNICODE_TYPE, UNICODE_KEY)].content == {"text": "snow ☃"}
    assert by_key[("m.room.create", "")].sender == alice.user_id
    assert by_key[("m.room.name", "")].content == {"name": "State"}
    assert all(event.is_state and event.sender for event in state)


async def test_missing_state_is_not_found(synapse: SynapseServer, make_user: MakeUser) -> None:
    alice = make_user("alice")

    async with client_for(synapse, alice) as client:
        room_id = await client.create_room()
        await client.put_state_event(room_id, "org.example.keyed", {"x": 1}, "present")
        with pytest.raises(NotFound) as no_type:
            await client.get_state_event(room_id, "org.example.never")
        with pytest.raises(NotFound):
            await client.get_state_event(room_id, "org.example.keyed", "absent")
        with pytest.raises(NotFound):
            await client.get_state_event(room_id, "org.example.keyed")  # empty key

    assert (no_type.value.status, no_type.value.code) == (404, "M_NOT_FOUND")


@pytest.mark.parametrize("key", [".", "..", "../..", "%2E"])
async def test_dot_segments_stay_in_their_segment(
    synapse: SynapseServer, make_user: MakeUser, key: str
) -> None:
    # Left bare, "." and ".." would be removed by URL normalisation on the way.
    alice = make_user("alice")

    async with client_for(synapse, alice) as client:
        room_id = await client.create_room()
        await client.put_state_event(room_id, "org.example.dots", {"key": key}, key)
        await client.put_state_event(room_id, "org.example.dots", {"key": "empty"})
        assert await client.get_state_event(room_id, "org.example.dots", key) == {"key": key}
        await client.put_room_account_data(room_id, key, {"key": key})
        assert await client.get_room_account_data(room_id, key) == {"key": key}
        state = await client.get_state(room_id)

    dots = {e.state_key: e.content for e in state if e.type == "org.example.dots"}
    assert dots == {key: {"key": key}, "": {"key": "empty"}}
