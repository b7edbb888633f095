"""Scenario 6: a homeserver (or what stands in front of it) answering badly.

A fault-injecting proxy on 127.0.0.1 spoils the /sync answers that carry new
messages: truncated JSON, wrong types, malformed events among good ones, a slow
answer, a reset mid-answer, an HTML 502 page. The bot must survive, log what it
skipped, and lose nothing it could have handled.
"""

from __future__ import annotations

from faults.harness.figures import CI
from faults.harness.lab import FaultLab
from faults.harness.proxy import FAULT_KINDS
from faults.scenarios.hostile_server import run_hostile_server
from matrix_api.testing.synapse import SynapseServer


async def test_spoiled_sync_answers_lose_nothing_and_are_logged(
    synapse: SynapseServer, lab: FaultLab
) -> None:
    result = await run_hostile_server(lab, synapse, rounds=CI.hostile_rounds, settle_s=CI.settle_s)
    result.show()
    details = result.details

    assert dict(details["applied"]) == dict.fromkeys(FAULT_KINDS, CI.hostile_rounds)
    assert details["alive"], "the bot must survive"
    assert len(details["bot"].runs) == 1
    # What it could not use is logged, saying what and where.
    skipped = details["skipped"]
    assert skipped, "the malformed events and the malformed room should be logged"
    where = " ".join(" ".join(r["first"]) for r in skipped)
    assert "!fault-room:localhost" in where
    assert "timeline" in where
    errors = " ".join(r["error"] for r in details["failed"] + details["retried"])
    for symptom in (
        "200 answer is not what the endpoint promises",
        "HTTP 502",
        "no complete answer",
    ):
        assert symptom in errors
    assert result.lost == 0, f"lost: {result.details['lost_ids']}"
    assert result.duplicated == 0
    assert result.answered_once == result.sent == CI.hostile_rounds * len(FAULT_KINDS)
