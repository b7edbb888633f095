"""The server-side key backup endpoints (matrix_api/endpoints/key_backup.py) against a
scripted server: what goes on the wire, what a retry repeats (creating a version:
never), and what a hostile answer turns into (a wrong-typed session is dropped and
recorded; a backup version without its required fields is a bad response)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio

from matrix_api import BadResponse, MatrixError, NetworkError, NotFound
from matrix_api.endpoints.key_backup import MEGOLM_BACKUP_V1, WrongRoomKeysVersion
from matrix_api.models import KeyBackupVersion, RoomID, RoomKeysUpdate
from matrix_mock import NO_RETRY, ScriptedServer, matrix_error, ok, raw

V3 = "/_matrix/client/v3"
ROOM = RoomID("!room:example.org")
OTHER = RoomID("!other:example.org")
AUTH_DATA: dict[str, Any] = {
    "public_key": "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo",
    "signatures": {"@bot:example.org": {"ed25519:BOTDEVICE": "c2lnbmVk"}},
}
SESSION: dict[str, Any] = {
    "first_message_index": 1,
    "forwarded_count": 0,
    "is_verified": True,
    "session_data": {"ephemeral": "ZXBo", "ciphertext": "Y2lwaGVy", "mac": "bWFj"},
}
VERSION_BODY: dict[str, Any] = {
    "algorithm": MEGOLM_BACKUP_V1,
    "auth_data": AUTH_DATA,
    "count": 42,
    "etag": "anopaquestring",
    "version": "7",
}


async def call(server: ScriptedServer, method: str, *args: Any, **kwargs: Any) -> Any:
    async with server.client(retry_policy=NO_RETRY) as client:
        with trio.fail_after(5):
            return await getattr(client, method)(*args, **kwargs)


# --- versions ----------------------------------------------------------------------------


async def test_create_sends_the_algorithm_and_auth_data_and_returns_the_version() -> None:
    server = ScriptedServer(ok({"version": "1"}))

    assert await call(server, "create_key_backup", AUTH_DATA) == "1"

    seen = server.only
    assert (seen.method, seen.raw_path) == ("POST", f"{V3}/room_keys/version")
    assert seen.json == {"algorithm": MEGOLM_BACKUP_V1, "auth_data": AUTH_DATA}


async def test_create_is_not_retried_after_a_lost_answer(autojump_clock: trio.abc.Clock) -> None:
    # A second POST would make a second version; the first one would be a stray.
    server = ScriptedServer(httpx.ReadError("reset"))
    async with server.client() as client:
        with pytest.raises(NetworkError):
            await client.create_key_backup(AUTH_DATA)
    assert len(server.seen) == 1


@pytest.mark.parametrize("body", [b"{}", b'{"version": 1}', b'{"version": null}', b"[]"])
async def test_create_with_an_unusable_answer_is_a_bad_response(body: bytes) -> None:
    with pytest.raises(BadResponse):
        await call(ScriptedServer(raw(200, body)), "create_key_backup", AUTH_DATA)


async def test_the_current_version_is_read_with_its_auth_data_raw() -> None:
    server = ScriptedServer(ok({**VERSION_BODY, "x.future": True}))

    backup = await call(server, "get_key_backup")

    assert (server.only.method, server.only.raw_path) == ("GET", f"{V3}/room_keys/version")
    assert backup == KeyBackupVersion("7", MEGOLM_BACKUP_V1, AUTH_DATA, 42, "anopaquestring")


async def test_a_named_version_is_read_from_its_own_path() -> None:
    server = ScriptedServer(ok(VERSION_BODY))
    await call(server, "get_key_backup", "7/../x")
    assert server.only.raw_path == f"{V3}/room_keys/version/7%2F..%2Fx"


async def test_no_backup_is_none() -> None:
    server = ScriptedServer(matrix_error(404, "M_NOT_FOUND", "No current backup version"))
    assert await call(server, "get_key_backup") is None


async def test_an_endpoint_the_server_lacks_is_not_mistaken_for_no_backup() -> None:
    server = ScriptedServer(matrix_error(404, "M_UNRECOGNIZED", "Unrecognized request"))
    with pytest.raises(MatrixError) as caught:
        await call(server, "get_key_backup")
    assert caught.value.code == "M_UNRECOGNIZED"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("version", 7),
        ("algorithm", None),
        ("auth_data", "public_key"),
        ("count", "42"),
        ("count", -1),
        ("count", True),
        ("count", 4.2),
        ("etag", None),
    ],
)
async def test_a_version_with_a_wrong_field_is_a_bad_response(field: str, value: Any) -> None:
    server = ScriptedServer(ok({**VERSION_BODY, field: value}))
    with pytest.raises(BadResponse):
        await call(server, "get_key_backup")


async def test_a_version_missing_a_field_is_a_bad_response() -> None:
    body = {k: v for k, v in VERSION_BODY.items() if k != "etag"}
    with pytest.raises(BadResponse):
        await call(ScriptedServer(ok(body)), "get_key_backup")


# --- keys --------------------------------------------------------------------------------


async def test_keys_go_up_per_room_and_session_with_the_version_in_the_query() -> None:
    server = ScriptedServer(ok({"etag": "e2", "count": 2}))

    update = await call(
        server, "put_room_keys", "7", {ROOM: {"s1": SESSION}, OTHER: {"s2": SESSION}}
    )

    seen = server.only
    assert (seen.method, seen.raw_path, seen.query) == (
        "PUT",
        f"{V3}/room_keys/keys",
        [("version", "7")],
    )
    assert seen.json == {
        "rooms": {ROOM: {"sessions": {"s1": SESSION}}, OTHER: {"sessions": {"s2": SESSION}}}
    }
    assert update == RoomKeysUpdate(etag="e2", count=2)


async def test_a_put_is_retried_after_a_lost_answer_with_the_same_body(
    autojump_clock: trio.abc.Clock,
) -> None:
    server = ScriptedServer(httpx.ReadError("reset"), ok({"etag": "e", "count": 1}))
    async with server.client() as client:
        await client.put_room_keys("7", {ROOM: {"s1": SESSION}})
    assert len(server.seen) == 2
    assert server.seen[0].request.content == server.seen[1].request.content


async def test_a_stale_version_says_which_is_current() -> None:
    server = ScriptedServer(
        matrix_error(403, "M_WRONG_ROOM_KEYS_VERSION", "Wrong backup version.", current_version="9")
    )
    with pytest.raises(WrongRoomKeysVersion) as caught:
        await call(server, "put_room_keys", "7", {ROOM: {"s1": SESSION}})
    assert caught.value.current_version == "9"


async def test_a_stale_version_without_a_readable_current_one_says_none() -> None:
    server = ScriptedServer(matrix_error(403, "M_WRONG_ROOM_KEYS_VERSION", current_version=9))
    with pytest.raises(WrongRoomKeysVersion) as caught:
        await call(server, "put_room_keys", "7", {ROOM: {"s1": SESSION}})
    assert caught.value.current_version is None


async def test_an_unknown_version_is_not_found() -> None:
    server = ScriptedServer(matrix_error(404, "M_NOT_FOUND", "Unknown backup version"))
    with pytest.raises(NotFound):
        await call(server, "get_room_keys", "7")


async def test_the_whole_backup_is_read_raw() -> None:
    body = {"rooms": {ROOM: {"sessions": {"s1": SESSION, "s2": {**SESSION, "x": [1]}}}}}
    server = ScriptedServer(ok(body))

    keys = await call(server, "get_room_keys", "7")

    assert (server.only.method, server.only.raw_path) == ("GET", f"{V3}/room_keys/keys")
    assert server.only.params == {"version": "7"}
    assert keys.rooms == {ROOM: {"s1": SESSION, "s2": {**SESSION, "x": [1]}}}
    assert keys.skipped == []


async def test_an_empty_backup_has_no_rooms() -> None:
    keys = await call(ScriptedServer(ok({"rooms": {}})), "get_room_keys", "7")
    assert (keys.rooms, keys.skipped) == ({}, [])


async def test_hostile_rooms_and_sessions_are_dropped_and_recorded() -> None:
    body = {
        "rooms": {
            ROOM: {"sessions": {"s1": SESSION, "s2": "junk", "s3": None}},
            OTHER: {"sessions": ["s1"]},
            "!nosessions:example.org": {},
            "!string:example.org": "x",
        }
    }

    keys = await call(ScriptedServer(ok(body)), "get_room_keys", "7")

    assert keys.rooms == {ROOM: {"s1": SESSION}}
    assert [s.where for s in keys.skipped] == [
        f"rooms.{ROOM}.sessions.s2",
        f"rooms.{ROOM}.sessions.s3",
        f"rooms.{OTHER}",
        "rooms.!nosessions:example.org",
        "rooms.!string:example.org",
    ]


async def test_one_session_nested_absurdly_deep_costs_only_its_deep_part() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    body = (
        b'{"rooms": {"!room:example.org": {"sessions": {"s1": {"first_message_index": 0},'
        b' "DEEP": {"session_data": ' + deep + b"}}}}}"
    )

    keys = await call(ScriptedServer(raw(200, body)), "get_room_keys", "7")

    assert keys.rooms[ROOM]["s1"] == {"first_message_index": 0}
    assert "DEEP" in keys.rooms[ROOM]
    assert len(keys.skipped) == 1


@pytest.mark.parametrize("body", [b"{}", b'{"rooms": []}', b'{"rooms": null}', b"<html>"])
async def test_keys_without_rooms_are_a_bad_response(body: bytes) -> None:
    with pytest.raises(BadResponse):
        await call(ScriptedServer(raw(200, body)), "get_room_keys", "7")
