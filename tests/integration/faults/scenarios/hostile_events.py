"""Events no well-behaved homeserver sends, injected by the proxy into the /sync
answers: each must be contained to itself, and the messages after it answered.

Synapse refuses such content from its own clients, but events reach a room over
federation from any server, and other homeservers validate less; so the proxy gives a
real message hostile content on its way to the bot (`content_rewrite`).
"""

from __future__ import annotations

import json
import uuid
from functools import partial
from typing import Literal

import trio

from faults.harness.figures import Figures, figures
from faults.harness.lab import FaultLab, stage
from faults.harness.proxy import Fault, carries_body, content_rewrite, lone_surrogate_rewrite
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


HostileContent = Literal["msgtype_list", "msgtype_object", "nested_1000", "nested_100000"]
HOSTILE_CONTENTS: tuple[HostileContent, ...] = (
    "msgtype_list",
    "msgtype_object",
    "nested_1000",
    "nested_100000",
)
Delivery = Literal["long_poll", "start_up"]
"""In a long-poll /sync of a running bot, or in the start-up sync after a restart."""
DELIVERIES: tuple[Delivery, ...] = ("long_poll", "start_up")


def hostile_content(kind: HostileContent, canary: str) -> bytes:
    """The raw JSON content of one hostile ``m.room.message``. It holds ``canary``,
    which no log line may show: a line that quotes the content would."""
    if kind == "msgtype_list":
        return json.dumps({"msgtype": ["m.text"], "body": canary}).encode()
    if kind == "msgtype_object":
        return json.dumps({"msgtype": {"m.text": canary}, "body": canary}).encode()
    depth = 1_000 if kind == "nested_1000" else 100_000
    # The content object is one level; the chain under "nested" is the others.
    chain = depth - 1
    top = json.dumps({"msgtype": "m.text", "body": canary}).encode()[:-1]
    return top + b', "nested": ' + b'{"a": ' * (chain - 1) + b"{}" + b"}" * chain


async def run_hostile_event(
    lab: FaultLab,
    hs: SynapseServer,
    *,
    content: HostileContent,
    delivery: Delivery,
    timeout_s: float = 30.0,
    settle_s: float = 1.5,
) -> Figures:
    """One message of the owner's reaches the bot with ``content`` (`hostile_content`)
    in place of its own, by ``delivery``; ordinary messages follow. The bot must stay
    up, quarantine that one event, and answer each ordinary message once.

    A bot that exits fails the run at once (with its last log lines); one that stays
    up but never answers fails it after ``timeout_s``.
    """
    canary = f"canary-{uuid.uuid4().hex[:12]}"
    marker = f"junk-{uuid.uuid4().hex[:12]}"
    async with lab.proxy(hs.base_url) as proxy:
        s = await stage(lab, hs, rooms=1, homeserver=proxy.url)
        room = s.rooms[0]
        junk_fault = proxy.arm(
            Fault(
                "rewrite",
                path=r"/sync$|/messages$",
                when=carries_body(marker),
                times=None,
                rewrite=content_rewrite(marker, hostile_content(content, canary)),
            )
        )
        bot = await lab.ready_bot(s)
        async with background(partial(s.traffic.collect, s.observer)):
            if delivery == "start_up":
                assert await bot.terminate() == 0
            junk = await s.traffic.send(s.sender, room, marker)
            if delivery == "long_poll":
                await proxy.wait_applied(junk_fault, timeout=timeout_s)
            after = [await s.traffic.send(s.sender, room, "after the junk")]
            if delivery == "start_up":
                await bot.start()
                await bot.wait_ready(timeout=timeout_s)
                after.append(await s.traffic.send(s.sender, room, "after the start"))
            await s.traffic.wait_answered(after, timeout=timeout_s, fail_if=bot.exited)
            await trio.sleep(settle_s)
            alive = bot.running
        await bot.stop()  # before its proxy goes away
    timelines = await audit(s.observer, s.rooms)
    ordinary = [x for x in s.traffic.sent if x.event_id in after]
    quarantined = [r for r in bot.events("event_quarantined") if r.get("event_id") == junk]
    result = figures(
        f"event {content}, {'poll' if delivery == 'long_poll' else 'start'}",
        ordinary,
        timelines,
        bot.user_id,
        notes={
            "junk_delivered": junk_fault.applied,
            "quarantine_logs": len(quarantined),
            "junk_answers": len(s.traffic.answers_to(junk)),
        },
    )
    result.details.update(
        bot=bot,
        alive=alive,
        exit_codes=[run.process.returncode for run in bot.runs],
        room=room,
        sender=s.owner.user_id,
        junk=junk,
        canary=canary,
        quarantined=quarantined,
    )
    return result
