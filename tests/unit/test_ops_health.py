"""`bot.ops.health`: what readiness and health are judged by, fact by fact."""

from __future__ import annotations

import trio

from bot.ops.health import SYNC_SLACK_S, OpsFacts, health, readiness
from bot.store import StoreUnavailable


def facts(phase: str = "ready") -> tuple[OpsFacts, list[str]]:
    current = [phase]
    made = OpsFacts(ready=trio.Event(), phase=lambda: current[0], long_poll_s=30.0)
    made.started_at = 0.0
    return made, current


def taking_messages(made: OpsFacts) -> None:
    made.ready.set()
    made.lanes_started = True
    made.sync_started = True
    made.taking_messages()


async def test_ready_needs_the_gate_the_lanes_the_sync_loop_and_the_ready_phase() -> None:
    made, phase = facts("reconciling")
    assert readiness(made).body == {
        "ready": False,
        "phase": "reconciling",
        "gate": False,
        "lanes_started": False,
        "sync_started": False,
        "uptime_s": readiness(made).body["uptime_s"],
    }
    made.ready.set()
    assert not readiness(made).ok  # the gate alone is not enough
    made.lanes_started = True
    assert not readiness(made).ok
    made.sync_started = True
    assert not readiness(made).ok  # still "reconciling"
    phase[0] = "ready"
    assert not readiness(made).ok  # the runtime has not said it takes messages
    made.taking_messages()
    assert readiness(made).ok
    phase[0] = "draining"
    verdict = readiness(made)
    assert not verdict.ok
    assert verdict.body["phase"] == "draining"


async def test_a_long_start_is_healthy_and_a_silent_sync_loop_is_not(
    autojump_clock: trio.abc.Clock,
) -> None:
    made, phase = facts("reconciling")
    await trio.sleep(3600)  # an hour of reconciliation: not ready, but alive
    assert health(made).ok
    phase[0] = "ready"
    taking_messages(made)
    bound = made.sync_stale_after_s
    assert bound == 2 * 30.0 + SYNC_SLACK_S
    await trio.sleep(bound - 1)
    assert health(made).ok  # no /sync has completed yet, but not for long
    await trio.sleep(2)
    verdict = health(made)
    assert not verdict.ok
    assert verdict.body["reason"] == "sync_stale"
    made.sync_failed("network")
    made.sync_failed("network")
    assert health(made).body["sync"]["failures_in_row"] == 2
    assert health(made).body["sync"]["last_error"] == "network"
    made.sync_ok()
    assert health(made).ok
    assert health(made).body["sync"]["failures_in_row"] == 0
    await trio.sleep(bound + 1)
    assert not health(made).ok
    phase[0] = "draining"  # the sync loop stops on purpose
    assert health(made).ok


async def test_the_last_store_write_decides_and_the_error_text_is_never_shown(
    autojump_clock: trio.abc.Clock,
) -> None:
    made, _ = facts()
    taking_messages(made)
    made.store_ok()
    await trio.sleep(1)
    made.store_failed(StoreUnavailable("/var/lib/bot/secret-path.sqlite3: disk full"))
    verdict = health(made)
    assert not verdict.ok
    assert verdict.body["reason"] == "store_unwritable"
    assert verdict.body["store"]["last_error"] == "StoreUnavailable"
    assert "secret-path" not in str(verdict.body)
    made.sync_ok()  # a /sync that completed does not say the store writes
    assert not health(made).ok
    await trio.sleep(1)
    made.store_ok()
    assert health(made).ok
    # Both at once (the same instant): the failure is the news.
    made.store_failed(OSError("full"))
    assert not health(made).ok


async def test_both_reasons_are_given_together(autojump_clock: trio.abc.Clock) -> None:
    made, _ = facts()
    taking_messages(made)
    made.store_failed(StoreUnavailable("x"))
    await trio.sleep(made.sync_stale_after_s + 1)
    assert health(made).body["reason"] == "store_unwritable, sync_stale"
