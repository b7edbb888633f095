"""Scenario 3: rate limits, real (Synapse's defaults) and injected by the proxy, and
the checks that no request is sent again before its Retry-After.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from functools import partial

import trio

from faults.harness.figures import Figures, figures
from faults.harness.lab import FaultLab, admin_request, stage, user_path
from faults.harness.proxy import Exchange, Fault
from faults.harness.tasks import background
from faults.harness.traffic import audit
from matrix_api.testing.synapse import RegisteredUser, SynapseServer


async def exempt_from_rate_limits(hs: SynapseServer, admin: RegisteredUser, user_id: str) -> None:
    await admin_request(
        hs.base_url,
        admin,
        "POST",
        f"/_synapse/admin/v1/users/{user_path(user_id)}/override_ratelimit",
        {"messages_per_second": 0, "burst_count": 0},
    )


def early_retries(exchanges: Sequence[Exchange], *, tolerance: float = 0.01) -> list[str]:
    """Requests sent again before the Retry-After of the 429 their last try got."""
    found = []
    for index, limited in enumerate(exchanges):
        wait = limited.retry_after
        if limited.status != 429 or wait is None:
            continue
        retry = next(
            (
                e
                for e in exchanges[index + 1 :]
                if e.method == limited.method
                and e.path == limited.path
                and e.received > limited.received
            ),
            None,
        )
        if retry is not None and retry.received < limited.answered + wait - tolerance:
            found.append(
                f"{limited.method} {limited.path}: again after "
                f"{retry.received - limited.answered:.2f} s, asked to wait {wait:.2f} s"
            )
    return found


def requests_inside_retry_after(
    exchanges: Sequence[Exchange], path: str, *, tolerance: float = 0.01
) -> int:
    """Requests to ``path`` (a regex) sent while an earlier 429 there still said wait."""
    limits = [
        (e.answered, e.answered + e.retry_after)
        for e in exchanges
        if e.status == 429 and e.retry_after is not None and re.search(path, e.path)
    ]
    return sum(
        1
        for e in exchanges
        if re.search(path, e.path)
        and any(start < e.received < end - tolerance for start, end in limits)
    )


async def run_rate_limits(
    lab: FaultLab, strict: SynapseServer, *, messages: int, settle_s: float = 2.0
) -> Figures:
    """A burst over 3 rooms on Synapse's default ``rc_*`` limits; the bot is not exempt
    (its sender is, so the burst really is one). Every exchange goes through the proxy."""
    admin = await lab.user(strict, "admin", admin=True)
    owner = await lab.user(strict, "owner")
    await exempt_from_rate_limits(strict, admin, owner.user_id)
    async with lab.proxy(strict.base_url) as proxy:
        s = await stage(lab, strict, rooms=3, owner=owner, homeserver=proxy.url)
        bot = await lab.ready_bot(s)
        async with background(partial(s.traffic.collect, s.observer)):
            burst_started = time.time()
            await s.traffic.stream(s.sender, s.rooms, messages, None, label="burst")
            burst_s = time.time() - burst_started
            await s.traffic.wait_answered(timeout=60 + 6 * messages)
            await trio.sleep(settle_s)
        await bot.stop()  # before its proxy goes away
        exchanges = list(proxy.exchanges)
    timelines = await audit(s.observer, s.rooms)
    limited = [e for e in exchanges if e.status == 429]
    early = early_retries(exchanges)
    crowding = requests_inside_retry_after(exchanges, r"/send/")
    result = figures(
        "3 rate limits",
        s.traffic.sent,
        timelines,
        bot.user_id,
        fault_ends=[burst_started + burst_s],
        notes={
            "burst_s": round(burst_s, 1),
            "429s": len(limited),
            "early_retries": len(early),
            "sends_inside_retry_after": crowding,
        },
    )
    result.details.update(bot=bot, early=early, limited=limited, exchanges=exchanges)
    return result


async def run_long_rate_limit(
    lab: FaultLab, hs: SynapseServer, *, limited: int = 5, retry_after_s: int = 3
) -> Figures:
    """The bot's reply is refused with 429 (``Retry-After: retry_after_s``) ``limited``
    times in a row, more than the client's own attempts; it must still never be sent
    again before the Retry-After of the refusal before it."""
    async with lab.proxy(hs.base_url) as proxy:
        s = await stage(lab, hs, rooms=1, homeserver=proxy.url)
        bot = await lab.ready_bot(s)
        limit = proxy.arm(
            Fault(
                "limit",
                method="PUT",
                path=r"/send/m\.room\.message/",
                times=limited,
                retry_after_s=retry_after_s,
            )
        )
        async with background(partial(s.traffic.collect, s.observer)):
            await s.traffic.send(s.sender, s.rooms[0], "answer me, eventually")
            await s.traffic.wait_answered(timeout=60 + limited * retry_after_s)
            await trio.sleep(1.0)
        await bot.stop()  # before its proxy goes away
        exchanges = list(proxy.exchanges)
    timelines = await audit(s.observer, s.rooms)
    early = early_retries(exchanges)
    result = figures(
        "3 long rate limit",
        s.traffic.sent,
        timelines,
        bot.user_id,
        notes={"429s": limit.applied, "early_retries": len(early)},
    )
    result.details.update(bot=bot, early=early, exchanges=exchanges)
    return result
