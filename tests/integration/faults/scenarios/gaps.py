"""Scenario 4: more messages than a /sync timeline holds, while the bot is down and
while it is busy.
"""

from __future__ import annotations

import time
from functools import partial

import trio

from faults.harness.figures import Figures, figures
from faults.harness.lab import FaultLab, managed_rooms, stage
from faults.harness.tasks import background, together
from faults.harness.traffic import Traffic, audit
from matrix_api.testing.synapse import SynapseServer


async def run_gap_while_down(
    lab: FaultLab, hs: SynapseServer, *, messages: int, settle_s: float = 2.0
) -> Figures:
    """``messages`` in one room while the bot is stopped (more than a /sync timeline
    holds); after the restart all answered once, in order."""
    s = await stage(lab, hs, rooms=1)
    bot = await lab.ready_bot(s)
    assert await bot.terminate() == 0
    await s.traffic.stream(s.sender, s.rooms, messages, None, label="missed")
    async with background(partial(s.traffic.collect, s.observer)):
        restarted = time.time()
        await bot.start()
        await s.traffic.wait_answered(timeout=60 + messages)
        await trio.sleep(settle_s)
    timelines = await audit(s.observer, s.rooms)
    filled = bot.events("sync_gap_filled")
    result = figures(
        "4 gap (bot down)",
        s.traffic.sent,
        timelines,
        bot.user_id,
        fault_ends=[restarted],
        notes={"gap_filled_events": sum(r.get("events", 0) for r in filled)},
    )
    result.details.update(bot=bot, gap_filled=filled)
    return result


async def run_gap_while_busy(
    lab: FaultLab, hs: SynapseServer, *, per_sender: int, senders: int = 4, settle_s: float = 2.0
) -> Figures:
    """``senders`` people each writing ``per_sender`` messages back to back into their
    own room, all at once, faster than the bot replies."""
    bot_user = await lab.user(hs, "bot")
    owner = await lab.user(hs, "owner")
    people = [await lab.user(hs, f"sender{i}") for i in range(senders)]
    rooms = await managed_rooms(hs.base_url, [bot_user], owner, senders, members=people)
    bot = lab.bot(hs.base_url, bot_user.user_id, access_token=bot_user.access_token)
    await bot.start()
    await bot.wait_ready()
    traffic = Traffic([bot_user.user_id])
    clients = [lab.client(hs.base_url, p) for p in people]
    async with background(partial(traffic.collect, lab.client(hs.base_url, owner))):
        started = time.time()
        await together(
            *(
                partial(traffic.stream, client, [room], per_sender, None, label=f"from {i}")
                for i, (client, room) in enumerate(zip(clients, rooms, strict=True))
            )
        )
        sent_s = time.time() - started
        await traffic.wait_answered(timeout=60 + senders * per_sender)
        answered_s = time.time() - started
        await trio.sleep(settle_s)
    timelines = await audit(lab.client(hs.base_url, owner), rooms)
    result = figures(
        "4 gap (busy, 4 senders)",
        traffic.sent,
        timelines,
        bot.user_id,
        fault_ends=[started + sent_s],
        notes={
            "send_rate": round(len(traffic.sent) / sent_s, 1),
            "answer_rate": round(len(traffic.sent) / answered_s, 1),
            "gap_fills": len(bot.events("sync_gap_filled")),
        },
    )
    result.details.update(bot=bot)
    return result
