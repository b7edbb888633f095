"""Property: whatever the homeserver sends, the bot stays up, ends every event, and answers
the next ordinary message (issue 15, "fuzz the whole pipeline").

Hostile /sync answers (see fuzz_strategies.py) go through the real client, decoder, intake,
inbox, dispatcher and handler of a `BotRuntime` against the scripted homeserver; the checks
are in fuzz_harness.py. The normal suite runs a bounded, derandomized number of examples
(``SURFACES_FUZZ_EXAMPLES``, default 25: the same ones on every run, so CI is stable); the
long profile (``python bench/fuzz.py`` or ``nox -s fuzz``) runs thousands with fresh seeds.
Every failure this has found is kept in test_fuzz_regressions.py.
"""

from __future__ import annotations

import os

from fuzz_harness import check_scenario
from fuzz_strategies import Scenario, scenarios
from hypothesis import HealthCheck, Phase, given, settings

EXAMPLES = int(os.environ.get("SURFACES_FUZZ_EXAMPLES", "25"))
RANDOM = os.environ.get("SURFACES_FUZZ_RANDOM", "") == "1"
# Shrinking a failure re-runs the bot hundreds of times: minutes. The normal suite
# reports the failing example as found (and its blob to reproduce it); the long
# profile shrinks it to a minimal one.
SHRINK = os.environ.get("SURFACES_FUZZ_SHRINK", "1" if RANDOM else "0") == "1"

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not RANDOM,
    database=None,
    print_blob=True,
    phases=[Phase.explicit, Phase.generate, *([Phase.shrink] if SHRINK else [])],
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)


@FUZZ
@given(scenarios())
def test_hostile_sync_batches_never_stop_the_bot_and_the_next_message_is_answered(
    scenario: Scenario,
) -> None:
    check_scenario(scenario)
