"""Shared helpers for the `matrix_api` integration tests against a real Synapse.

Everything here runs under trio with the real clock; nothing is mocked but the
`RecordingTransport`, which only watches real traffic go by.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
import trio

from matrix_api import MatrixClient, RetryPolicy, new_txn_id
from matrix_api.models import EventID, RoomEvent, RoomID, SyncResponse, SyncToken
from matrix_api.testing.synapse import RegisteredUser, SynapseServer

__all__ = [
    "Exchange",
    "MakeUser",
    "RecordingTransport",
    "bodies",
    "client_for",
    "ephemeral",
    "send_text",
    "sync_until",
    "text",
]


MakeUser = Callable[..., RegisteredUser]
"""The type of the ``make_user`` fixture (tests/integration/conftest.py)."""


def client_for(
    server: SynapseServer,
    user: RegisteredUser,
    *,
    retry_policy: RetryPolicy | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> MatrixClient:
    """A client acting as ``user``; the caller closes it (``async with``)."""
    return MatrixClient(
        server.base_url,
        access_token=user.access_token,
        user_id=user.user_id,
        device_id=user.device_id,
        retry_policy=retry_policy,
        transport=transport,
    )


def ephemeral(response: SyncResponse, room_id: RoomID, event_type: str) -> list[dict[str, Any]]:
    """The contents of the ephemeral events of one type in one joined room."""
    room = response.rooms.join.get(room_id)
    if room is None:
        return []
    return [event.content for event in room.ephemeral if event.type == event_type]


def text(body: str) -> dict[str, Any]:
    """The content of a plain ``m.text`` message."""
    return {"msgtype": "m.text", "body": body}


async def send_text(client: MatrixClient, room_id: RoomID, body: str) -> EventID:
    return await client.send_event(room_id, "m.room.message", text(body), new_txn_id())


def bodies(events: list[RoomEvent]) -> list[str]:
    """The bodies of the ``m.room.message`` events among ``events``, in order."""
    return [event.content["body"] for event in events if event.type == "m.room.message"]


async def sync_until(
    client: MatrixClient,
    since: SyncToken,
    found: Callable[[SyncResponse], bool],
    *,
    within: float = 10.0,
) -> tuple[SyncResponse, SyncToken]:
    """Long-poll incremental syncs from ``since`` until one satisfies ``found``.

    Returns that response and the token to continue from. Fails the test (via
    `trio.TooSlowError`) when nothing matching arrives ``within`` seconds: ephemeral
    events such as receipts and typing reach /sync asynchronously.
    """
    with trio.fail_after(within):
        while True:
            response = await client.sync(since=since, timeout_ms=1000)
            since = response.next_batch
            if found(response):
                return response, since


@dataclass(frozen=True)
class Exchange:
    """One request through `RecordingTransport` and its answer, on trio's clock."""

    method: str
    path: str
    sent_at: float
    answered_at: float
    status: int
    retry_after_header: str | None
    body: dict[str, Any] | None
    """The decoded JSON body, kept for error answers only."""

    @property
    def retry_after_ms(self) -> int | None:
        value = (self.body or {}).get("retry_after_ms")
        return value if isinstance(value, int) else None


class RecordingTransport(httpx.AsyncHTTPTransport):
    """A real HTTP transport that records every exchange with its timing.

    Error bodies (status >= 400) are read here so their ``retry_after_ms`` can be
    compared with what the client did next; httpx keeps the content it has read,
    so the client still gets the whole answer.
    """

    def __init__(self) -> None:
        super().__init__()
        self.exchanges: list[Exchange] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        sent_at = trio.current_time()
        response = await super().handle_async_request(request)
        body = None
        if response.status_code >= 400:
            content = await response.aread()
            body = msgspec.json.decode(content)
        self.exchanges.append(
            Exchange(
                method=request.method,
                path=request.url.path,
                sent_at=sent_at,
                answered_at=trio.current_time(),
                status=response.status_code,
                retry_after_header=response.headers.get("Retry-After"),
                body=body,
            )
        )
        return response
