"""MatrixClient.current_members: who has not left a room, from member events a server may garble."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from matrix_api import BadResponse, MatrixClient, RetryPolicy
from matrix_api.models import RoomID

ROOM = RoomID("!room:example.org")


def _client(chunk: Any, seen: list[httpx.Request]) -> MatrixClient:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"chunk": chunk})

    return MatrixClient(
        "https://example.org",
        access_token="t",
        transport=httpx.MockTransport(handle),
        retry_policy=RetryPolicy(max_attempts=1),
    )


def _member(user: Any, membership: Any) -> dict[str, Any]:
    return {"type": "m.room.member", "state_key": user, "content": {"membership": membership}}


async def test_members_by_membership_and_junk_left_out() -> None:
    seen: list[httpx.Request] = []
    chunk = [
        _member("@alice:example.org", "join"),
        _member("@bob:example.org", "invite"),
        _member("@carol:example.org", "ban"),
        _member("not a user", "join"),
        _member(["@list:example.org"], "join"),
        _member("@dave:example.org", {"nested": "join"}),
        {"type": "m.room.message", "state_key": "@eve:example.org", "content": {}},
        {"type": "m.room.member", "state_key": "@frank:example.org", "content": "join"},
        "not an event",
        None,
    ]
    async with _client(chunk, seen) as client:
        members = await client.current_members(ROOM)

    assert members == {
        "@alice:example.org": "join",
        "@bob:example.org": "invite",
        "@carol:example.org": "ban",
    }
    [request] = seen
    assert request.url.path == "/_matrix/client/v3/rooms/!room:example.org/members"
    assert request.url.params["not_membership"] == "leave"


async def test_a_chunk_that_is_not_a_list_is_a_bad_answer() -> None:
    async with _client({"not": "a list"}, []) as client:
        with pytest.raises(BadResponse):
            await client.current_members(ROOM)
