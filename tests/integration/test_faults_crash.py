"""Scenarios 1 and 10: the bot killed (kill -9) or stopped and started again mid-stream.

Each message must be answered exactly once, whatever moment the bot dies at. The
moments are seeded (the seed is printed; ``FAULT_SEED`` replays another run).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fault_harness import CI, FaultLab, fault_lab, run_restarts
from matrix_api.testing.synapse import SynapseServer


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[FaultLab]:
    async with fault_lab(tmp_path) as lab:
        yield lab


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
