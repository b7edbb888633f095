"""Scenario 5: the bot's access token is invalidated while it runs, with and without
a password to log in again.
"""

from __future__ import annotations

import time
import uuid
from functools import partial

import trio

from faults.harness.figures import Figures, figures
from faults.harness.lab import FaultLab, admin_request, stage, user_path
from faults.harness.store_view import read_store
from faults.harness.tasks import background, together
from faults.harness.traffic import audit
from matrix_api.testing.synapse import SynapseServer

DEVICE_ID = "FAULTBOT"


async def run_lost_token_with_password(
    lab: FaultLab, hs: SynapseServer, *, messages: int, rate: float, settle_s: float = 2.0
) -> Figures:
    """The bot has a token, a password and a fixed device id. Mid-stream its token
    expires (``soft_logout``), later its device is deleted by an admin (a hard logout):
    each time it logs in again with the same device id and carries on."""
    admin = await lab.user(hs, "admin", admin=True)
    password = f"pw-{uuid.uuid4().hex}"
    bot_user = await lab.user(hs, "bot", password=password)
    s = await stage(lab, hs, rooms=2, bot_user=bot_user)
    duration = messages / rate
    # A token that expires a third of the way through the stream: soft_logout.
    response = await admin_request(
        hs.base_url,
        admin,
        "POST",
        f"/_synapse/admin/v1/users/{user_path(bot_user.user_id)}/login",
        {"valid_until_ms": int((time.time() + 4.0 + duration / 3) * 1000)},
    )
    expiring = response.json()["access_token"]
    lab.remember_secret(expiring)
    bot = lab.bot(
        s.homeserver,
        bot_user.user_id,
        access_token=expiring,
        password=password,
        device_id=DEVICE_ID,
    )
    await bot.start()
    await bot.wait_ready()
    renewed: list[float] = []
    async with background(partial(s.traffic.collect, s.observer)):
        started = trio.current_time()

        async def invalidate() -> None:
            await bot.wait_for("logged_in", timeout=duration + 30)
            renewed.append(time.time())
            await trio.sleep_until(started + 2 * duration / 3)
            await admin_request(
                hs.base_url,
                admin,
                "DELETE",
                f"/_synapse/admin/v2/users/{user_path(bot_user.user_id)}/devices/{DEVICE_ID}",
            )
            await bot.wait_for("logged_in", count=2, timeout=60)
            renewed.append(time.time())

        await together(invalidate, partial(s.traffic.stream, s.sender, s.rooms, messages, rate))
        await s.traffic.wait_answered(timeout=120)
        await trio.sleep(settle_s)
    timelines = await audit(s.observer, s.rooms)
    rejected = bot.events("token_invalidated")
    logins = bot.events("logged_in")
    result = figures(
        "5 lost token (password)",
        s.traffic.sent,
        timelines,
        bot.user_id,
        fault_ends=renewed,
        notes={
            "soft_logout": [r.get("soft_logout") for r in rejected],
            "relogins": len(logins),
            "devices": sorted({r.get("device_id") for r in logins}),
        },
    )
    result.details.update(bot=bot, rejected=rejected, logins=logins)
    return result


async def run_lost_token_without_password(
    lab: FaultLab, hs: SynapseServer, *, messages: int = 3
) -> Figures:
    """The bot has only an access token, which is logged out while it runs: it must
    exit non-zero with a clear message, its store intact; a restart with a new token
    then answers what came in meanwhile."""
    password = f"pw-{uuid.uuid4().hex}"
    bot_user = await lab.user(hs, "bot", password=password)
    s = await stage(lab, hs, rooms=1, bot_user=bot_user)
    session = lab.client(hs.base_url)
    login = await session.login_password(bot_user.user_id, password, device_id="ONLYTOKEN")
    lab.remember_secret(login.access_token)
    bot = lab.bot(s.homeserver, bot_user.user_id, access_token=login.access_token)
    await bot.start()
    await bot.wait_ready()
    async with background(partial(s.traffic.collect, s.observer)):
        await s.traffic.stream(s.sender, s.rooms, messages, None, label="before")
        await s.traffic.wait_answered(timeout=60)
        await session.logout()
        logged_out = time.time()
        after = await s.traffic.send(s.sender, s.rooms[0], "after the logout")
        code = await bot.wait_exit(timeout=90)
        exited_s = time.time() - logged_out
        view = read_store(bot.store_path)
        # An operator gives it a new token: nothing was lost.
        fresh = await session.login_password(bot_user.user_id, password, device_id="ONLYTOKEN")
        lab.remember_secret(fresh.access_token)
        bot.env["MATRIX_ACCESS_TOKEN"] = fresh.access_token
        restarted = time.time()
        await bot.start()
        await s.traffic.wait_answered([after], timeout=60)
        await trio.sleep(1.0)
    timelines = await audit(s.observer, s.rooms)
    fatal = bot.events("fatal", run=1)
    result = figures(
        "5 lost token (no password)",
        s.traffic.sent,
        timelines,
        bot.user_id,
        fault_ends=[restarted],
        notes={"exit_code": code, "exited_after_s": round(exited_s, 1)},
    )
    result.details.update(bot=bot, code=code, fatal=fatal, store=view, before=s.traffic.sent[:-1])
    return result
