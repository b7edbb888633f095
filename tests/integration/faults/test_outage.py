"""Scenario 2: the homeserver goes away for 10+ s mid-stream and comes back.

The bot must stay up, back off (bounded, jittered: counted from its own log lines,
one per failed request), resume, and answer everything exactly once. The outage
stops a Synapse of its own, so the session's shared server is never disturbed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from faults.harness.figures import CI
from faults.harness.lab import FaultLab
from faults.scenarios.outage import run_outage
from matrix_api.testing.synapse import SynapseServer


@pytest.fixture
def own_synapse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SynapseServer]:
    """A Synapse only this test stops and starts; stopped (by pid) afterwards."""
    server = SynapseServer(tmp_path_factory.mktemp("outage-synapse"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


async def test_an_outage_is_ridden_out_with_backoff_and_nothing_lost_or_repeated(
    own_synapse: SynapseServer, lab: FaultLab
) -> None:
    result = await run_outage(
        lab,
        own_synapse,
        messages=CI.outage_messages,
        rate=CI.outage_rate,
        outage_s=CI.outage_s,
        settle_s=CI.settle_s,
    )
    result.show()
    bot = result.details["bot"]

    assert bot.running, "the bot must stay up through the outage"
    assert len(bot.runs) == 1
    assert bot.events("fatal") == []
    assert result.details["down_s"] >= CI.outage_s
    # Backing off, not looping: a busy loop would make hundreds of requests a second.
    attempts = result.details["attempts"]
    assert attempts, "the bot should have tried (and failed) during the outage"
    assert len(attempts) / result.details["down_s"] < 4.0
    assert all(0 <= d <= 60 for d in result.details["sync_delays"])
    assert result.lost == 0, f"lost: {result.details['lost_ids']}"
    assert result.duplicated == 0
    assert result.answered_once == result.sent == CI.outage_messages
