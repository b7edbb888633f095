"""Scenario 3: a burst against Synapse's default rate limits, the bot not exempt.

The person writing is exempt (an admin override), so the burst really is one; the
bot runs behind the recording proxy, which sees every 429 with its Retry-After and
every request that follows it. A second test has the proxy refuse one reply more
often than the client itself retries, to see the dispatcher's retry honour it too.
"""

from __future__ import annotations

from faults.harness.figures import CI
from faults.harness.lab import FaultLab
from faults.scenarios.rate_limits import run_long_rate_limit, run_rate_limits
from matrix_api.testing.synapse import SynapseServer


async def test_a_burst_under_default_rate_limits_is_answered_once_honouring_retry_after(
    strict_synapse: SynapseServer, lab: FaultLab
) -> None:
    result = await run_rate_limits(
        lab, strict_synapse, messages=CI.burst_messages, settle_s=CI.settle_s
    )
    result.show()

    assert result.details["limited"], "the burst should have met the server's rate limit"
    assert result.lost == 0, f"lost: {result.details['lost_ids']}"
    assert result.duplicated == 0
    assert result.answered_once == result.sent == CI.burst_messages
    # No request is sent again before the Retry-After its 429 carried.
    assert result.details["early"] == []


async def test_a_rate_limit_outlasting_the_clients_attempts_is_still_honoured(
    synapse: SynapseServer, lab: FaultLab
) -> None:
    result = await run_long_rate_limit(lab, synapse, limited=5, retry_after_s=3)
    result.show()

    assert result.answered_once == result.sent == 1
    assert result.details["early"] == []
