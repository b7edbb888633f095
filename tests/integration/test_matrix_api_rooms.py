"""`MatrixClient` room endpoints against a real Synapse: create, membership, and their errors."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

import pytest

from matrix_api import Forbidden, MatrixError, NotFound, StateEventSpec
from matrix_api.models import RoomID
from matrix_api.testing.synapse import SynapseServer
from matrix_helpers import MakeUser, client_for, send_text

# Synapse 1.163 creates version 12 rooms: ids without a server part, ``!<hash>``.
UNKNOWN_ROOMS = [
    pytest.param(RoomID("!doesnotexist:localhost"), id="with-server"),
    pytest.param(RoomID("!" + "A" * 43), id="v12-style"),
]


async def test_create_room_applies_every_option(
    synapse: SynapseServer, make_user: MakeUser
) -> None:
    alice, bob = make_user("alice"), make_user("bob")

    async with client_for(synapse, alice) as client:
        room_id = await client.create_room(
            name="Options",
            topic="every createRoom option",
            preset="private_chat",
            invite=[bob.user_id],
            is_direct=True,
            initial_state=[
                StateEventSpec("m.room.guest_access", {"guest_access": "forbidden"}),
                StateEventSpec("org.example.marker", {"chat": 7}, state_key="chat-7"),
            ],
            power_level_content_override={"users": {bob.user_id: 50}, "state_default": 60},
        )

        name = await client.get_state_event(room_id, "m.room.name")
        topic = await client.get_state_event(room_id, "m.room.topic")
        join_rules = await client.get_state_event(room_id, "m.room.join_rules")
        guest_access = await client.get_state_event(room_id, "m.room.guest_access")
        marker = await client.get_state_event(room_id, "org.example.marker", "chat-7")
        power = await client.get_state_event(room_id, "m.room.power_levels")
        invite = await client.get_state_event(room_id, "m.room.member", bob.user_id)
        members = await client.joined_members(room_id)

    assert name == {"name": "Options"}
    assert topic["topic"] == "every createRoom option"
    assert join_rules == {"join_rule": "invite"}  # from the private_chat preset
    assert guest_access == {"guest_access": "forbidden"}
    assert marker == {"chat": 7}
    assert power["users"][bob.user_id] == 50
    assert power["state_default"] == 60
    assert invite["membership"] == "invite"
    assert invite["is_direct"] is True
    assert set(members) == {alice.user_id}  # bob is invited, not joined

    async with client_for(synapse, bob) as client:
        await client.join_room(room_id)
        # The override gave bob power 50, and state_default 60 is above it.
        with pytest.raises(Forbidden):
            await client.put_state_event(room_id, "m.room.topic", {"topic": "bob's"})
        assert await client.get_state_event(room_id, "m.room.topic") == topic


async def test_invite_join_leave_forget(synapse: SynapseServer, make_user: MakeUser) -> None:
    alice, bob = make_user("alice"), make_user("bob")

    async with client_for(synapse, alice) as a, client_for(synapse, bob) as b:
        room_id = await a.create_room(name="Membership")
        assert room_id in await a.joined_rooms()
        assert room_id not in await b.joined_rooms()

        await a.invite_user(room_id, bob.user_id, reason="come in")
        await a.invite_user(room_id, bob.user_id)  # Synapse accepts a repeated invite too
        invited = await b.sync(timeout_ms=0)
        assert invited.skipped == []  # v12 invite state (a full create event) decodes
        assert room_id in invited.rooms.invite
        invite_state = {e.type: e.content for e in invited.rooms.invite[room_id].invite_state}
        assert invite_state["m.room.name"] == {"name": "Membership"}
        assert room_id not in await b.joined_rooms()

        assert await b.join_room(room_id) == room_id
        assert room_id in await b.joined_rooms()
        members = await a.joined_members(room_id)
        assert set(members) == {alice.user_id, bob.user_id}
        assert members[bob.user_id] == bob.user_id.removeprefix("@").split(":")[0]
        # Joining again is harmless.
        assert await b.join_room(room_id) == room_id

        await send_text(b, room_id, "hello before leaving")
        await b.leave_room(room_id, reason="bye")
        # Synapse treats a repeat of the same leave as a no-op, so retrying a leave is safe;
        # a leave with other content (another reason) is a new event, refused: not in room.
        await b.leave_room(room_id, reason="bye")
        with pytest.raises(Forbidden):
            await b.leave_room(room_id)
        assert room_id not in await b.joined_rooms()
        assert set(await a.joined_members(room_id)) == {alice.user_id}
        assert (await a.get_state_event(room_id, "m.room.member", bob.user_id)) == {
            "membership": "leave",
            "reason": "bye",
        }

        # Before forgetting, a sync that asks for left rooms shows the leave.
        left = await b.sync(since=invited.next_batch, filter={"room": {"include_leave": True}})
        assert left.skipped == []
        assert room_id not in left.rooms.join
        leave_events = [
            e for e in left.rooms.leave[room_id].timeline.events if e.type == "m.room.member"
        ]
        assert leave_events[-1].state_key == bob.user_id
        assert leave_events[-1].content["membership"] == "leave"

        await b.forget_room(room_id)
        await b.forget_room(room_id)  # forgetting again is harmless
        # A forgotten room is gone from the user's view, even from a sync that asks for left rooms.
        after = await b.sync(timeout_ms=0, filter={"room": {"include_leave": True}})
        assert room_id not in after.rooms.join
        assert room_id not in after.rooms.leave
        with pytest.raises(Forbidden):
            await b.get_state(room_id)


async def test_forget_needs_the_room_left_first(
    synapse: SynapseServer, make_user: MakeUser
) -> None:
    alice = make_user("alice")

    async with client_for(synapse, alice) as client:
        room_id = await client.create_room()
        with pytest.raises(MatrixError) as caught:
            await client.forget_room(room_id)

    # Synapse answers 400 M_UNKNOWN, which has no class of its own.
    assert (caught.value.status, caught.value.code) == (400, "M_UNKNOWN")
    assert type(caught.value) is MatrixError


async def test_join_by_alias_with_via(synapse: SynapseServer, make_user: MakeUser) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    alias_name = f"alias-{uuid.uuid4().hex[:12]}"

    async with client_for(synapse, alice) as a, client_for(synapse, bob) as b:
        room_id = await a.create_room(
            name="Public", preset="public_chat", room_alias_name=alias_name
        )
        canonical = await a.get_state_event(room_id, "m.room.canonical_alias")
        alias = f"#{alias_name}:{synapse.server_name}"
        assert canonical["alias"] == alias

        joined = await b.join_room(alias, via=[synapse.server_name])
        assert joined == room_id
        assert room_id in await b.joined_rooms()
        assert set(await b.joined_members(room_id)) == {alice.user_id, bob.user_id}


async def test_non_member_cannot_read_a_room(synapse: SynapseServer, make_user: MakeUser) -> None:
    alice, eve = make_user("alice"), make_user("eve")

    async with client_for(synapse, alice) as a, client_for(synapse, eve) as e:
        room_id = await a.create_room(name="Private")
        event_id = await send_text(a, room_id, "secret")

        with pytest.raises(Forbidden) as state_error:
            await e.get_state(room_id)
        with pytest.raises(Forbidden):
            await e.get_state_event(room_id, "m.room.name")
        with pytest.raises(Forbidden):
            await e.joined_members(room_id)
        with pytest.raises(Forbidden):
            await e.messages(room_id, direction="b")
        with pytest.raises(Forbidden):
            await send_text(e, room_id, "let me in")
        with pytest.raises(Forbidden):
            await e.join_room(room_id)  # invite-only
        # Synapse does not say whether the event exists: 404, not 403.
        with pytest.raises(NotFound):
            await e.get_event(room_id, event_id)

    assert state_error.value.status == 403


@pytest.mark.parametrize("room_id", UNKNOWN_ROOMS)
async def test_unknown_room_errors(
    synapse: SynapseServer, make_user: MakeUser, room_id: RoomID
) -> None:
    alice = make_user("alice")

    async with client_for(synapse, alice) as client:
        # Reads and sends: Synapse does not tell an unknown room from one you are not in.
        requests: list[Callable[[], Awaitable[object]]] = [
            lambda: client.get_state(room_id),
            lambda: client.get_state_event(room_id, "m.room.name"),
            lambda: client.joined_members(room_id),
            lambda: client.messages(room_id, direction="b"),
            lambda: client.space_hierarchy(room_id),
            lambda: send_text(client, room_id, "anyone?"),
        ]
        for request in requests:
            with pytest.raises(Forbidden) as forbidden:
                await request()
            assert forbidden.value.status == 403

        # Membership changes: 404 with M_UNKNOWN (not M_NOT_FOUND, so no NotFound).
        with pytest.raises(MatrixError) as join_error:
            await client.join_room(room_id)
        with pytest.raises(MatrixError) as leave_error:
            await client.leave_room(room_id)

    for error in (join_error.value, leave_error.value):
        assert type(error) is MatrixError
        assert (error.status, error.code) == (404, "M_UNKNOWN")
