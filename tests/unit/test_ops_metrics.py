"""`bot.ops.metrics`: endpoint templates hold no identifier, the client's observer hook
(`matrix_api.http.RequestObserver`) sees every attempt and every rate-limit wait, each
`BotMetrics` counts in its own registry, and what it exposes parses."""

from __future__ import annotations

import math
import random
from typing import Any, get_args

import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bot.backends import BackendError
from bot.ops.metrics import OUTCOMES, QUARANTINE_REASONS, BotMetrics, LiveValues, endpoint_template
from bot.store import Outcome
from matrix_api import MatrixAPIError, NetworkError, Request, RetryPolicy
from matrix_api.models import RoomID
from matrix_api.paths import CLIENT_V3, client_path
from matrix_mock import ScriptedServer, matrix_error, ok

ROOM = RoomID("!secret-room:example.org")


def samples(metrics: BotMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition, parsed back: (name, sorted labels) -> value."""
    text = generate_latest(metrics.registry).decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


def value(metrics: BotMetrics, name: str, **labels: str) -> float:
    return samples(metrics).get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.mark.parametrize(
    ("path", "template"),
    [
        (
            client_path(CLIENT_V3, "rooms", "!a:b", "send", "m.room.message", "txn1"),
            "/_matrix/client/v3/rooms/{}/send/{}/{}",
        ),
        (
            client_path(
                CLIENT_V3, "user", "@bot:example.org", "rooms", "!r:x", "account_data", "t"
            ),
            "/_matrix/client/v3/user/{}/rooms/{}/account_data/{}",
        ),
        (f"{CLIENT_V3}/sync", "/_matrix/client/v3/sync"),
        (f"{CLIENT_V3}/keys/query", "/_matrix/client/v3/keys/query"),
        (client_path(CLIENT_V3, "rooms", "!a:b", "state", "m.room.name", ""), None),
    ],
)
def test_a_template_keeps_the_api_words_and_hides_every_identifier(
    path: str, template: str | None
) -> None:
    shown = endpoint_template(path)
    if template is not None:
        assert shown == template
    assert "%21" not in shown
    assert "example.org" not in shown
    assert "!" not in shown


@given(st.lists(st.text(min_size=0, max_size=30), min_size=0, max_size=30))
def test_any_identifier_becomes_a_placeholder_and_templates_stay_bounded(parts: list[str]) -> None:
    path = client_path(CLIENT_V3, "rooms", *parts)
    shown = endpoint_template(path)
    segments = shown.split("/")[1:]
    # At most ten segments, each a known word or a placeholder: a bounded label set.
    assert len(segments) <= 10
    for segment, part in zip(segments[4:], parts, strict=False):
        assert segment in ("{}", part)


async def test_the_client_tells_its_observer_every_attempt_status_and_rate_limit_wait(
    autojump_clock: trio.abc.Clock,
) -> None:
    metrics = BotMetrics()
    server = ScriptedServer(
        matrix_error(429, "M_LIMIT_EXCEEDED", retry_after_ms=1500),
        httpx.ReadError("reset"),
        ok({"joined_rooms": [ROOM]}),
        matrix_error(403, "M_FORBIDDEN"),
    )
    policy = RetryPolicy(max_attempts=5, base_delay=0.5, rng=random.Random(7))
    async with server.client(retry_policy=policy) as client:
        client.observer = metrics
        started = trio.current_time()
        assert await client.joined_rooms() == [ROOM]
        waited = trio.current_time() - started
        with pytest.raises(MatrixAPIError):
            await client.leave_room(ROOM)

    joined = "/_matrix/client/v3/joined_rooms"
    assert (
        value(
            metrics, "surfaces_matrix_requests_total", method="GET", endpoint=joined, status="429"
        )
        == 1
    )
    assert (
        value(
            metrics, "surfaces_matrix_requests_total", method="GET", endpoint=joined, status="none"
        )
        == 1
    )
    assert (
        value(
            metrics, "surfaces_matrix_requests_total", method="GET", endpoint=joined, status="200"
        )
        == 1
    )
    leave = "/_matrix/client/v3/rooms/{}/leave"
    assert (
        value(
            metrics, "surfaces_matrix_requests_total", method="POST", endpoint=leave, status="403"
        )
        == 1
    )
    assert value(metrics, "surfaces_matrix_rate_limited_total") == 1
    # The 429's wait (1.5 s) is counted; the wait after the reset is not a rate limit.
    client_wait = value(metrics, "surfaces_matrix_rate_limit_wait_seconds_total", layer="client")
    assert client_wait == pytest.approx(1.5)
    assert waited > client_wait
    text = generate_latest(metrics.registry).decode()
    assert "secret-room" not in text
    assert "%21" not in text


class _Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []

    def answered(self, request: Request, status: int | None) -> None:
        self.seen.append(("answered", status))

    def retry_wait(self, request: Request, error: MatrixAPIError, delay_s: float) -> None:
        self.seen.append(("wait", type(error).__name__))


async def test_a_request_that_gets_no_answer_is_told_once_per_attempt(
    autojump_clock: trio.abc.Clock,
) -> None:
    recorder = _Recorder()
    server = ScriptedServer(httpx.ConnectError("refused"), httpx.ConnectError("refused"))
    policy = RetryPolicy(max_attempts=2, base_delay=0.5, rng=random.Random(7))
    async with server.client(retry_policy=policy) as client:
        client.observer = recorder
        with pytest.raises(NetworkError):
            await client.joined_rooms()
    assert recorder.seen == [("answered", None), ("wait", "NetworkError"), ("answered", None)]


def test_two_runtimes_count_apart() -> None:
    first, second = BotMetrics(), BotMetrics()
    first.took_in("message")
    first.finished("replied")
    assert value(first, "surfaces_messages_received_total", kind="message") == 1
    assert value(second, "surfaces_messages_received_total", kind="message") == 0
    assert value(second, "surfaces_messages_handled_total", outcome="replied") == 0


def test_every_outcome_and_reason_is_exposed_from_the_start_and_nothing_else_is_made() -> None:
    metrics = BotMetrics()
    found = samples(metrics)
    for outcome in ("replied", "notified", "ignored", "failed", "quarantined", "redacted"):
        assert found["surfaces_messages_handled_total", (("outcome", outcome),)] == 0
    # Every outcome the store records is one the metrics count.
    assert set(get_args(Outcome)) <= set(OUTCOMES)
    for reason in QUARANTINE_REASONS:
        assert found["surfaces_messages_quarantined_total", (("reason", reason),)] == 0
    metrics.finished("not-an-outcome")  # a value from outside the set makes no new series
    assert samples(metrics) == found
    info = [key for key in found if key[0] == "surfaces_build_info"]
    assert len(info) == 1
    assert ("version", "0.1.0") in info[0][1]


async def test_backend_calls_are_timed_and_failures_counted_by_kind(
    autojump_clock: trio.abc.Clock,
) -> None:
    metrics = BotMetrics()
    with metrics.backend_call("model"):
        await trio.sleep(2)
    with pytest.raises(BackendError), metrics.backend_call("model"):
        raise BackendError("down")
    with pytest.raises(trio.TooSlowError), metrics.backend_call("model"), trio.fail_after(5):
        await trio.sleep(10)
    with pytest.raises(ZeroDivisionError), metrics.backend_call("model"):
        _ = 1 / 0
    with trio.move_on_after(1), metrics.backend_call("model"):
        await trio.sleep(10)  # cancelled from outside: no error of the backend's

    assert value(metrics, "surfaces_backend_call_seconds_count", backend="model") == 5
    assert value(metrics, "surfaces_backend_call_seconds_sum", backend="model") == pytest.approx(8)
    for kind in ("error", "timeout", "crash"):
        assert value(metrics, "surfaces_backend_errors_total", backend="model", kind=kind) == 1
    assert value(metrics, "surfaces_backend_errors_total", backend="model", kind="cancelled") == 0


def test_latencies_use_the_server_clock_and_ignore_what_they_cannot_measure() -> None:
    metrics = BotMetrics()
    metrics.answer_sent("echo", 1_000_000, 1_002_500)
    metrics.answer_sent("echo", 1_000_000, None)  # the server's clock not known yet
    metrics.answer_sent("echo", 0, 1_000_000)  # no timestamp (an invite)
    metrics.answer_sent("echo", 2_000_000, 1_000_000)  # from the future: zero, not negative
    assert value(metrics, "surfaces_answer_latency_seconds_count", backend="echo") == 2
    assert value(metrics, "surfaces_answer_latency_seconds_sum", backend="echo") == 2.5
    metrics.lag(1_000_000, 1_000_300)
    assert value(metrics, "surfaces_sync_lag_seconds_sum") == pytest.approx(0.3)


def test_live_values_are_read_at_each_scrape() -> None:
    metrics = BotMetrics()
    depth = [3]

    def read() -> LiveValues:
        return LiveValues(
            phase="reconciling",
            ready=False,
            healthy=True,
            inbox_depth=depth[0],
            oldest_pending_age_s=None,
            chats=4,
            spaces=2,
            sync_last_ok_age_s=None,
            sync_failures_in_row=0,
            store_failing=False,
        )

    metrics.watch(read)
    assert value(metrics, "surfaces_inbox_depth") == 3
    depth[0] = 0
    found = samples(metrics)
    assert found["surfaces_inbox_depth", ()] == 0
    assert found["surfaces_chats_managed", ()] == 4
    assert found["surfaces_spaces_managed", ()] == 2
    assert found["surfaces_phase", (("phase", "reconciling"),)] == 1
    assert found["surfaces_phase", (("phase", "ready"),)] == 0
    assert math.isnan(found["surfaces_inbox_oldest_pending_age_seconds", ()])
