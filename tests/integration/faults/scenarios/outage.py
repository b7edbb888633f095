"""Scenario 2: the homeserver stops mid-stream and comes back; the bot rides it out."""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import trio

from faults.harness.bot_process import BotProcess
from faults.harness.figures import Figures, figures
from faults.harness.lab import FaultLab, stage
from faults.harness.tasks import background, together
from faults.harness.traffic import audit
from matrix_api.testing.synapse import SynapseServer


def _failed_attempts(bot: BotProcess, start: float, end: float) -> list[dict[str, Any]]:
    """Log records that stand for one failed request each, between two wall times."""
    names = {"matrix_request_retry", "sync_failed", "job_retry_later", "read_receipt_failed"}
    return [r for r in bot.records() if r.get("event") in names and start <= r["_t"] <= end]


async def run_outage(
    lab: FaultLab,
    hs: SynapseServer,
    *,
    messages: int,
    rate: float,
    outage_s: float,
    settle_s: float = 2.0,
) -> Figures:
    """Stop Synapse for ``outage_s`` (or more) mid-stream; the bot must ride it out."""
    s = await stage(lab, hs, rooms=2)
    bot = await lab.ready_bot(s)
    base_url = hs.base_url
    window: dict[str, float] = {}
    async with background(partial(s.traffic.collect, s.observer)):
        started = trio.current_time()

        async def outage() -> None:
            await trio.sleep_until(started + 0.3 * messages / rate)
            window["down"] = time.time()
            await trio.to_thread.run_sync(hs.stop)
            await trio.sleep(max(0.0, outage_s - (time.time() - window["down"])))
            window["starting"] = time.time()
            await trio.to_thread.run_sync(hs.start)
            window["up"] = time.time()
            assert bot.running, f"the bot died during the outage:\n{bot.tail()}"

        await together(outage, partial(s.traffic.stream, s.sender, s.rooms, messages, rate))
        assert hs.base_url == base_url, "Synapse came back on another port"
        await s.traffic.wait_answered(timeout=180)
        await trio.sleep(settle_s)
    timelines = await audit(s.observer, s.rooms)
    attempts = _failed_attempts(bot, window["down"], window["starting"])
    down_s = window["starting"] - window["down"]
    # The sync loop's backoff, from the line that says how long it waits (``sync_failed``
    # itself, or the ``sync_retry_later`` after it).
    sync_delays = [
        r["retry_in_s"]
        for r in bot.records()
        if r.get("event") in ("sync_failed", "sync_retry_later")
        and "retry_in_s" in r
        and window["down"] <= r["_t"] <= window["up"]
    ]
    result = figures(
        "2 outage",
        s.traffic.sent,
        timelines,
        bot.user_id,
        fault_ends=[window["up"]],
        notes={
            "down_s": round(window["up"] - window["down"], 1),
            "failed_requests": len(attempts),
            "per_s": round(len(attempts) / down_s, 2),
            "max_sync_backoff_s": max(sync_delays, default=0),
        },
    )
    result.details.update(bot=bot, attempts=attempts, down_s=down_s, sync_delays=sync_delays)
    return result
