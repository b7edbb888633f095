"""When a failed request is sent again, and after how long (virtual time, `autojump_clock`)."""

from __future__ import annotations

import random

import httpx
import pytest
import trio

from matrix_api import RetryPolicy
from matrix_api.errors import (
    BadResponse,
    Forbidden,
    LimitExceeded,
    MatrixAPIError,
    MatrixError,
    NetworkError,
    NotFound,
)
from matrix_api.models import RoomID
from matrix_mock import ScriptedServer, after, matrix_error, ok, raw

SEED = 7
ROOM = RoomID("!room:example.org")
CREATED = ok({"room_id": "!new:example.org"})
JOINED = ok({"joined_rooms": [ROOM]})


def seeded(
    *,
    max_attempts: int = 5,
    base_delay: float = 0.5,
    max_delay: float = 30.0,
    max_retry_after: float = 300.0,
) -> RetryPolicy:
    """The default policy with jitter drawn from a seeded, reproducible rng."""
    return RetryPolicy(
        max_attempts=max_attempts,
        base_delay=base_delay,
        max_delay=max_delay,
        max_retry_after=max_retry_after,
        rng=random.Random(SEED),
    )


def unavailable() -> httpx.Response:
    return matrix_error(503, "M_UNKNOWN", "Service unavailable")


# --- the policy on its own ---------------------------------------------------------------


def test_backoff_is_full_jitter_below_a_doubling_ceiling() -> None:
    policy = RetryPolicy(base_delay=0.5, max_delay=30.0, rng=random.Random(SEED))
    for attempt in range(12):
        ceiling = min(30.0, 0.5 * 2**attempt)
        waits = [policy.backoff(attempt) for _ in range(200)]
        assert all(0 <= wait <= ceiling for wait in waits)
        # Full jitter: the waits spread over the range rather than sitting at the top.
        assert min(waits) < ceiling / 4 < ceiling * 3 / 4 < max(waits)


def test_backoff_is_deterministic_for_a_seeded_rng() -> None:
    first, second = seeded(), seeded()
    assert [first.backoff(n) for n in range(6)] == [second.backoff(n) for n in range(6)]


def test_the_policy_gives_up_after_max_attempts() -> None:
    policy = seeded(max_attempts=3)
    error = MatrixError(503, "M_UNKNOWN", "down")
    assert policy.delay_for(error, 0, idempotent=True) is not None
    assert policy.delay_for(error, 1, idempotent=True) is not None
    assert policy.delay_for(error, 2, idempotent=True) is None


@pytest.mark.parametrize(
    ("error", "idempotent", "retried"),
    [
        pytest.param(MatrixError(502, "M_UNKNOWN", ""), True, True, id="502-get"),
        pytest.param(MatrixError(504, "M_UNKNOWN", ""), True, True, id="504-get"),
        pytest.param(BadResponse("html", status=503), True, True, id="html-503-get"),
        pytest.param(MatrixError(503, "M_UNKNOWN", ""), False, False, id="503-post"),
        pytest.param(MatrixError(500, "M_UNKNOWN", ""), True, False, id="500-get"),
        pytest.param(Forbidden(403, "M_FORBIDDEN", ""), True, False, id="403-get"),
        pytest.param(BadResponse("truncated", status=200), True, False, id="bad-200-get"),
        pytest.param(LimitExceeded(429, "M_LIMIT_EXCEEDED", ""), False, True, id="429-post"),
        pytest.param(
            NetworkError("refused", maybe_processed=False), False, True, id="connect-post"
        ),
        pytest.param(NetworkError("reset", maybe_processed=True), False, False, id="reset-post"),
        pytest.param(NetworkError("reset", maybe_processed=True), True, True, id="reset-get"),
    ],
)
def test_which_errors_the_policy_retries(
    error: MatrixAPIError, idempotent: bool, retried: bool
) -> None:
    delay = seeded().delay_for(error, 0, idempotent=idempotent)
    assert (delay is not None) is retried


# --- the client under the mock clock -----------------------------------------------------


async def test_a_429_waits_exactly_the_retry_after_header(autojump_clock: trio.abc.Clock) -> None:
    server = ScriptedServer(
        matrix_error(429, "M_LIMIT_EXCEEDED", "Too many", headers={"Retry-After": "3"}), JOINED
    )
    async with server.client(retry_policy=seeded()) as client:
        assert await client.joined_rooms() == [ROOM]

    assert server.waits == [pytest.approx(3.0)]


async def test_a_429_waits_exactly_retry_after_ms(autojump_clock: trio.abc.Clock) -> None:
    server = ScriptedServer(matrix_error(429, "M_LIMIT_EXCEEDED", retry_after_ms=1500), JOINED)
    async with server.client(retry_policy=seeded()) as client:
        await client.joined_rooms()

    assert server.waits == [pytest.approx(1.5)]


async def test_a_429_with_header_and_body_waits_the_header(autojump_clock: trio.abc.Clock) -> None:
    limited = matrix_error(
        429, "M_LIMIT_EXCEEDED", headers={"Retry-After": "2"}, retry_after_ms=9000
    )
    server = ScriptedServer(limited, JOINED)
    async with server.client(retry_policy=seeded()) as client:
        await client.joined_rooms()

    assert server.waits == [pytest.approx(2.0)]


async def test_the_wait_starts_when_the_answer_arrives(autojump_clock: trio.abc.Clock) -> None:
    slow_429 = after(4.0, matrix_error(429, "M_LIMIT_EXCEEDED", headers={"Retry-After": "3"}))
    server = ScriptedServer(slow_429, JOINED)
    start = trio.current_time()
    async with server.client(retry_policy=seeded()) as client:
        await client.joined_rooms()

    assert server.times == [pytest.approx(start), pytest.approx(start + 4.0 + 3.0)]


async def test_a_429_without_a_wait_backs_off(autojump_clock: trio.abc.Clock) -> None:
    server = ScriptedServer(matrix_error(429, "M_LIMIT_EXCEEDED"), JOINED)
    async with server.client(retry_policy=seeded(base_delay=0.5)) as client:
        await client.joined_rooms()

    assert server.waits == [pytest.approx(random.Random(SEED).uniform(0, 0.5))]


async def test_a_get_is_retried_through_503s_with_jittered_backoff(
    autojump_clock: trio.abc.Clock,
) -> None:
    server = ScriptedServer(unavailable(), unavailable(), JOINED)
    async with server.client(retry_policy=seeded(base_delay=0.5)) as client:
        assert await client.joined_rooms() == [ROOM]

    first, second = server.waits
    assert 0 <= first <= 0.5
    assert 0 <= second <= 1.0
    rng = random.Random(SEED)
    assert [first, second] == [pytest.approx(rng.uniform(0, 0.5)), pytest.approx(rng.uniform(0, 1))]


async def test_an_html_gateway_page_on_a_get_is_retried(autojump_clock: trio.abc.Clock) -> None:
    server = ScriptedServer(raw(502, b"<html>Bad Gateway</html>", "text/html"), JOINED)
    async with server.client(retry_policy=seeded()) as client:
        assert await client.joined_rooms() == [ROOM]
    assert len(server.seen) == 2


async def test_no_backoff_is_longer_than_max_delay(autojump_clock: trio.abc.Clock) -> None:
    policy = seeded(base_delay=10.0, max_delay=1.0, max_attempts=5)
    server = ScriptedServer(*[unavailable() for _ in range(4)], JOINED)
    async with server.client(retry_policy=policy) as client:
        await client.joined_rooms()

    assert len(server.waits) == 4
    assert all(0 <= wait <= 1.0 for wait in server.waits)


async def test_max_attempts_is_honoured(autojump_clock: trio.abc.Clock) -> None:
    # Exactly three answers scripted: a fourth request would fail the test.
    server = ScriptedServer(unavailable(), unavailable(), unavailable())
    async with server.client(retry_policy=seeded(max_attempts=3)) as client:
        with pytest.raises(MatrixError) as caught:
            await client.joined_rooms()

    assert len(server.seen) == 3
    assert caught.value.status == 503


async def test_a_network_error_is_raised_after_the_last_attempt(
    autojump_clock: trio.abc.Clock,
) -> None:
    server = ScriptedServer(httpx.ReadError("reset"), httpx.ReadError("reset again"))
    async with server.client(retry_policy=seeded(max_attempts=2)) as client:
        with pytest.raises(NetworkError) as caught:
            await client.joined_rooms()

    assert len(server.seen) == 2
    assert caught.value.maybe_processed is True
    assert isinstance(caught.value.__cause__, httpx.ReadError)


async def test_a_client_error_is_not_retried(autojump_clock: trio.abc.Clock) -> None:
    server = ScriptedServer(matrix_error(404, "M_NOT_FOUND", "No such room"))
    async with server.client(retry_policy=seeded()) as client:
        with pytest.raises(NotFound):
            await client.get_state(ROOM)
    assert len(server.seen) == 1


async def test_a_wait_longer_than_max_retry_after_raises_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    server = ScriptedServer(matrix_error(429, "M_LIMIT_EXCEEDED", headers={"Retry-After": "600"}))
    start = trio.current_time()
    async with server.client(retry_policy=seeded(max_retry_after=300.0)) as client:
        with pytest.raises(LimitExceeded) as caught:
            await client.joined_rooms()

    assert caught.value.retry_after == 600.0
    assert len(server.seen) == 1
    assert trio.current_time() == start


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ReadError("Connection reset by peer"),
        httpx.RemoteProtocolError("peer closed connection without sending complete message body"),
        httpx.ReadTimeout("timed out"),
        httpx.ConnectError("Connection refused"),
        httpx.ConnectTimeout("timed out"),
    ],
    ids=lambda failure: type(failure).__name__,
)
async def test_a_get_is_retried_after_a_network_failure(
    failure: Exception, autojump_clock: trio.abc.Clock
) -> None:
    server = ScriptedServer(failure, JOINED)
    async with server.client(retry_policy=seeded()) as client:
        assert await client.joined_rooms() == [ROOM]
    assert len(server.seen) == 2


# --- requests that must not run twice ----------------------------------------------------


async def test_create_room_is_not_retried_on_503(autojump_clock: trio.abc.Clock) -> None:
    server = ScriptedServer(unavailable())
    async with server.client(retry_policy=seeded()) as client:
        with pytest.raises(MatrixError) as caught:
            await client.create_room(name="x")
    assert caught.value.status == 503
    assert len(server.seen) == 1


@pytest.mark.parametrize(
    "failure",
    [httpx.ReadError("reset"), httpx.RemoteProtocolError("closed"), httpx.ReadTimeout("slow")],
    ids=lambda failure: type(failure).__name__,
)
async def test_create_room_is_not_retried_once_it_may_have_arrived(
    failure: Exception, autojump_clock: trio.abc.Clock
) -> None:
    server = ScriptedServer(failure)
    async with server.client(retry_policy=seeded()) as client:
        with pytest.raises(NetworkError) as caught:
            await client.create_room(name="x")
    assert caught.value.maybe_processed is True
    assert len(server.seen) == 1


async def test_create_room_is_retried_on_429(autojump_clock: trio.abc.Clock) -> None:
    server = ScriptedServer(matrix_error(429, "M_LIMIT_EXCEEDED", retry_after_ms=500), CREATED)
    async with server.client(retry_policy=seeded()) as client:
        assert await client.create_room(name="x") == "!new:example.org"
    assert [seen.method for seen in server.seen] == ["POST", "POST"]
    assert server.waits == [pytest.approx(0.5)]


async def test_create_room_is_retried_when_it_never_connected(
    autojump_clock: trio.abc.Clock,
) -> None:
    server = ScriptedServer(httpx.ConnectError("Connection refused"), CREATED)
    async with server.client(retry_policy=seeded()) as client:
        assert await client.create_room(name="x") == "!new:example.org"
    assert len(server.seen) == 2
    assert server.seen[0].json == server.seen[1].json == {"name": "x"}


async def test_a_retried_send_reuses_its_transaction_id(autojump_clock: trio.abc.Clock) -> None:
    server = ScriptedServer(
        raw(502, b"<html>Bad Gateway</html>", "text/html"),
        httpx.ReadError("reset"),
        ok({"event_id": "$sent"}),
    )
    async with server.client(retry_policy=seeded()) as client:
        event_id = await client.send_event(ROOM, "m.room.message", {"body": "hi"}, "txn-1")

    assert event_id == "$sent"
    assert [seen.method for seen in server.seen] == ["PUT"] * 3
    assert {seen.raw_path for seen in server.seen} == {
        "/_matrix/client/v3/rooms/%21room%3Aexample.org/send/m.room.message/txn-1"
    }
    assert all(seen.json == {"body": "hi"} for seen in server.seen)
