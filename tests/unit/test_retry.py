"""The one backoff (`matrix_api.retry.Backoff`), the client's `RetryPolicy` on it, the
written worst case of the nested retries, and when the client sends a failed request
again and after how long (virtual time, `autojump_clock`)."""

from __future__ import annotations

import dataclasses
import math
import random
import re
from pathlib import Path

import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

import matrix_api.retry as retry_module
from bot.backends.backoff import BACKEND_BACKOFF
from bot.dispatch import JOB_BACKOFF
from bot.retries import worst_case_total_delay
from bot.runtime import SYNC_BACKOFF
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
from matrix_api.retry import Backoff
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


# --- the one backoff type ----------------------------------------------------------------


class Edge(random.Random):
    """An rng that always draws the top (or the bottom) of a range."""

    def __init__(self, *, top: bool) -> None:
        super().__init__(0)
        self.top = top

    def random(self) -> float:
        return 1.0 if self.top else 0.0


@pytest.mark.parametrize(
    "policy",
    [
        RetryPolicy(),
        BACKEND_BACKOFF,
        JOB_BACKOFF,
        SYNC_BACKOFF,
        Backoff(max_attempts=None, base_delay=10.0, max_delay=1.0),
        Backoff(max_attempts=None, base_delay=0.0, max_delay=5.0),
    ],
    ids=["client", "backend", "dispatcher", "sync", "base-above-cap", "zero"],
)
def test_every_wait_is_in_the_upper_half_of_its_doubling_ceiling(policy: Backoff) -> None:
    rng = random.Random(SEED)
    policy = dataclasses.replace(policy, rng=rng, max_attempts=None)
    for attempt in [*range(40), 1023, 1024, 1025, 10**6]:
        ceiling = min(policy.max_delay, policy.base_delay * 2.0 ** min(attempt, 64))
        assert policy.ceiling(attempt) == ceiling
        waits = [policy.delay(attempt) for _ in range(200)]
        assert all(w is not None and ceiling / 2 <= w <= ceiling for w in waits), attempt
        if ceiling > 0:
            # Equal jitter: the waits spread over the upper half, not stuck at one value.
            assert min(w for w in waits if w is not None) < ceiling * 0.6
            assert max(w for w in waits if w is not None) > ceiling * 0.9


def test_the_extremes_are_half_the_ceiling_and_the_ceiling() -> None:
    top = Backoff(max_attempts=None, base_delay=0.5, max_delay=30.0, rng=Edge(top=True))
    bottom = dataclasses.replace(top, rng=Edge(top=False))
    assert [top.wait(n) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert [bottom.wait(n) for n in range(8)] == [0.25, 0.5, 1, 2, 4, 8, 15, 15]


@given(
    base=st.floats(0, 1e6),
    cap=st.floats(0, 1e6),
    attempt=st.integers(0, 10**9),
    seed=st.integers(0, 2**32),
)
def test_any_wait_stays_within_its_bounds(base: float, cap: float, attempt: int, seed: int) -> None:
    policy = Backoff(None, base, cap, rng=random.Random(seed))
    ceiling = policy.ceiling(attempt)
    assert 0 <= ceiling <= cap
    assert ceiling / 2 <= policy.wait(attempt) <= ceiling


def test_a_seeded_backoff_is_reproducible() -> None:
    first, second = seeded(), seeded()
    assert [first.wait(n) for n in range(6)] == [second.wait(n) for n in range(6)]


@pytest.mark.parametrize("retry_after", [0.0, 0.001, 2.5, 59.999, 60.0])
def test_a_server_wait_up_to_the_maximum_is_honoured_exactly(retry_after: float) -> None:
    policy = Backoff(max_attempts=3, base_delay=1.0, max_delay=20.0, max_retry_after=60.0)
    assert policy.delay(0, retry_after=retry_after) == retry_after
    assert policy.delay(1, retry_after=retry_after) == retry_after


@pytest.mark.parametrize("retry_after", [60.001, 3600.0, math.inf, math.nan])
def test_a_server_wait_above_the_maximum_is_refused(retry_after: float) -> None:
    policy = Backoff(max_attempts=3, base_delay=1.0, max_delay=20.0, max_retry_after=60.0)
    assert policy.delay(0, retry_after=retry_after) is None


def test_a_negative_server_wait_is_no_wait() -> None:
    policy = Backoff(max_attempts=3, base_delay=1.0, max_delay=20.0)
    assert policy.delay(0, retry_after=-5.0) == 0.0


@pytest.mark.parametrize(("retry_after", "wait"), [(0.0, 4.0), (3.0, 4.0), (9.5, 9.5)])
def test_with_a_floor_the_server_wait_is_never_shorter_than_the_backoff(
    retry_after: float, wait: float
) -> None:
    policy = Backoff(
        max_attempts=None,
        base_delay=2.0,
        max_delay=60.0,
        max_retry_after=10.0,
        floor_retry_after=True,
        rng=Edge(top=True),
    )
    assert policy.delay(1, retry_after=retry_after) == wait
    assert policy.delay(1, retry_after=10.5) is None


@pytest.mark.parametrize("max_attempts", [1, 2, 5])
def test_max_attempts_counts_the_first_try(max_attempts: int) -> None:
    policy = Backoff(max_attempts=max_attempts, base_delay=1.0, max_delay=20.0)
    for attempt in range(max_attempts - 1):
        assert policy.delay(attempt) is not None
        assert policy.delay(attempt, retry_after=1.0) == 1.0
    assert policy.delay(max_attempts - 1) is None
    assert policy.delay(max_attempts - 1, retry_after=0.0) is None
    assert policy.delay(max_attempts + 100) is None


def test_without_an_attempt_limit_it_never_gives_up() -> None:
    policy = Backoff(max_attempts=None, base_delay=2.0, max_delay=60.0)
    assert policy.delay(10**9) is not None
    with pytest.raises(ValueError, match="no attempt limit"):
        policy.worst_case(1.0)


@pytest.mark.parametrize(
    "changes",
    [
        {"max_attempts": 0},
        {"max_attempts": -1},
        {"base_delay": -0.1},
        {"max_delay": math.inf},
        {"max_delay": math.nan},
        {"max_retry_after": math.inf},
        {"max_retry_after": -1.0},
    ],
)
def test_a_nonsensical_backoff_is_refused(changes: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"max_attempts|seconds"):
        dataclasses.replace(RetryPolicy(), **changes)


def test_the_worst_case_is_every_attempt_and_every_longest_wait() -> None:
    policy = Backoff(max_attempts=4, base_delay=1.0, max_delay=3.0, max_retry_after=10.0)
    assert policy.longest_waits(retry_after=False) == [1.0, 2.0, 3.0]
    assert policy.longest_waits() == [10.0, 10.0, 10.0]
    assert policy.worst_case(5.0, retry_after=False) == 4 * 5.0 + 6.0
    assert policy.worst_case(5.0) == 4 * 5.0 + 30.0
    assert Backoff(max_attempts=1, base_delay=1.0, max_delay=1.0).worst_case(7.0) == 7.0


def test_the_client_policy_keeps_its_defaults_and_is_the_one_backoff() -> None:
    policy = RetryPolicy()
    assert isinstance(policy, Backoff)
    assert (policy.max_attempts, policy.base_delay, policy.max_delay) == (5, 0.5, 30.0)
    assert policy.max_retry_after == 300.0
    assert policy.floor_retry_after is False


# --- the written rule and its worst case ---------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def figure(text: str, label: str) -> float:
    """The number of seconds written after ``label`` (``label ... **N s**``)."""
    text = " ".join(text.split())  # as wrapped, a label may span two lines
    found = re.search(re.escape(label) + r"[^*]*\*\*([0-9][0-9,.]*) s\*\*", text)
    assert found, f"no figure for {label!r}"
    return float(found.group(1).replace(",", ""))


def test_the_documented_worst_case_is_what_the_defaults_give() -> None:
    worst = worst_case_total_delay()
    # The arithmetic, spelled out as docs/retries.md does.
    assert worst.request_s == 5 * 120 + 4 * 300 == 1800
    assert worst.backend_s == min(300, 3 * 120 + 2 * 60) == 300
    assert worst.told_s == 300 + 1800 == 2100
    assert worst.dispatcher_wait_s == 3600
    doc = (ROOT / "docs" / "retries.md").read_text(encoding="utf-8")
    assert figure(doc, "One Matrix request") == worst.request_s
    assert figure(doc, "Asking the backend") == worst.backend_s
    assert figure(doc, "Until the user is told") == worst.told_s
    assert figure(doc, "Before the dispatcher runs the job again") == worst.dispatcher_wait_s
    brief = retry_module.__doc__ or ""
    assert "= 1800 s" in brief
    assert figure(brief, "told that their message failed") == worst.told_s


def test_the_worst_case_follows_the_parameters() -> None:
    # A different default would change the figure: the test above then fails until the
    # document says the new one.
    assert worst_case_total_delay(backend_timeout_s=60.0).told_s == 60 + 1800
    assert worst_case_total_delay(client=RetryPolicy(max_attempts=2)).request_s == 2 * 120 + 300
    fast = worst_case_total_delay(client_attempt_s=0.0, backend_attempt_s=0.0)
    assert fast.request_s == 4 * 300
    assert fast.backend_s == 2 * 60


# --- the client's classification of errors ------------------------------------------------


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

    assert server.waits == [pytest.approx(random.Random(SEED).uniform(0.25, 0.5))]


async def test_a_get_is_retried_through_503s_with_jittered_backoff(
    autojump_clock: trio.abc.Clock,
) -> None:
    server = ScriptedServer(unavailable(), unavailable(), JOINED)
    async with server.client(retry_policy=seeded(base_delay=0.5)) as client:
        assert await client.joined_rooms() == [ROOM]

    first, second = server.waits
    assert 0.25 <= first <= 0.5
    assert 0.5 <= second <= 1.0
    rng = random.Random(SEED)
    expected = [rng.uniform(0.25, 0.5), rng.uniform(0.5, 1)]
    assert [first, second] == [pytest.approx(wait) for wait in expected]


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
    assert all(0.5 <= wait <= 1.0 for wait in server.waits)


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
