"""`MatrixClient` Spaces against a real Synapse: a Space, child rooms and the hierarchy."""

from __future__ import annotations

from matrix_api.testing.synapse import SynapseServer
from matrix_helpers import MakeUser, client_for


async def test_space_with_linked_child_rooms(synapse: SynapseServer, make_user: MakeUser) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    via = [synapse.server_name]

    async with client_for(synapse, alice) as client:
        space_id = await client.create_space(
            name="Alice's chats",
            topic="one room per chat",
            invite=[bob.user_id],
            power_level_content_override={"events_default": 100},
        )
        create = await client.get_state_event(space_id, "m.room.create")
        assert create["type"] == "m.space"
        power = await client.get_state_event(space_id, "m.room.power_levels")
        assert power["events_default"] == 100
        invite = await client.get_state_event(space_id, "m.room.member", bob.user_id)
        assert invite["membership"] == "invite"

        children = {}
        for name in ("Chat one", "Chat two"):
            room_id = await client.create_room(name=name, topic=f"{name} topic")
            await client.put_state_event(space_id, "m.space.child", {"via": via}, room_id)
            await client.put_state_event(
                room_id, "m.space.parent", {"via": via, "canonical": True}, space_id
            )
            children[room_id] = name

        parent = await client.get_state_event(room_id, "m.space.parent", space_id)
        assert parent == {"via": via, "canonical": True}

        hierarchy = await client.space_hierarchy(space_id)
        limited = await client.space_hierarchy(space_id, max_depth=0)
        paged = await client.space_hierarchy(space_id, limit=1)

    rooms = {room.room_id: room for room in hierarchy.rooms}
    assert hierarchy.rooms[0].room_id == space_id  # the Space itself comes first
    assert set(rooms) == {space_id, *children}
    assert hierarchy.next_batch is None

    space = rooms[space_id]
    assert (space.name, space.topic, space.room_type) == (
        "Alice's chats",
        "one room per chat",
        "m.space",
    )
    assert space.num_joined_members == 1
    child_state = {event.state_key: event for event in space.children_state}
    assert set(child_state) == set(children)
    for room_id, event in child_state.items():
        assert (event.type, event.sender, event.content) == (
            "m.space.child",
            alice.user_id,
            {"via": via},
        )
        child = rooms[room_id]
        assert (child.name, child.topic, child.room_type) == (
            children[room_id],
            f"{children[room_id]} topic",
            None,
        )
        assert child.join_rule == "invite"
        assert child.num_joined_members == 1

    # max_depth=0 is the Space alone; limit=1 pages.
    assert [room.room_id for room in limited.rooms] == [space_id]
    assert [room.room_id for room in paged.rooms] == [space_id]
    assert paged.next_batch is not None


async def test_hierarchy_pages_with_from_token(synapse: SynapseServer, make_user: MakeUser) -> None:
    alice = make_user("alice")
    via = [synapse.server_name]

    async with client_for(synapse, alice) as client:
        space_id = await client.create_space(name="Paged")
        expected = {space_id}
        for index in range(3):
            room_id = await client.create_room(name=f"child {index}")
            await client.put_state_event(space_id, "m.space.child", {"via": via}, room_id)
            expected.add(room_id)

        seen = []
        page = await client.space_hierarchy(space_id, limit=2)
        seen.extend(room.room_id for room in page.rooms)
        while page.next_batch is not None:
            page = await client.space_hierarchy(space_id, limit=2, from_token=page.next_batch)
            seen.extend(room.room_id for room in page.rooms)

    assert len(seen) == len(set(seen))
    assert set(seen) == expected


async def test_hierarchy_suggested_only(synapse: SynapseServer, make_user: MakeUser) -> None:
    alice = make_user("alice")
    via = [synapse.server_name]

    async with client_for(synapse, alice) as client:
        space_id = await client.create_space(name="Suggestions")
        suggested = await client.create_room(name="suggested")
        plain = await client.create_room(name="plain")
        await client.put_state_event(
            space_id, "m.space.child", {"via": via, "suggested": True}, suggested
        )
        await client.put_state_event(space_id, "m.space.child", {"via": via}, plain)

        everything = await client.space_hierarchy(space_id)
        only_suggested = await client.space_hierarchy(space_id, suggested_only=True)

    assert {room.room_id for room in everything.rooms} == {space_id, suggested, plain}
    assert [room.room_id for room in only_suggested.rooms] == [space_id, suggested]
