"""Scenario 7: the backend raises, refuses, hiccups or hangs.

An in-process bot with a backend that misbehaves by message: bounded retries (with
a timeout for a hang), then a clear notice to the user and the event recorded as
failed: never silently dropped, never retried forever, and the room keeps working.
"""

from __future__ import annotations

from bot.dispatch import MAX_ATTEMPTS
from bot.handler import FAILED_NOTICE
from faults.harness.lab import FaultLab
from faults.scenarios.backend import run_backend_failures
from matrix_api.testing.synapse import SynapseServer


async def test_a_raising_refusing_or_flaky_backend_gets_bounded_retries_and_a_notice(
    synapse: SynapseServer, lab: FaultLab
) -> None:
    result = await run_backend_failures(
        lab, synapse, kinds=("raise", "refuse", "flaky"), scenario="7 backend raises"
    )
    result.show()
    calls, outcomes, notices = (result.details[k] for k in ("calls", "outcomes", "notices"))

    # A crash of the backend is retried a bounded number of times, then quarantined.
    assert calls["raise please"] == MAX_ATTEMPTS
    assert outcomes["raise"] == "quarantined"
    assert notices["raise"] == [FAILED_NOTICE]
    # A refusal is the backend's own answer: shown as it is, once, recorded as failed.
    assert calls["refuse please"] == 1
    assert outcomes["refuse"] == "failed"
    assert notices["refuse"] == ["The assistant is unavailable."]
    # A hiccup is retried and then answered normally.
    assert calls["flaky please"] == 2
    assert outcomes["flaky"] == "replied"
    assert notices["flaky"] == ["echo: flaky please"]
    # The room still works, and nothing was answered twice.
    assert outcomes["after"] == "replied"
    assert result.lost == 0
    assert result.duplicated == 0


async def test_a_hanging_backend_is_timed_out_then_the_user_is_told(
    synapse: SynapseServer, lab: FaultLab
) -> None:
    result = await run_backend_failures(lab, synapse, kinds=("hang",), scenario="7 backend hangs")
    result.show()
    calls, outcomes, notices = (result.details[k] for k in ("calls", "outcomes", "notices"))

    assert 1 <= calls["hang please"] <= MAX_ATTEMPTS
    assert outcomes["hang"] == "failed"
    (notice,) = notices["hang"]
    assert notice not in ("", "echo: hang please")
    assert outcomes["after"] == "replied"
    assert result.lost == 0
    assert result.duplicated == 0
