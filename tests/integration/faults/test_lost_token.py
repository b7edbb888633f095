"""Scenario 5: the bot's access token is invalidated while it runs.

With a password (and a fixed device id) it logs in again on the same device and
carries on: first its token expires (``soft_logout``), later an admin deletes its
device (a hard logout). With only a token it stops with a clear message, exit code
non-zero, its store intact; given a new token it then answers what it missed.
"""

from __future__ import annotations

from faults.harness.figures import CI
from faults.harness.lab import FaultLab
from faults.scenarios.lost_token import (
    DEVICE_ID,
    run_lost_token_with_password,
    run_lost_token_without_password,
)
from matrix_api.testing.synapse import SynapseServer


async def test_with_a_password_the_bot_logs_in_again_on_its_device_and_carries_on(
    synapse: SynapseServer, lab: FaultLab
) -> None:
    result = await run_lost_token_with_password(
        lab, synapse, messages=CI.token_messages, rate=CI.token_rate, settle_s=CI.settle_s
    )
    result.show()
    bot = result.details["bot"]

    assert bot.running
    assert len(bot.runs) == 1
    rejected = result.details["rejected"]
    assert [r["soft_logout"] for r in rejected[:2]] == [True, False], rejected
    logins = result.details["logins"]
    assert len(logins) == 2
    assert {r["device_id"] for r in logins} == {DEVICE_ID}
    assert result.lost == 0, f"lost: {result.details['lost_ids']}"
    assert result.duplicated == 0
    assert result.answered_once == result.sent == CI.token_messages


async def test_with_only_a_token_the_bot_exits_non_zero_with_its_store_intact(
    synapse: SynapseServer, lab: FaultLab
) -> None:
    result = await run_lost_token_without_password(lab, synapse)
    result.show()

    assert result.details["code"] == 4
    (fatal,) = result.details["fatal"]
    assert "access token was invalidated" in fatal["error"]
    assert "MATRIX_PASSWORD" in fatal["error"]
    store = result.details["store"]
    assert store.integrity == "ok"
    assert store.sync_token is not None
    for before in result.details["before"]:
        assert store.handled.get(before.event_id) == "replied"
    # Restarted with a new token, it answered what came in meanwhile: nothing lost.
    assert result.lost == 0, f"lost: {result.details['lost_ids']}"
    assert result.duplicated == 0
    assert result.answered_once == result.sent
