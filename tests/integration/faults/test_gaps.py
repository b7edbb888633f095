"""Scenario 4: more messages than a /sync timeline holds, while down and while busy.

While the bot is stopped, one room gets more messages than the long-poll's timeline
limit (so the restart's sync comes back ``limited`` and /messages must fill the gap);
while it runs, four people write back to back into four rooms, faster than it replies.
"""

from __future__ import annotations

from faults.harness.figures import CI
from faults.harness.lab import FaultLab
from faults.scenarios.gaps import run_gap_while_busy, run_gap_while_down
from matrix_api.testing.synapse import SynapseServer


async def test_a_gap_while_the_bot_is_down_is_filled_and_answered_once_in_order(
    synapse: SynapseServer, lab: FaultLab
) -> None:
    result = await run_gap_while_down(lab, synapse, messages=CI.gap_messages, settle_s=CI.settle_s)
    result.show()

    assert result.details["gap_filled"], "the restart's sync should have been limited"
    assert result.lost == 0, f"lost: {result.details['lost_ids']}"
    assert result.duplicated == 0
    assert result.answered_once == result.sent == CI.gap_messages
    assert result.details["order_violations"] == []


async def test_four_senders_back_to_back_are_answered_once_in_order(
    synapse: SynapseServer, lab: FaultLab
) -> None:
    result = await run_gap_while_busy(
        lab, synapse, per_sender=CI.busy_per_sender, settle_s=CI.settle_s
    )
    result.show()

    assert result.lost == 0, f"lost: {result.details['lost_ids']}"
    assert result.duplicated == 0
    assert result.answered_once == result.sent == 4 * CI.busy_per_sender
    assert result.details["order_violations"] == []
