"""bot.e2ee.crypto: the device identity in the store, and the rule that nothing is sent
before the state it depends on is written (a failed write loses nothing)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, cast

import pytest
import trio

from bot.e2ee.crypto import BotCrypto, DeviceConflict
from bot.store import Store, StoreUnavailable
from matrix_api import MatrixClient
from matrix_api.models import KeysQueryResponse, RoomID, UserID, decode_sync
from matrix_crypto.errors import CryptoError

BOT = "@bot:example.org"
DEVICE = "BOTDEVICE"
KEY = bytes(range(32))


class _Server:
    """The keys endpoints, as far as the bot's identity needs them."""

    def __init__(self) -> None:
        self.user_id = BOT
        self.device_keys: dict[str, Any] = {}
        self.one_time_keys: dict[str, Any] = {}
        self.uploads: list[dict[str, Any]] = []
        self.clock_ms: int | None = 1_800_000_000_000

    def server_time_ms(self) -> int | None:
        return self.clock_ms

    async def query_keys(self, users: Mapping[str, Any], **_: Any) -> KeysQueryResponse:
        devices = {DEVICE: self.device_keys} if self.device_keys else {}
        return KeysQueryResponse(device_keys={UserID(BOT): devices})

    async def upload_keys(self, **parts: Any) -> dict[str, int]:
        self.uploads.append(parts)
        if parts.get("device_keys") is not None:
            self.device_keys = parts["device_keys"]
        self.one_time_keys.update(parts.get("one_time_keys") or {})
        return {"signed_curve25519": len(self.one_time_keys)}


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(tmp_path / "bot.sqlite3", BOT)
    yield opened
    await opened.aclose()


async def _open(server: _Server, store: Store, key: bytes = KEY) -> BotCrypto:
    return await BotCrypto.open(
        cast("MatrixClient", server), store, device_id=DEVICE, pickle_key=key
    )


async def test_a_new_device_is_stored_before_its_keys_go_up_and_restored_after(
    store: Store, tmp_path: Path
) -> None:
    server = _Server()
    crypto = await _open(server, store)
    assert await store.crypto_rows()  # the identity, before anything was uploaded
    assert server.uploads == []

    await crypto.send_outgoing()
    [upload] = server.uploads
    assert upload["device_keys"]["device_id"] == DEVICE
    assert upload["one_time_keys"]

    # When the keys went up is kept (a second of slack for the server clock's estimate).
    assert crypto.published_ms == 1_800_000_001_000
    server.clock_ms = 1_900_000_000_000
    again = await _open(server, store)
    assert again.machine.ed25519 == crypto.machine.ed25519
    assert again.published_ms == 1_800_000_001_000
    await again.send_outgoing()
    assert len(server.uploads) == 1  # never a second upload for the same device


async def test_a_device_the_server_has_keys_for_but_the_store_does_not_is_a_conflict(
    store: Store,
) -> None:
    server = _Server()
    server.device_keys = {"device_id": DEVICE, "keys": {}}
    with pytest.raises(DeviceConflict, match=DEVICE):
        await _open(server, store)
    assert server.uploads == []


async def test_a_wrong_pickle_key_is_refused_not_replaced(store: Store) -> None:
    server = _Server()
    await (await _open(server, store)).send_outgoing()

    with pytest.raises(CryptoError):
        await _open(server, store, key=b"x" * 32)
    assert len(server.uploads) == 1


async def test_rows_a_failed_write_did_not_store_go_with_the_next_write(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = _Server()
    crypto = await _open(server, store)
    real = Store.apply_crypto

    async def unavailable(self: Store, rows: Any) -> None:
        raise StoreUnavailable("disk full")

    monkeypatch.setattr(Store, "apply_crypto", unavailable)
    with pytest.raises(StoreUnavailable):
        await crypto.send_outgoing()
    # Nothing left the bot whose state was not stored.
    assert server.uploads == []

    monkeypatch.setattr(Store, "apply_crypto", real)
    await crypto.send_outgoing()
    [upload] = server.uploads
    restored = await _open(server, store)
    # The one-time keys that went up are the stored ones: marked published after a
    # restart, so a restored machine uploads nothing again.
    await restored.send_outgoing()
    assert len(server.uploads) == 1
    assert upload["one_time_keys"]


async def test_members_read_while_a_membership_changed_are_not_kept(store: Store) -> None:
    # A member list fetched while a sync batch said the room's members changed may be
    # stale already: used for that send, then read again for the next.
    server = _MembersServer()
    crypto = await _open(server, store)
    await crypto.send_outgoing()
    await store.set_room_encryption({ROOM: '{"algorithm":"m.megolm.v1.aes-sha2"}'})

    async def first_send() -> None:
        await crypto.encrypt(ROOM, "m.room.message", {"msgtype": "m.text", "body": "one"})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first_send)
        await server.members_asked.wait()
        member_event = {
            "type": "m.room.member",
            "event_id": "$join",
            "sender": "@carol:example.org",
            "state_key": "@carol:example.org",
            "origin_server_ts": 1,
            "content": {"membership": "join"},
        }
        batch = decode_sync(
            json.dumps(
                {
                    "next_batch": "s2",
                    "rooms": {"join": {ROOM: {"timeline": {"events": [member_event]}}}},
                }
            ).encode()
        )
        crypto.batch_committed(crypto.take_sync(batch))
        server.release_members.set()
    assert server.members_reads == 1

    await crypto.encrypt(ROOM, "m.room.message", {"msgtype": "m.text", "body": "two"})
    assert server.members_reads == 2  # not the list read before the change
    await crypto.encrypt(ROOM, "m.room.message", {"msgtype": "m.text", "body": "three"})
    assert server.members_reads == 2  # now kept


ROOM = RoomID("!room:example.org")


class _MembersServer(_Server):
    def __init__(self) -> None:
        super().__init__()
        self.members_reads = 0
        self.members_asked = trio.Event()
        self.release_members = trio.Event()

    async def current_members(self, room_id: RoomID) -> dict[UserID, str]:
        self.members_reads += 1
        self.members_asked.set()
        await self.release_members.wait()
        return {UserID(BOT): "join"}

    async def get_state_event(self, room_id: RoomID, event_type: str) -> dict[str, Any]:
        return {"history_visibility": "shared"}
