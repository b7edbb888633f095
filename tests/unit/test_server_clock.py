"""The homeserver's clock, read from its answers' ``Date`` headers."""

from __future__ import annotations

import email.utils
import types
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from matrix_api import server_clock
from matrix_api.server_clock import ServerClock
from matrix_mock import ScriptedServer

# The server's clock in these tests, at a whole second, as ``Date`` tells them.
NOON = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
NOON_MS = int(NOON.timestamp() * 1000)


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def monotonic(monkeypatch: pytest.MonkeyPatch) -> FakeMonotonic:
    clock = FakeMonotonic()
    # Only server_clock's view of the time module (trio's own clock is untouched),
    # and no wall clock in it: the estimate must not need one.
    monkeypatch.setattr(server_clock, "time", types.SimpleNamespace(monotonic=clock))
    return clock


def date(when: datetime) -> list[tuple[bytes, bytes]]:
    return [(b"Date", email.utils.format_datetime(when, usegmt=True).encode())]


def test_the_servers_clock_is_unknown_until_an_answer_tells_it() -> None:
    clock = ServerClock()
    assert clock.now_ms() is None
    clock.observe([(b"Content-Type", b"application/json")])
    assert clock.now_ms() is None


def test_an_answer_tells_the_time_and_this_machine_counts_on(monotonic: FakeMonotonic) -> None:
    clock = ServerClock()
    clock.observe(date(NOON))
    assert clock.now_ms() == NOON_MS
    monotonic.now += 2.5
    assert clock.now_ms() == NOON_MS + 2500


def test_the_first_answer_of_a_new_second_sharpens_the_estimate(
    monotonic: FakeMonotonic,
) -> None:
    clock = ServerClock()
    clock.observe(date(NOON))  # the server said 12:00:00 ... but it was 12:00:00.700
    monotonic.now += 0.3
    clock.observe(date(NOON + timedelta(seconds=1)))  # ... as this, 0.3 s on, shows
    assert clock.now_ms() == NOON_MS + 1000


def test_a_later_answer_in_the_same_second_tells_nothing_new(monotonic: FakeMonotonic) -> None:
    clock = ServerClock()
    clock.observe(date(NOON))
    monotonic.now += 0.8
    clock.observe(date(NOON))
    # Still the first answer's reading, 0.8 s on: not moved back to 12:00:00.
    assert clock.now_ms() == NOON_MS + 800


def test_an_answer_behind_by_less_than_its_second_keeps_the_better_bound(
    monotonic: FakeMonotonic,
) -> None:
    clock = ServerClock()
    clock.observe(date(NOON + timedelta(seconds=1)))
    monotonic.now += 0.1
    clock.observe(date(NOON))  # another server process a little behind
    assert clock.now_ms() == NOON_MS + 1100


def test_a_server_clock_set_back_is_followed(monotonic: FakeMonotonic) -> None:
    clock = ServerClock()
    clock.observe(date(NOON))
    monotonic.now += 1.0
    clock.observe(date(NOON - timedelta(minutes=5)))
    assert clock.now_ms() == NOON_MS - 300_000


@pytest.mark.parametrize(
    "value",
    [b"", b"yesterday", b"Thu, 99 Nov 2026 12:00:00 GMT", b"\xff\xfe"],
)
def test_an_unreadable_date_tells_nothing(value: bytes) -> None:
    clock = ServerClock()
    clock.observe([(b"date", value)])
    assert clock.now_ms() is None


def test_a_date_written_with_a_zero_offset_is_gmt(monotonic: FakeMonotonic) -> None:
    clock = ServerClock()
    clock.observe([(b"date", b"Thu, 26 Nov 2026 12:00:00 -0000")])
    assert clock.now_ms() == NOON_MS


async def test_the_client_reads_the_servers_clock_from_its_answers(
    monotonic: FakeMonotonic,
) -> None:
    answer = httpx.Response(200, json={"user_id": "@bot:example.org"}, headers=date(NOON))
    async with ScriptedServer(answer).client() as client:
        assert client.server_time_ms() is None
        await client.whoami()
        assert client.server_time_ms() == NOON_MS
