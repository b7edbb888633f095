"""Scenarios 1 and 10: the bot killed (kill -9) or stopped and started again mid-stream.

Each message must be answered exactly once, whatever moment the bot dies at. The
moments are seeded (the seed is printed; ``FAULT_SEED`` replays another run). And a
kill in the middle of ``!new`` leaves one room, not two.
"""

from __future__ import annotations

import secrets

import trio

from faults.harness.figures import CI
from faults.harness.lab import FaultLab, stage
from faults.harness.proxy import Fault
from faults.harness.traffic import audit, replies_by_target
from faults.scenarios.restarts import run_restarts
from matrix_api import new_txn_id
from matrix_api.models import RoomEvent
from matrix_api.testing.synapse import SynapseServer


async def test_kill_9_at_three_random_moments_loses_and_repeats_nothing(
    synapse: SynapseServer, lab: FaultLab
) -> None:
    result = await run_restarts(
        lab,
        synapse,
        scenario="1 crash (kill -9)",
        how="kill",
        messages=CI.crash_messages,
        rate=CI.crash_rate,
        settle_s=CI.settle_s,
    )
    result.show()

    assert result.sent == CI.crash_messages
    assert result.lost == 0, f"lost: {result.details['lost_ids']}"
    assert result.duplicated == 0
    assert result.answered_once == result.sent
    assert result.details["order_violations"] == []
    assert len(result.details["bot"].runs) == 4


async def test_three_quick_restarts_within_two_minutes_lose_and_repeat_nothing(
    synapse: SynapseServer, lab: FaultLab
) -> None:
    result = await run_restarts(
        lab,
        synapse,
        scenario="10 quick restart",
        how="term",
        messages=CI.restart_messages,
        rate=CI.restart_rate,
        settle_s=CI.settle_s,
    )
    result.show()

    assert result.details["window_s"] < 120
    assert result.details["exit_codes"] == [0, 0, 0]
    assert result.lost == 0, f"lost: {result.details['lost_ids']}"
    assert result.duplicated == 0
    assert result.answered_once == result.sent == CI.restart_messages
    assert result.details["order_violations"] == []


async def test_kill_9_between_create_room_and_its_marker_makes_one_room(
    synapse: SynapseServer, lab: FaultLab
) -> None:
    """``createRoom`` has no transaction id: the re-run of ``!new`` after the crash
    must finish the room the first run made, not make a second one."""
    marker_write = r"/account_data/org\.surfaces_bot\.chat$"
    async with lab.proxy(synapse.base_url) as proxy:
        s = await stage(lab, synapse, rooms=1, homeserver=proxy.url)
        [room] = s.rooms
        bot = await lab.ready_bot(s)
        hold = proxy.arm(Fault("slow", method="PUT", path=marker_write, delay_s=120.0))
        command = await s.sender.send_event(
            room, "m.room.message", {"msgtype": "m.text", "body": "!new Plans"}, new_txn_id()
        )
        # The new room exists and its marker is on the way: die right there.
        await proxy.wait_until(lambda: proxy.in_flight("PUT", marker_write) >= 1, timeout=60)
        await bot.kill()
        proxy.disarm(hold)
        await bot.start()
        await bot.wait_ready()

        replies: list[RoomEvent] = []
        for _ in range(240):
            replies = replies_by_target(await audit(s.observer, [room]), bot.user_id).get(
                command, []
            )
            if replies:
                break
            await trio.sleep(0.25)
        await bot.stop()

    [reply] = replies
    invited = set((await s.observer.sync(timeout_ms=secrets.randbelow(9999) + 1)).rooms.invite)
    resumed = bot.events("chat_creation_resumed", run=2)
    created = [r["room_id"] for r in bot.events("chat_created")]
    assert [r["room_id"] for r in resumed] == created  # the one room, finished by run 2
    [new_room] = created
    assert new_room in reply.content["body"]
    assert len(invited) == 2  # the new room and the owner's Space: no second room
    assert new_room in invited
