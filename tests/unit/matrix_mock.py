"""A scripted homeserver for the unit tests: canned answers in order, every request recorded.

    server = ScriptedServer(matrix_error(503, "M_UNKNOWN"), ok({"joined_rooms": []}))
    async with server.client() as client:
        await client.joined_rooms()
    assert len(server.seen) == 2

A step is an `httpx.Response`, an exception to raise in place of an answer (``httpx.ReadError``
is a connection reset), or a callable taking the request (it may be async and ``await
trio.sleep``). A request arriving after the script has run out fails the test, so a test
that gives N steps also asserts that no (N+1)-th request was made.
"""

from __future__ import annotations

import inspect
import json
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from matrix_api import MatrixClient, RetryPolicy
from matrix_api.models import UserID

HOMESERVER = "https://hs.example.org"
TOKEN = "syt_Ym90_SeCrEtToKeN_4f2a9c"
BOT = UserID("@bot:example.org")
DEVICE = "BOTDEVICE"

# One attempt only: for tests about what a single answer turns into.
NO_RETRY = RetryPolicy(max_attempts=1)

Handler = Callable[[httpx.Request], httpx.Response | Awaitable[httpx.Response]]
Step = httpx.Response | Exception | Handler


@dataclass(frozen=True)
class Seen:
    """One request as the server received it, and when (trio's clock)."""

    request: httpx.Request
    at: float

    @property
    def method(self) -> str:
        return self.request.method

    @property
    def raw_path(self) -> str:
        """The path exactly as sent, percent-encoding included, without the query."""
        return self.request.url.raw_path.decode("ascii").partition("?")[0]

    @property
    def query(self) -> list[tuple[str, str]]:
        return list(self.request.url.params.multi_items())

    @property
    def params(self) -> dict[str, str]:
        return dict(self.request.url.params)

    @property
    def json(self) -> Any:
        return json.loads(self.request.content)

    @property
    def authorization(self) -> str | None:
        value: str | None = self.request.headers.get("Authorization")
        return value


class ScriptedServer:
    def __init__(self, *steps: Step) -> None:
        self.steps: deque[Step] = deque(steps)
        self.seen: list[Seen] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(Seen(request, trio.current_time()))
        if not self.steps:
            raise AssertionError(
                f"unexpected request #{len(self.seen)}: {request.method} {request.url.raw_path!r}"
            )
        step = self.steps.popleft()
        if isinstance(step, Exception):
            raise step
        if isinstance(step, httpx.Response):
            return step
        answer = step(request)
        if inspect.isawaitable(answer):
            answer = await answer
        return answer

    def client(self, **kwargs: Any) -> MatrixClient:
        """A client of this server, logged in as `BOT` unless told otherwise."""
        options: dict[str, Any] = {
            "access_token": TOKEN,
            "user_id": BOT,
            "device_id": DEVICE,
            # Seeded, so the jitter of every backoff is the same on every run.
            "retry_policy": RetryPolicy(rng=random.Random(1234)),
        }
        options.update(kwargs)
        return MatrixClient(HOMESERVER, transport=httpx.MockTransport(self), **options)

    @property
    def times(self) -> list[float]:
        return [seen.at for seen in self.seen]

    @property
    def waits(self) -> list[float]:
        """The virtual time between consecutive requests."""
        return [later - earlier for earlier, later in zip(self.times, self.times[1:], strict=False)]

    @property
    def only(self) -> Seen:
        assert len(self.seen) == 1, f"expected one request, got {len(self.seen)}"
        return self.seen[0]


def ok(
    body: Any = None, *, status: int = 200, headers: dict[str, str] | None = None
) -> httpx.Response:
    return httpx.Response(status, json={} if body is None else body, headers=headers)


def matrix_error(
    status: int,
    errcode: str,
    error: str = "something went wrong",
    *,
    headers: dict[str, str] | None = None,
    **fields: Any,
) -> httpx.Response:
    """A standard Matrix error answer; ``fields`` adds ``retry_after_ms``, ``soft_logout``..."""
    return httpx.Response(
        status, json={"errcode": errcode, "error": error, **fields}, headers=headers
    )


def raw(status: int, content: bytes, content_type: str = "application/json") -> httpx.Response:
    """An answer with exactly these bytes: truncated JSON, an HTML error page, nothing."""
    return httpx.Response(status, content=content, headers={"Content-Type": content_type})


def after(delay: float, step: httpx.Response | Exception) -> Handler:
    """A step that answers (or fails) only after ``delay`` seconds: a slow server."""

    async def slow(request: httpx.Request) -> httpx.Response:
        await trio.sleep(delay)
        if isinstance(step, Exception):
            raise step
        return step

    return slow


def room_event(
    event_id: str = "$event",
    *,
    type: Any = "m.room.message",
    sender: str = "@alice:example.org",
    content: Any = None,
    ts: Any = 1_700_000_000_000,
    **extra: Any,
) -> dict[str, Any]:
    """A client event; ``extra`` adds ``state_key``, ``unsigned``...

    Any field may be given a wrong type on purpose, to build a malformed event.
    """
    return {
        "type": type,
        "event_id": event_id,
        "sender": sender,
        "origin_server_ts": ts,
        "content": {"msgtype": "m.text", "body": "hi"} if content is None else content,
        **extra,
    }
