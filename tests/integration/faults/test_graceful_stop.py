"""Scenario 8: SIGTERM while 20 messages are in flight.

The proxy holds each of the bot's replies for a while, so several are in flight
when SIGTERM comes: those finish within the drain deadline, the queued ones stay
in the inbox, and after a restart every message is answered exactly once.
"""

from __future__ import annotations

from faults.harness.figures import CI
from faults.harness.lab import FaultLab
from faults.scenarios.graceful_stop import run_graceful_stop
from matrix_api.testing.synapse import SynapseServer

DRAIN_S = 10.0


async def test_sigterm_finishes_what_is_in_flight_and_keeps_the_queue(
    synapse: SynapseServer, lab: FaultLab
) -> None:
    result = await run_graceful_stop(
        lab, synapse, messages=CI.graceful_messages, slow_s=1.5, drain_s=DRAIN_S
    )
    result.show()
    details = result.details
    view = details["view"]

    assert details["code"] == 0
    assert details["stop_s"] < DRAIN_S + 5
    # What was in hand was finished (answered and recorded), not abandoned ...
    assert len(details["drained"]) >= 1
    assert all(view.handled[r["event_id"]] == "replied" for r in details["drained"])
    # ... the rest waited in the inbox: every message is in one place or the other.
    assert view.inbox, "some messages should still have been queued"
    assert len(view.handled) + len(view.inbox) == CI.graceful_messages
    assert not set(view.handled) & set(view.inbox)
    assert view.integrity == "ok"
    assert result.lost == 0, f"lost: {result.details['lost_ids']}"
    assert result.duplicated == 0
    assert result.answered_once == result.sent == CI.graceful_messages
