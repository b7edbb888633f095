"""Scenarios 1 and 10: the bot killed (kill -9) or stopped (SIGTERM) at seeded random
moments mid-stream, and started again at once each time.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Literal

import trio

from faults.harness.figures import Figures, figures
from faults.harness.lab import FaultLab, stage
from faults.harness.tasks import background, together
from faults.harness.traffic import audit
from matrix_api.testing.synapse import SynapseServer


async def run_restarts(
    lab: FaultLab,
    hs: SynapseServer,
    *,
    scenario: str,
    how: Literal["kill", "term"],
    messages: int,
    rate: float,
    rooms: int = 4,
    faults: int = 3,
    settle_s: float = 2.0,
) -> Figures:
    """Stream ``messages`` over ``rooms``; stop the bot ``faults`` times at seeded random
    moments (kill -9, or SIGTERM) and start it again at once each time."""
    s = await stage(lab, hs, rooms=rooms)
    bot = await lab.ready_bot(s)
    duration = messages / rate
    # One seeded moment in each of ``faults`` equal slices of the stream's middle 90 %.
    slice_s = 0.9 * duration / faults
    moments = [
        (0.05 + i * 0.9 / faults) * duration + lab.rng.uniform(0, slice_s) for i in range(faults)
    ]
    print(f"{scenario}: {how} at {[round(m, 2) for m in moments]} s of {duration:.0f} s")
    fault_ends: list[float] = []
    exit_codes: list[int] = []
    async with background(partial(s.traffic.collect, s.observer)):
        started = trio.current_time()

        async def chaos() -> None:
            for moment in moments:
                await trio.sleep_until(started + moment)
                if how == "kill":
                    await bot.kill()
                else:
                    exit_codes.append(await bot.terminate())
                await bot.start()
                fault_ends.append(time.time())

        await together(chaos, partial(s.traffic.stream, s.sender, s.rooms, messages, rate))
        window = trio.current_time() - started
        await bot.wait_ready()
        await s.traffic.wait_answered(timeout=120 + messages)
        await trio.sleep(settle_s)
    timelines = await audit(s.observer, s.rooms)
    result = figures(
        scenario,
        s.traffic.sent,
        timelines,
        bot.user_id,
        fault_ends=fault_ends,
        notes={"seed": lab.seed, how: faults, "window_s": round(window, 1)},
    )
    result.details.update(exit_codes=exit_codes, window_s=window, bot=bot)
    return result
