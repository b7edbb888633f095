"""Scenario 6: the /sync answers that carry new messages are spoiled, once each kind
of `FAULT_KINDS` per round.
"""

from __future__ import annotations

from collections import Counter
from functools import partial

import trio

from faults.harness.figures import Figures, figures
from faults.harness.lab import FaultLab, stage
from faults.harness.proxy import FAULT_KINDS, Fault, carries_timeline
from faults.harness.tasks import background
from faults.harness.traffic import audit
from matrix_api.testing.synapse import SynapseServer


async def run_hostile_server(
    lab: FaultLab, hs: SynapseServer, *, rounds: int, settle_s: float = 2.0
) -> Figures:
    """Each round spoils, once each, the /sync answer that carries a new message:
    truncated JSON, wrong types, malformed events among good ones, a slow answer, a
    reset mid-answer, an HTML 502 page. Every message must still be answered once."""
    async with lab.proxy(hs.base_url) as proxy:
        s = await stage(lab, hs, rooms=2, homeserver=proxy.url)
        bot = await lab.ready_bot(s)
        applied: Counter[str] = Counter()
        async with background(partial(s.traffic.collect, s.observer)):
            for round_number in range(rounds):
                for index, kind in enumerate(FAULT_KINDS):
                    fault = proxy.arm(Fault(kind, when=carries_timeline, delay_s=4.0))
                    room = s.rooms[index % len(s.rooms)]
                    asked = await s.traffic.send(s.sender, room, f"round {round_number} {kind}")
                    await proxy.wait_applied(fault, timeout=60)
                    await s.traffic.wait_answered([asked], timeout=60)
                    applied[kind] += fault.applied
                    proxy.disarm(fault)
            await trio.sleep(settle_s)
            alive = bot.running
        await bot.stop()  # before its proxy goes away
    timelines = await audit(s.observer, s.rooms)
    skipped = bot.events("sync_events_skipped")
    failed = bot.events("sync_failed")
    retried = bot.events("matrix_request_retry")
    result = figures(
        "6 hostile server",
        s.traffic.sent,
        timelines,
        bot.user_id,
        notes={
            "spoiled": sum(applied.values()),
            "sync_failed": len(failed),
            "retried": len(retried),
            "skip_logs": len(skipped),
        },
    )
    result.details.update(
        bot=bot, alive=alive, skipped=skipped, failed=failed, retried=retried, applied=applied
    )
    return result
