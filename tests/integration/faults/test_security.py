"""Security checks under fire: loops between bots, strangers, hostile bodies.

* Two bots (two accounts, two processes) in one room never answer each other (the
  ``m.notice`` rule), each answers a person once, and neither serves a stranger.
* Hostile bodies and command arguments (a body as large as Synapse takes, control
  characters, bidi overrides, HTML and Markdown injection, a body that is not a
  string, a lone surrogate escape) never crash the bot, and no ``formatted_body``
  it sends carries a raw injected tag.
* Every test here (and every fault test: the ``lab`` fixture) ends by scanning all
  the bots' log lines for the access tokens and passwords it handed out (`fault_lab`).
"""

from __future__ import annotations

from faults.harness.lab import FaultLab
from faults.scenarios.security import html_problems, run_hostile_bodies, run_two_bots
from matrix_api.testing.synapse import SynapseServer


def test_the_html_check_sees_an_injection_and_passes_its_escaped_text() -> None:
    assert html_problems('<p>hi <img src=x onerror="alert(1)"></p>') == ["<img>", "img onerror="]
    assert html_problems('<a href=" JavaScript:alert(1)">x</a>') == ["a href=javascript:"]
    assert html_problems("<p>&lt;img src=x onerror=alert(1)&gt; <b>ok</b></p>") == []


async def test_two_bots_in_one_room_never_loop_and_ignore_a_stranger(
    synapse: SynapseServer, lab: FaultLab
) -> None:
    result = await run_two_bots(lab, synapse, messages=4)
    result.show()

    assert result.lost == 0
    assert result.duplicated == 0
    assert result.answered_once == result.sent == 4
    assert result.notes["bot_notices"] == 2 * result.sent
    assert result.notes["answers_to_bots"] == 0
    assert result.notes["answers_to_stranger"] == 0
    for process in result.details["processes"]:
        assert process.running
        assert process.events("message_ignored"), "the stranger's messages are logged as ignored"


async def test_hostile_bodies_never_crash_the_bot_nor_reach_its_html(
    synapse: SynapseServer, lab: FaultLab
) -> None:
    result = await run_hostile_bodies(lab, synapse)
    result.show()
    details = result.details

    assert details["alive"], f"the bot died:\n{details['bot'].tail()}"
    assert len(details["bot"].runs) == 1
    assert details["leaking"] == [], "a formatted_body carries raw injected HTML"
    assert details["answers_to_ignored"] == [], "a body that is not text was answered"
    assert result.lost == 0, f"lost: {result.details['lost_ids']}"
    assert result.duplicated == 0
    assert result.answered_once == result.sent
