"""`MatrixClient` account data and profile against a real Synapse."""

from __future__ import annotations

import uuid

import pytest

from matrix_api import NotFound
from matrix_api.models import RoomID, SyncResponse
from matrix_api.testing.synapse import SynapseServer
from matrix_helpers import MakeUser, client_for, sync_until


async def test_global_account_data(synapse: SynapseServer, make_user: MakeUser) -> None:
    alice = make_user("alice")

    async with client_for(synapse, alice) as client:
        with pytest.raises(NotFound) as never_set:
            await client.get_account_data("org.example.never")

        await client.put_account_data("org.example.settings", {"backend": "echo", "n": 1})
        assert await client.get_account_data("org.example.settings") == {
            "backend": "echo",
            "n": 1,
        }
        # A PUT replaces the whole value.
        await client.put_account_data("org.example.settings", {"backend": "model"})
        assert await client.get_account_data("org.example.settings") == {"backend": "model"}

        initial = await client.sync(timeout_ms=0)

    assert (never_set.value.status, never_set.value.code) == (404, "M_NOT_FOUND")
    top_level = {event.type: event.content for event in initial.account_data}
    assert top_level["org.example.settings"] == {"backend": "model"}


async def test_room_account_data(synapse: SynapseServer, make_user: MakeUser) -> None:
    alice = make_user("alice")

    async with client_for(synapse, alice) as client:
        room_id = await client.create_room()
        other_room = await client.create_room()
        since = (await client.sync(timeout_ms=0)).next_batch

        with pytest.raises(NotFound):
            await client.get_room_account_data(room_id, "org.example.chat")
        await client.put_room_account_data(room_id, "org.example.chat", {"chat_id": 7})
        assert await client.get_room_account_data(room_id, "org.example.chat") == {"chat_id": 7}
        # Per room: the other room and the global namespace do not see it.
        with pytest.raises(NotFound):
            await client.get_room_account_data(other_room, "org.example.chat")
        with pytest.raises(NotFound):
            await client.get_account_data("org.example.chat")

        incremental = await client.sync(since=since, timeout_ms=0)
        # Not a second plain initial sync: Synapse would answer it from its 2-minute cache.
        initial = await client.sync(timeout_ms=0, full_state=True)

    for response in (incremental, initial):
        room = response.rooms.join[room_id]
        assert room.account_data_of("org.example.chat") == {"chat_id": 7}
        assert "org.example.chat" not in {event.type for event in response.account_data}
    assert initial.rooms.join[other_room].account_data_of("org.example.chat") is None


async def test_room_account_data_needs_no_membership(
    synapse: SynapseServer, make_user: MakeUser
) -> None:
    """Synapse stores room account data for any well-formed room id, member or not.

    For the bot: a room can be tagged before it is joined (while invited), but an
    incremental /sync only carries what changed since its token, so a tag set before the
    token is not re-sent when the join arrives (an initial sync or a GET has it).
    """
    alice, bob = make_user("alice"), make_user("bob")

    async with client_for(synapse, alice) as a, client_for(synapse, bob) as b:
        room_id = await a.create_room(name="Tagged early")
        unknown = RoomID(f"!{uuid.uuid4().hex}:{synapse.server_name}")

        # Not in the room at all, and a room that does not exist.
        await b.put_room_account_data(room_id, "org.example.tag", {"stage": "outsider"})
        assert await b.get_room_account_data(room_id, "org.example.tag") == {"stage": "outsider"}
        await b.put_room_account_data(unknown, "org.example.tag", {"stage": "nowhere"})
        assert await b.get_room_account_data(unknown, "org.example.tag") == {"stage": "nowhere"}

        # Invited.
        await a.invite_user(room_id, bob.user_id)
        first = await b.sync(timeout_ms=0)
        assert room_id in first.rooms.invite  # the invite section carries no account data
        assert unknown not in first.rooms.join
        before_tag = first.next_batch
        await b.put_room_account_data(room_id, "org.example.tag", {"stage": "invited"})
        assert await b.get_room_account_data(room_id, "org.example.tag") == {"stage": "invited"}
        invited = await b.sync(since=before_tag, timeout_ms=0)

        await b.join_room(room_id)
        # /sync delivers room account data changed since the token, for joined rooms only:
        # a sync from before the PUT brings it with the join; a sync from after it (taken
        # while invited) brings the join without it, although it was set before the join.
        # (timeout 1, not 0: Synapse would answer a repeat of the earlier request from its
        # 2-minute /sync response cache, keyed on the parameters.)
        from_before = await b.sync(since=before_tag, timeout_ms=1)
        from_after = await b.sync(since=invited.next_batch, timeout_ms=0)
        initial = await b.sync(timeout_ms=0, full_state=True)
        for with_tag in (from_before, initial):
            assert with_tag.rooms.join[room_id].account_data_of("org.example.tag") == {
                "stage": "invited"
            }
        assert room_id in from_after.rooms.join
        assert from_after.rooms.join[room_id].account_data_of("org.example.tag") is None

        # And after leaving, it can still be read and written.
        await b.leave_room(room_id)
        await b.put_room_account_data(room_id, "org.example.tag", {"stage": "left"})
        assert await b.get_room_account_data(room_id, "org.example.tag") == {"stage": "left"}

        # Another user's room account data is theirs alone.
        with pytest.raises(NotFound):
            await a.get_room_account_data(room_id, "org.example.tag")


def renamed(response: SyncResponse, room_id: RoomID, user_id: str) -> bool:
    """Whether this sync brings a member event of ``user_id`` with the new display name."""
    room = response.rooms.join.get(room_id)
    return room is not None and any(
        event.type == "m.room.member"
        and event.state_key == user_id
        and event.content.get("displayname") == "Alice ☃ Integration"
        for event in room.timeline.events
    )


async def test_displayname(synapse: SynapseServer, make_user: MakeUser) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    localpart = alice.user_id.removeprefix("@").split(":", 1)[0]

    async with client_for(synapse, alice) as a, client_for(synapse, bob) as b:
        # Synapse gives a new user their localpart as display name.
        assert await a.get_displayname(alice.user_id) == localpart

        room_id = await a.create_room(invite=[bob.user_id])
        await b.join_room(room_id)
        assert (await b.joined_members(room_id))[alice.user_id] == localpart
        since = (await b.sync(timeout_ms=0)).next_batch

        await a.set_displayname("Alice ☃ Integration")
        assert await a.get_displayname(alice.user_id) == "Alice ☃ Integration"
        assert await b.get_displayname(alice.user_id) == "Alice ☃ Integration"
        # The new name reaches the rooms alice is in (a new member event in each), but
        # Synapse sends those in the background after answering the PUT.
        await sync_until(b, since, lambda s: renamed(s, room_id, alice.user_id))
        assert (await b.joined_members(room_id))[alice.user_id] == "Alice ☃ Integration"
        member = await b.get_state_event(room_id, "m.room.member", alice.user_id)
        assert member["displayname"] == "Alice ☃ Integration"

        with pytest.raises(NotFound):
            await a.get_displayname(f"@nobody-{uuid.uuid4().hex}:{synapse.server_name}")
