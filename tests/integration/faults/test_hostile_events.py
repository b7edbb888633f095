"""Events no well-behaved homeserver sends, delivered by the proxy in /sync answers.

Whatever one event holds, it is contained to that event: the bot stays up, and the
messages after it are answered.
"""

from __future__ import annotations

from faults.harness.lab import FaultLab
from faults.scenarios.hostile_events import run_poisoned_event
from matrix_api.testing.synapse import SynapseServer


async def test_a_lone_surrogate_escape_in_one_event_does_not_stall_the_bot(
    synapse: SynapseServer, lab: FaultLab
) -> None:
    result = await run_poisoned_event(lab, synapse)
    result.show()

    assert result.details["alive"]
    assert result.details["waited"] is not None, "messages after the bad one went unanswered"
    assert result.lost == 0
    assert result.duplicated == 0
    assert result.notes["skip_logs"] >= 1, "the undecodable event should be logged as skipped"
