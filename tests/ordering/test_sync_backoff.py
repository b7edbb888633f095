"""The sync loop's backoff, inside which the client's own retries run (docs/retries.md).

The long-poll /sync answers 503 for a while: each failed /sync is first retried by the
client (5 attempts, waits up to 0.5, 1, 2, 4 s), then by the sync loop (waits up to 2,
4, ... 60 s). Both are the one `matrix_api.retry.Backoff`, equal jitter: every wait is
in the upper half of its range, never near zero. Virtual time, `autojump_clock`.
"""

from __future__ import annotations

from itertools import pairwise

import httpx
import pytest
import trio

from bot.chats import marker_content
from bot.config import Settings
from bot.runtime import SYNC_BACKOFF
from fake_homeserver import ALICE, FakeHomeserver, text_event
from matrix_api import RetryPolicy
from ordering_harness import Logs, chat, reply_to, running_bot, seed_store

ROOM = "!a:hs.test"
FAILED_SYNCS = 7  # waits up to 2, 4, 8, 16, 32, 60, 60 s: past the cap
CLIENT_ATTEMPTS = RetryPolicy().max_attempts
assert CLIENT_ATTEMPTS is not None


def within(wait: float, ceiling: float, *, rounding: float) -> bool:
    """``wait`` is in the upper half of ``[0, ceiling]`` (logged rounded to ``rounding``)."""
    return ceiling / 2 - rounding <= wait <= ceiling + rounding


async def test_a_failing_sync_is_retried_by_the_client_then_by_the_loop(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, logs: Logs, settings: Settings
) -> None:
    a = chat("c_a", ROOM)
    await seed_store(settings.store_path, chats=[a], token="s0")
    hs.add_room(ROOM, marker=marker_content(a))
    refused: list[float] = []

    async def handle(request: httpx.Request) -> httpx.Response:
        is_long_poll = request.url.path.endswith("/sync") and (
            "full_state" not in request.url.params
        )
        if is_long_poll and len(refused) < FAILED_SYNCS * CLIENT_ATTEMPTS:
            refused.append(trio.current_time())
            return httpx.Response(503, json={"errcode": "M_UNKNOWN", "error": "restarting"})
        return await hs.handle(request)

    hs.transport = lambda: httpx.MockTransport(handle)  # type: ignore[method-assign]
    async with running_bot(settings, hs):
        hs.queue_sync({ROOM: [text_event("$m", ALICE, "hello")]})
        await hs.wait_for(reply_to("$m"), ended=True)

    assert len(refused) == FAILED_SYNCS * CLIENT_ATTEMPTS
    client_waits = [e["delay_s"] for e in logs if e["event"] == "matrix_request_retry"]
    loop_waits = [e["retry_in_s"] for e in logs if e["event"] == "sync_retry_later"]
    assert [e["failures"] for e in logs if e["event"] == "sync_failed"] == list(
        range(1, FAILED_SYNCS + 1)
    )
    # The client: four retries per /sync, then it gives up and the loop backs off.
    assert len(client_waits) == FAILED_SYNCS * (CLIENT_ATTEMPTS - 1)
    for n, wait in enumerate(client_waits):
        assert within(wait, [0.5, 1.0, 2.0, 4.0][n % 4], rounding=0.0005), (n, wait)
    ceilings = [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    assert [SYNC_BACKOFF.ceiling(n) for n in range(FAILED_SYNCS)] == ceilings
    assert len(loop_waits) == FAILED_SYNCS
    for wait, ceiling in zip(loop_waits, ceilings, strict=True):
        assert within(wait, ceiling, rounding=0.005), (wait, ceiling)
    # What the server saw: the gaps between its answers are those waits (a 503 takes no
    # virtual time), the client's nested inside the loop's.
    expected: list[float] = []
    for n in range(FAILED_SYNCS):
        expected += client_waits[4 * n : 4 * n + 4]
        expected.append(loop_waits[n])
    gaps = [b - a for a, b in pairwise(refused)]
    assert gaps == pytest.approx(expected[:-1], abs=0.005)
