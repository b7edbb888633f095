"""What goes on the wire: paths, query parameters, bodies and the bearer token."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import httpx
import pytest

from matrix_api import MatrixAPIError, MatrixClient, StateEventSpec
from matrix_api.models import EventID, FilterID, RoomID, SyncToken
from matrix_mock import BOT, TOKEN, ScriptedServer, ok, room_event

V1 = "/_matrix/client/v1"
V3 = "/_matrix/client/v3"
ROOM = RoomID("!room:example.org")
ROOM_PATH = f"{V3}/rooms/%21room%3Aexample.org"
BOT_PATH = f"{V3}/user/%40bot%3Aexample.org"
EVENT_ID = EventID(
    "$abc/def+g"
)  # room version 3+ event ids are unpadded base64: '/' and '+' happen
EVENT_SEGMENT = "%24abc%2Fdef%2Bg"

Call = Callable[[MatrixClient], Awaitable[object]]


async def one_request(call: Call, answer: httpx.Response, **client_options: Any) -> httpx.Request:
    server = ScriptedServer(answer)
    async with server.client(**client_options) as client:
        await call(client)
    return server.only.request


def raw_path(request: httpx.Request) -> str:
    return request.url.raw_path.decode("ascii").partition("?")[0]


# --- identifiers in paths ----------------------------------------------------------------


async def test_an_event_id_with_slash_and_plus_is_one_segment() -> None:
    request = await one_request(lambda c: c.get_event(ROOM, EVENT_ID), ok(room_event(EVENT_ID)))
    assert raw_path(request) == f"{ROOM_PATH}/event/{EVENT_SEGMENT}"


async def test_a_room_id_is_percent_encoded() -> None:
    request = await one_request(lambda c: c.get_state(ROOM), ok([]))
    assert raw_path(request) == f"{ROOM_PATH}/state"
    assert "%21room%3Aexample.org" in raw_path(request)


async def test_a_state_key_starting_with_at_is_encoded() -> None:
    request = await one_request(
        lambda c: c.get_state_event(ROOM, "m.room.member", "@alice:example.org"),
        ok({"membership": "join"}),
    )
    assert raw_path(request) == f"{ROOM_PATH}/state/m.room.member/%40alice%3Aexample.org"


async def test_an_empty_state_key_leaves_a_trailing_slash() -> None:
    request = await one_request(
        lambda c: c.get_state_event(ROOM, "m.room.member"), ok({"membership": "join"})
    )
    assert raw_path(request).endswith("/state/m.room.member/")


async def test_put_state_with_an_empty_state_key_leaves_a_trailing_slash() -> None:
    request = await one_request(
        lambda c: c.put_state_event(ROOM, "m.room.name", {"name": "Chat"}), ok({"event_id": "$s"})
    )
    assert (request.method, raw_path(request)) == ("PUT", f"{ROOM_PATH}/state/m.room.name/")
    assert json.loads(request.content) == {"name": "Chat"}


async def test_unicode_event_types_and_state_keys_are_utf8_percent_encoded() -> None:
    request = await one_request(
        lambda c: c.get_state_event(ROOM, "org.example.чат", "ключ 1"), ok({})
    )
    assert raw_path(request) == (
        f"{ROOM_PATH}/state/org.example.%D1%87%D0%B0%D1%82/%D0%BA%D0%BB%D1%8E%D1%87%201"
    )


async def test_join_by_alias_encodes_the_hash() -> None:
    request = await one_request(lambda c: c.join_room("#chat:example.org"), ok({"room_id": ROOM}))
    assert (request.method, raw_path(request)) == ("POST", f"{V3}/join/%23chat%3Aexample.org")
    assert request.url.query == b""


async def test_join_via_servers_repeats_via_and_server_name() -> None:
    request = await one_request(
        lambda c: c.join_room("#chat:example.org", via=["a.org", "b.org"]), ok({"room_id": ROOM})
    )
    assert request.url.params.get_list("via") == ["a.org", "b.org"]
    assert request.url.params.get_list("server_name") == ["a.org", "b.org"]


async def test_user_ids_in_paths_are_encoded() -> None:
    request = await one_request(lambda c: c.get_account_data("m.direct"), ok({}))
    assert raw_path(request) == f"{BOT_PATH}/account_data/m.direct"

    request = await one_request(
        lambda c: c.get_displayname("@alice:example.org"), ok({"displayname": "Alice"})
    )
    assert raw_path(request) == f"{V3}/profile/%40alice%3Aexample.org/displayname"


DOT_SEGMENTS = [
    pytest.param(
        lambda c: c.get_state_event(ROOM, "m.room.name", ".."),
        f"{ROOM_PATH}/state/m.room.name/",
        "..",
        id="state-key-dotdot",
    ),
    pytest.param(
        lambda c: c.get_state_event(ROOM, "m.room.name", "."),
        f"{ROOM_PATH}/state/m.room.name/",
        ".",
        id="state-key-dot",
    ),
    pytest.param(
        lambda c: c.send_event(ROOM, "m.room.message", {}, ".."),
        f"{ROOM_PATH}/send/m.room.message/",
        "..",
        id="txn-id-dotdot",
    ),
]


@pytest.mark.parametrize(("call", "prefix", "value"), DOT_SEGMENTS)
async def test_a_dot_identifier_stays_one_segment(call: Call, prefix: str, value: str) -> None:
    request = await one_request(call, ok({"event_id": "$e"}))
    path = raw_path(request)
    assert path.startswith(prefix)
    assert unquote(path.removeprefix(prefix)) == value


# --- the access token --------------------------------------------------------------------

# Every authenticated endpoint, with an answer it accepts and the request it must send.
ENDPOINTS = [
    pytest.param(
        lambda c: c.whoami(), ok({"user_id": BOT}), "GET", f"{V3}/account/whoami", None, id="whoami"
    ),
    pytest.param(
        lambda c: c.sync(), ok({"next_batch": "s1"}), "GET", f"{V3}/sync", None, id="sync"
    ),
    pytest.param(
        lambda c: c.upload_filter({"room": {"timeline": {"limit": 10}}}),
        ok({"filter_id": "7"}),
        "POST",
        f"{BOT_PATH}/filter",
        {"room": {"timeline": {"limit": 10}}},
        id="upload_filter",
    ),
    pytest.param(
        lambda c: c.create_room(
            name="Chat",
            preset="private_chat",
            invite=["@alice:example.org"],
            is_direct=True,
            initial_state=[StateEventSpec("m.room.encryption", {"algorithm": "x"})],
        ),
        ok({"room_id": ROOM}),
        "POST",
        f"{V3}/createRoom",
        {
            "name": "Chat",
            "preset": "private_chat",
            "is_direct": True,
            "invite": ["@alice:example.org"],
            "initial_state": [
                {"type": "m.room.encryption", "content": {"algorithm": "x"}, "state_key": ""}
            ],
        },
        id="create_room",
    ),
    pytest.param(
        lambda c: c.create_space(name="Space"),
        ok({"room_id": ROOM}),
        "POST",
        f"{V3}/createRoom",
        {"name": "Space", "preset": "private_chat", "creation_content": {"type": "m.space"}},
        id="create_space",
    ),
    pytest.param(
        lambda c: c.join_room(ROOM),
        ok({"room_id": ROOM}),
        "POST",
        f"{V3}/join/%21room%3Aexample.org",
        {},
        id="join_room",
    ),
    pytest.param(
        lambda c: c.invite_user(ROOM, "@alice:example.org"),
        ok(),
        "POST",
        f"{ROOM_PATH}/invite",
        {"user_id": "@alice:example.org"},
        id="invite_user",
    ),
    pytest.param(
        lambda c: c.leave_room(ROOM), ok(), "POST", f"{ROOM_PATH}/leave", {}, id="leave_room"
    ),
    pytest.param(
        lambda c: c.leave_room(ROOM, reason="bye"),
        ok(),
        "POST",
        f"{ROOM_PATH}/leave",
        {"reason": "bye"},
        id="leave_room-reason",
    ),
    pytest.param(
        lambda c: c.forget_room(ROOM), ok(), "POST", f"{ROOM_PATH}/forget", {}, id="forget_room"
    ),
    pytest.param(
        lambda c: c.joined_rooms(),
        ok({"joined_rooms": []}),
        "GET",
        f"{V3}/joined_rooms",
        None,
        id="joined_rooms",
    ),
    pytest.param(
        lambda c: c.joined_members(ROOM),
        ok({"joined": {}}),
        "GET",
        f"{ROOM_PATH}/joined_members",
        None,
        id="joined_members",
    ),
    pytest.param(
        lambda c: c.get_state(ROOM), ok([]), "GET", f"{ROOM_PATH}/state", None, id="get_state"
    ),
    pytest.param(
        lambda c: c.send_event(ROOM, "m.room.message", {"body": "hi"}, "t1"),
        ok({"event_id": "$e"}),
        "PUT",
        f"{ROOM_PATH}/send/m.room.message/t1",
        {"body": "hi"},
        id="send_event",
    ),
    pytest.param(
        lambda c: c.redact(ROOM, EVENT_ID, "t2"),
        ok({"event_id": "$r"}),
        "PUT",
        f"{ROOM_PATH}/redact/{EVENT_SEGMENT}/t2",
        {},
        id="redact",
    ),
    pytest.param(
        lambda c: c.redact(ROOM, EVENT_ID, "t3", reason="spam"),
        ok({"event_id": "$r"}),
        "PUT",
        f"{ROOM_PATH}/redact/{EVENT_SEGMENT}/t3",
        {"reason": "spam"},
        id="redact-reason",
    ),
    pytest.param(
        lambda c: c.send_receipt(ROOM, EVENT_ID),
        ok(),
        "POST",
        f"{ROOM_PATH}/receipt/m.read/{EVENT_SEGMENT}",
        {},
        id="send_receipt",
    ),
    pytest.param(
        lambda c: c.send_receipt(ROOM, EVENT_ID, "m.read.private", thread_id="main"),
        ok(),
        "POST",
        f"{ROOM_PATH}/receipt/m.read.private/{EVENT_SEGMENT}",
        {"thread_id": "main"},
        id="send_receipt-thread",
    ),
    pytest.param(
        lambda c: c.set_typing(ROOM, True, timeout_ms=5000),
        ok(),
        "PUT",
        f"{ROOM_PATH}/typing/%40bot%3Aexample.org",
        {"typing": True, "timeout": 5000},
        id="set_typing-on",
    ),
    pytest.param(
        lambda c: c.set_typing(ROOM, False),
        ok(),
        "PUT",
        f"{ROOM_PATH}/typing/%40bot%3Aexample.org",
        {"typing": False},
        id="set_typing-off",
    ),
    pytest.param(
        lambda c: c.messages(ROOM, direction="b"),
        ok({"start": "t0", "chunk": []}),
        "GET",
        f"{ROOM_PATH}/messages",
        None,
        id="messages",
    ),
    pytest.param(
        lambda c: c.put_account_data("org.example.x", {"a": 1}),
        ok(),
        "PUT",
        f"{BOT_PATH}/account_data/org.example.x",
        {"a": 1},
        id="put_account_data",
    ),
    pytest.param(
        lambda c: c.get_room_account_data(ROOM, "m.tag"),
        ok({}),
        "GET",
        f"{BOT_PATH}/rooms/%21room%3Aexample.org/account_data/m.tag",
        None,
        id="get_room_account_data",
    ),
    pytest.param(
        lambda c: c.put_room_account_data(ROOM, "m.tag", {"tags": {}}),
        ok(),
        "PUT",
        f"{BOT_PATH}/rooms/%21room%3Aexample.org/account_data/m.tag",
        {"tags": {}},
        id="put_room_account_data",
    ),
    pytest.param(
        lambda c: c.set_displayname("Bot"),
        ok(),
        "PUT",
        f"{V3}/profile/%40bot%3Aexample.org/displayname",
        {"displayname": "Bot"},
        id="set_displayname",
    ),
    pytest.param(
        lambda c: c.space_hierarchy(ROOM),
        ok({"rooms": []}),
        "GET",
        f"{V1}/rooms/%21room%3Aexample.org/hierarchy",
        None,
        id="space_hierarchy",
    ),
    pytest.param(lambda c: c.logout(), ok(), "POST", f"{V3}/logout", {}, id="logout"),
]


@pytest.mark.parametrize(("call", "answer", "method", "path", "body"), ENDPOINTS)
async def test_an_authenticated_request_has_its_path_body_and_bearer_header(
    call: Call, answer: httpx.Response, method: str, path: str, body: object
) -> None:
    request = await one_request(call, answer)

    assert (request.method, raw_path(request)) == (method, path)
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert TOKEN not in str(request.url)
    assert "access_token" not in str(request.url)
    if body is None:
        assert request.content == b""
        assert "Content-Type" not in request.headers
    else:
        # POST and PUT always carry a JSON object, "{}" when there is nothing to say.
        assert json.loads(request.content) == body
        assert request.headers["Content-Type"] == "application/json"


async def test_versions_is_sent_without_a_token() -> None:
    answer = ok({"versions": ["v1.11"], "unstable_features": {"org.example": True}})
    server = ScriptedServer(answer)
    async with server.client() as client:
        versions = await client.versions()

    assert versions.versions == ["v1.11"]
    assert versions.unstable_features == {"org.example": True}
    assert server.only.raw_path == "/_matrix/client/versions"
    assert server.only.authorization is None


async def test_a_client_without_a_token_can_still_ask_for_versions() -> None:
    server = ScriptedServer(ok({"versions": ["v1.11"]}))
    async with server.client(access_token=None) as client:
        await client.versions()
    assert server.only.authorization is None


async def test_endpoints_under_the_user_need_a_known_user_id() -> None:
    server = ScriptedServer()
    async with server.client(user_id=None) as client:
        with pytest.raises(MatrixAPIError, match="user id is not known"):
            await client.get_account_data("m.direct")
    assert server.seen == []


# --- query parameters --------------------------------------------------------------------


async def test_a_plain_sync_asks_for_an_immediate_answer() -> None:
    request = await one_request(lambda c: c.sync(), ok({"next_batch": "s1"}))
    assert dict(request.url.params) == {"timeout": "0"}


async def test_sync_sends_since_timeout_full_state_and_presence() -> None:
    request = await one_request(
        lambda c: c.sync(
            since=SyncToken("s41"), timeout_ms=30_000, full_state=True, set_presence="offline"
        ),
        ok({"next_batch": "s42"}),
    )
    assert dict(request.url.params) == {
        "timeout": "30000",
        "since": "s41",
        "full_state": "true",
        "set_presence": "offline",
    }


async def test_a_long_poll_sync_gets_a_read_timeout_above_its_own_timeout() -> None:
    request = await one_request(lambda c: c.sync(timeout_ms=30_000), ok({"next_batch": "s"}))
    assert request.extensions["timeout"]["read"] == 45.0


async def test_other_requests_keep_the_default_read_timeout() -> None:
    request = await one_request(lambda c: c.joined_rooms(), ok({"joined_rooms": []}))
    assert request.extensions["timeout"] == {
        "connect": 10.0,
        "read": 30.0,
        "write": 30.0,
        "pool": 10.0,
    }


async def test_sync_sends_an_inline_filter_as_json() -> None:
    definition = {"room": {"timeline": {"limit": 5}, "state": {"lazy_load_members": True}}}
    request = await one_request(lambda c: c.sync(filter=definition), ok({"next_batch": "s"}))
    assert json.loads(request.url.params["filter"]) == definition


async def test_query_values_that_look_like_syntax_arrive_intact() -> None:
    token = SyncToken("s1_2&next=3 +%20/é")
    definition = {"room": {"rooms": ["!a:b", "!c=d&e"]}}
    request = await one_request(
        lambda c: c.sync(since=token, filter=definition), ok({"next_batch": "s"})
    )
    assert request.url.params["since"] == token
    assert json.loads(request.url.params["filter"]) == definition
    assert "next" not in request.url.params


async def test_sync_sends_a_filter_id_as_it_is() -> None:
    request = await one_request(lambda c: c.sync(filter=FilterID("7")), ok({"next_batch": "s"}))
    assert request.url.params["filter"] == "7"


async def test_messages_always_sends_a_direction() -> None:
    request = await one_request(
        lambda c: c.messages(ROOM, direction="f"), ok({"start": "t0", "chunk": []})
    )
    assert dict(request.url.params) == {"dir": "f"}


async def test_messages_sends_its_paging_parameters() -> None:
    request = await one_request(
        lambda c: c.messages(
            ROOM,
            direction="b",
            from_token=SyncToken("t1"),
            to_token=SyncToken("t0"),
            limit=50,
            filter={"types": ["m.room.message"]},
        ),
        ok({"start": "t1", "chunk": []}),
    )
    params = request.url.params
    assert (params["dir"], params["from"], params["to"], params["limit"]) == ("b", "t1", "t0", "50")
    assert json.loads(params["filter"]) == {"types": ["m.room.message"]}


async def test_space_hierarchy_sends_its_paging_parameters() -> None:
    request = await one_request(
        lambda c: c.space_hierarchy(
            ROOM, from_token=SyncToken("p1"), limit=20, max_depth=1, suggested_only=True
        ),
        ok({"rooms": [{"room_id": ROOM, "room_type": "m.space"}], "next_batch": "p2"}),
    )
    assert dict(request.url.params) == {
        "from": "p1",
        "limit": "20",
        "max_depth": "1",
        "suggested_only": "true",
    }


# --- answers decoded -----------------------------------------------------------------------


async def test_joined_members_maps_users_to_display_names() -> None:
    server = ScriptedServer(
        ok(
            {
                "joined": {
                    "@alice:example.org": {"display_name": "Alice", "avatar_url": "mxc://x/y"},
                    "@bob:example.org": {},
                }
            }
        )
    )
    async with server.client() as client:
        members = await client.joined_members(ROOM)
    assert members == {"@alice:example.org": "Alice", "@bob:example.org": None}


@pytest.mark.parametrize(
    ("body", "name"),
    [({"displayname": "Alice"}, "Alice"), ({}, None), ({"displayname": None}, None)],
)
async def test_get_displayname_is_none_when_unset(
    body: dict[str, object], name: str | None
) -> None:
    server = ScriptedServer(ok(body))
    async with server.client() as client:
        assert await client.get_displayname("@alice:example.org") == name


async def test_space_hierarchy_decodes_rooms_and_next_batch() -> None:
    child_state = {
        "type": "m.space.child",
        "state_key": "!child:example.org",
        "sender": BOT,
        "content": {"via": ["example.org"]},
        "origin_server_ts": 1,
    }
    server = ScriptedServer(
        ok(
            {
                "rooms": [
                    {
                        "room_id": ROOM,
                        "room_type": "m.space",
                        "num_joined_members": 2,
                        "name": "Space",
                        "children_state": [child_state],
                    },
                    {"room_id": "!child:example.org", "num_joined_members": 1},
                ],
                "next_batch": "p2",
            }
        )
    )
    async with server.client() as client:
        page = await client.space_hierarchy(ROOM)

    assert page.next_batch == "p2"
    assert [room.room_id for room in page.rooms] == [ROOM, "!child:example.org"]
    assert page.rooms[0].room_type == "m.space"
    assert page.rooms[0].children_state[0].state_key == "!child:example.org"


@pytest.mark.parametrize(
    "url", ["http://bot:hunter2@127.0.0.1:8008", "https://hunter2@hs.example", "http://:hunter2@h"]
)
def test_a_homeserver_url_with_credentials_is_refused_without_echoing_them(url: str) -> None:
    with pytest.raises(MatrixAPIError) as refused:
        MatrixClient(url, access_token=TOKEN)
    assert "hunter2" not in str(refused.value)
    assert "credentials" in str(refused.value)
