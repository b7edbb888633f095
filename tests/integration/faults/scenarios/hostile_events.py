"""Events no well-behaved homeserver sends, injected by the proxy into the /sync
answers: each must be contained to itself, and the messages after it answered.
"""

from __future__ import annotations

import uuid
from functools import partial

from faults.harness.figures import Figures, figures
from faults.harness.lab import FaultLab, stage
from faults.harness.proxy import Fault, lone_surrogate_rewrite
from faults.harness.tasks import background
from faults.harness.traffic import audit
from matrix_api.testing.synapse import SynapseServer


async def run_poisoned_event(lab: FaultLab, hs: SynapseServer) -> Figures:
    """One message whose body carries a lone surrogate escape, in every answer that
    carries it (/sync and /messages), followed by ordinary ones in two rooms. The one
    event cannot be decoded; everything after it must still be answered."""
    marker = f"poison-{uuid.uuid4().hex[:8]}"
    async with lab.proxy(hs.base_url) as proxy:
        s = await stage(lab, hs, rooms=2, homeserver=proxy.url)
        proxy.arm(
            Fault(
                "rewrite",
                path=r"/sync$|/messages$",
                when=lambda doc: doc is not None,
                times=None,
                rewrite=lone_surrogate_rewrite(marker),
            )
        )
        bot = await lab.ready_bot(s)
        async with background(partial(s.traffic.collect, s.observer)):
            await s.traffic.send(s.sender, s.rooms[0], marker)
            after = [
                await s.traffic.send(s.sender, room, f"after the poison {i}")
                for i, room in enumerate(s.rooms)
            ]
            try:
                waited: float | None = await s.traffic.wait_answered(after, timeout=10)
            except AssertionError:
                waited = None
            alive = bot.running
        await bot.stop()  # before its proxy goes away
    timelines = await audit(s.observer, s.rooms)
    ordinary = [x for x in s.traffic.sent if x.event_id in after]
    result = figures(
        "sec: lone surrogate",
        ordinary,
        timelines,
        bot.user_id,
        notes={
            "sync_failed": len(bot.events("sync_failed")),
            "skip_logs": len(bot.events("sync_events_skipped")),
        },
    )
    result.details.update(bot=bot, waited=waited, alive=alive)
    return result
