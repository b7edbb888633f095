"""Scenario 8: SIGTERM while replies are in flight (the proxy holds them)."""

from __future__ import annotations

import time
from functools import partial

import trio

from faults.harness.figures import Figures, figures
from faults.harness.lab import FaultLab, stage
from faults.harness.proxy import Fault
from faults.harness.store_view import read_store
from faults.harness.tasks import background
from faults.harness.traffic import audit
from matrix_api.testing.synapse import SynapseServer


async def run_graceful_stop(
    lab: FaultLab, hs: SynapseServer, *, messages: int, slow_s: float = 1.5, drain_s: float = 10.0
) -> Figures:
    """``messages`` queued over 4 rooms while every reply takes ``slow_s`` (the proxy
    holds the answers to the bot's sends); SIGTERM once several are in flight."""
    async with lab.proxy(hs.base_url) as proxy:
        s = await stage(lab, hs, rooms=4, homeserver=proxy.url)
        bot = await lab.ready_bot(s, drain_s=drain_s)
        slow = proxy.arm(
            Fault("slow", method="PUT", path=r"/send/m\.room\.message/", times=None, delay_s=slow_s)
        )
        async with background(partial(s.traffic.collect, s.observer)):
            await s.traffic.stream(s.sender, s.rooms, messages, None, label="in flight")
            # Each room has its own lane: one reply per room in flight.
            busy = len(s.rooms)
            await proxy.wait_until(lambda: proxy.in_flight("PUT", r"/send/") >= busy, timeout=30)
            # Every message has reached the bot (and so its inbox) before the signal.
            sent_ids = {x.event_id for x in s.traffic.sent}
            await proxy.wait_until(lambda: sent_ids <= proxy.delivered, timeout=30)
            await trio.sleep(0.5)
            in_flight = proxy.in_flight("PUT", r"/send/")
            stopping = trio.current_time()
            code = await bot.terminate(timeout=drain_s + 20)
            stop_s = trio.current_time() - stopping
            proxy.disarm(slow)
            view = read_store(bot.store_path)
            handled_after_stop = [
                r
                for r in bot.events("message_handled", run=1)
                if r["_t"] >= bot.events("stop_requested", run=1)[0]["_t"]
            ]
            restarted = time.time()
            await bot.start()
            await s.traffic.wait_answered(timeout=60 + messages)
            await trio.sleep(2.0)
        await bot.stop()  # before its proxy goes away
    timelines = await audit(s.observer, s.rooms)
    result = figures(
        "8 graceful stop",
        s.traffic.sent,
        timelines,
        bot.user_id,
        fault_ends=[restarted],
        notes={
            "in_flight": in_flight,
            "finished_draining": len(handled_after_stop),
            "left_in_inbox": len(view.inbox),
            "stop_s": round(stop_s, 1),
            "exit": code,
        },
    )
    result.details.update(
        bot=bot,
        code=code,
        stop_s=stop_s,
        view=view,
        drained=handled_after_stop,
        in_flight=in_flight,
    )
    return result
