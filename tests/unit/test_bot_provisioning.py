"""bot.provisioning: a room made for a message is made once, whatever crashes between."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest

from bot.chats import CHAT_MARKER, Chat, now_ms
from bot.commands import CommandContext, run_command
from bot.commands.parser import ParsedCommand
from bot.config import Settings
from bot.encryption import offer_unencrypted_chat
from bot.provisioning import create_chat
from bot.store import NewInboxItem, Provisioned, Store
from matrix_api import MatrixClient, NetworkError
from matrix_api.models import EventID, RoomEvent, RoomID, SyncToken, UserID
from stub_client import STUB_SERVER, StubClient

BOT = f"@bot:{STUB_SERVER}"
ALICE = f"@alice:{STUB_SERVER}"
SPACE = RoomID(f"!space:{STUB_SERVER}")
COMMAND = EventID("$command")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(tmp_path / "bot.sqlite3", BOT)
    await opened.apply_spaces(put={ALICE: SPACE})  # the Space exists already
    yield opened
    await opened.aclose()


async def take_into_inbox(store: Store, event_id: EventID, room_id: str) -> None:
    event = RoomEvent(
        type="m.room.message",
        event_id=event_id,
        sender=UserID(ALICE),
        origin_server_ts=1,
        content={"msgtype": "m.text", "body": "!new Plans"},
        room_id=RoomID(room_id),
    )
    item = NewInboxItem(event_id, RoomID(room_id), "message", event)
    await store.commit_sync_batch(SyncToken("s1"), [item])


def client(stub: StubClient) -> MatrixClient:
    return cast("MatrixClient", stub)


def markers(stub: StubClient) -> list[tuple[RoomID, dict[str, object]]]:
    return [
        (args[0], args[2])
        for name, args in stub.calls
        if name == "put_room_account_data" and args[1] == CHAT_MARKER
    ]


async def test_a_rerun_after_a_crash_finishes_the_room_it_made(store: Store) -> None:
    await take_into_inbox(store, COMMAND, f"!here:{STUB_SERVER}")
    # The first run dies after createRoom, before the marker (a kill -9 there
    # looks the same to the store: nothing after the room was recorded).
    crashing = StubClient(
        fail_on="put_room_account_data", error=NetworkError("gone", maybe_processed=True)
    )
    with pytest.raises(NetworkError):
        await create_chat(client(crashing), store, ALICE, "Plans", STUB_SERVER, request=COMMAND)
    [(first_room, _)] = markers(crashing)

    rerun = StubClient()
    chat = await create_chat(client(rerun), store, ALICE, "Plans", STUB_SERVER, request=COMMAND)

    assert [name for name, _ in rerun.calls if name == "create_room"] == []
    assert chat.room_id == first_room
    [(room, content)] = markers(rerun)
    assert room == first_room
    assert content["chat_id"] == chat.chat_id
    assert store.chat_for_room(first_room) == chat


async def test_a_rerun_finishes_the_space_it_made_too(tmp_path: Path) -> None:
    fresh = await Store.open(tmp_path / "fresh.sqlite3", BOT)  # no Space yet
    try:
        await take_into_inbox(fresh, COMMAND, f"!here:{STUB_SERVER}")
        # Dies writing the Space's marker, the first account data write.
        crashing = StubClient(
            fail_on="put_room_account_data", error=NetworkError("gone", maybe_processed=True)
        )
        with pytest.raises(NetworkError):
            await create_chat(client(crashing), fresh, ALICE, "Plans", STUB_SERVER, request=COMMAND)
        assert [name for name, _ in crashing.calls].count("create_space") == 1

        rerun = StubClient()
        chat = await create_chat(client(rerun), fresh, ALICE, "Plans", STUB_SERVER, request=COMMAND)

        assert [name for name, _ in rerun.calls if name == "create_space"] == []
        assert [name for name, _ in crashing.calls].count("create_room") == 0
        assert [name for name, _ in rerun.calls].count("create_room") == 1
        assert chat.space_id == fresh.space_for(ALICE)
        assert chat.space_id is not None
        assert chat.space_id.startswith("!stub1:")  # the Space the first run made
    finally:
        await fresh.aclose()


async def test_each_message_gets_its_own_room(store: Store) -> None:
    second = EventID("$another-command")
    await take_into_inbox(store, COMMAND, f"!here:{STUB_SERVER}")
    await take_into_inbox(store, second, f"!here:{STUB_SERVER}")
    stub = StubClient()

    one = await create_chat(client(stub), store, ALICE, "One", STUB_SERVER, request=COMMAND)
    two = await create_chat(client(stub), store, ALICE, "Two", STUB_SERVER, request=second)

    assert one.room_id != two.room_id
    assert len([name for name, _ in stub.calls if name == "create_room"]) == 2
    # New rooms have no history: their first messages will not read the room for it.
    assert await store.conversation(one.chat_id) == []
    assert await store.conversation(two.chat_id) == []


async def test_the_record_goes_with_the_finished_item(store: Store) -> None:
    await take_into_inbox(store, COMMAND, f"!here:{STUB_SERVER}")
    [item] = await store.pending()
    await create_chat(client(StubClient()), store, ALICE, "Plans", STUB_SERVER, request=COMMAND)
    assert (await store.provisioned(COMMAND)).room is not None

    await store.finish(item, "replied")

    assert await store.provisioned(COMMAND) == Provisioned()


async def test_the_encrypted_way_out_is_made_once_across_a_crash(store: Store) -> None:
    encrypted = Chat("c_enc", RoomID(f"!encrypted:{STUB_SERVER}"), ALICE, "Secret", 0)
    await store.apply_chats(put=[encrypted])
    await take_into_inbox(store, COMMAND, encrypted.room_id)
    # Dies writing the successor into the encrypted room's marker, after the way
    # out was made and marked (the second account data write).
    crashing = StubClient()
    original = crashing.put_room_account_data
    writes = 0

    async def second_write_fails(room_id: RoomID, event_type: str, content: object) -> None:
        nonlocal writes
        writes += 1
        if writes == 2:
            raise NetworkError("gone", maybe_processed=True)
        await original(room_id, event_type, content)

    crashing.put_room_account_data = second_write_fails  # type: ignore[method-assign]
    first = await offer_unencrypted_chat(
        client(crashing), store, encrypted.room_id, ALICE, STUB_SERVER, request=COMMAND
    )
    assert "matrix.to" not in first.body  # the notice without a link: it failed

    rerun = StubClient()
    second = await offer_unencrypted_chat(
        client(rerun), store, encrypted.room_id, ALICE, STUB_SERVER, request=COMMAND
    )

    [(way_out, _)] = markers(crashing)
    assert [name for name, _ in rerun.calls if name == "create_room"] == []
    assert way_out in second.body
    successor = store.chat_for_room(encrypted.room_id)
    assert successor is not None
    assert successor.successor == store.chat_for_room(way_out).chat_id  # type: ignore[union-attr]


@pytest.mark.parametrize("server_clock", [1_000_000, None])
async def test_a_new_chat_is_created_at_the_servers_time(
    store: Store, server_clock: int | None
) -> None:
    # Its messages' timestamps are the server's: a clock here running ahead must not
    # make them look older than the chat. A server that tells no time: ours.
    stub = StubClient(server_clock_ms=server_clock)
    before = now_ms()
    chat = await create_chat(client(stub), store, ALICE, "Plans", STUB_SERVER)
    if server_clock is None:
        assert before <= chat.created_ts <= now_ms()
    else:
        assert chat.created_ts == server_clock
    [(_, content)] = markers(stub)
    assert content["created_ts"] == chat.created_ts


async def test_new_names_the_space_invite_only_when_it_made_the_space(store: Store) -> None:
    carol = f"@carol:{STUB_SERVER}"  # no Space yet (the store fixture gives Alice one)
    assert store.space_for(carol) is None
    here = Chat("c_here", RoomID(f"!here:{STUB_SERVER}"), carol, "Here", 1_000)
    await store.apply_chats(put=[here])
    stub = StubClient()
    ctx = CommandContext(
        client=client(stub),
        store=store,
        settings=Settings(homeserver=f"https://{STUB_SERVER}", user_id=BOT, access_token="t"),
        backend_name="echo",
        room_id=here.room_id,
        sender=carol,
        chat=here,
    )

    first = await run_command(ctx, ParsedCommand("new", "One"))
    second = await run_command(ctx, ParsedCommand("new", "Two"))

    space_id = store.space_for(carol)
    assert space_id is not None
    assert "Space" in first.body
    assert f"matrix.to/#/{space_id}" in first.body
    assert "Space" not in second.body
