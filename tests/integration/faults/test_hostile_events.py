"""Events no well-behaved homeserver sends, delivered by the proxy in /sync answers.

Whatever one event holds, it is contained to that event: the bot stays up (every start
reaches ``bot_ready``), the event is logged once as ``event_quarantined`` without its
content, and the messages after it are answered once each. The hostile contents: a
lone surrogate escape in the body; ``msgtype`` a list or an object; content nested
1,000 and 100,000 levels deep; each in a long-poll /sync and in the start-up sync.
"""

from __future__ import annotations

import json

import pytest

from faults.harness.lab import FaultLab
from faults.harness.proxy import carries_body, content_rewrite
from faults.scenarios.hostile_events import (
    DELIVERIES,
    HOSTILE_CONTENTS,
    Delivery,
    HostileContent,
    run_hostile_event,
    run_poisoned_event,
)
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


def test_the_content_rewrite_swaps_in_raw_bytes_only_for_the_marked_message() -> None:
    deep = b'{"x": ' * 5000 + b"1" + b"}" * 5000
    answer = {
        "next_batch": "s1",
        "rooms": {
            "join": {
                "!r:localhost": {
                    "timeline": {
                        "events": [
                            {"event_id": "$a", "content": {"body": "junk-1"}},
                            {"event_id": "$b", "content": {"body": "ordinary"}},
                        ]
                    }
                }
            }
        },
    }
    rewrite = content_rewrite("junk-1", deep)

    spoiled = rewrite(json.dumps(answer).encode())

    assert spoiled.count(deep) == 1
    assert b'"$a", "content": ' + deep in spoiled
    assert b'{"body": "ordinary"}' in spoiled
    assert rewrite(b'{"chunk": []}') == b'{"chunk": []}'  # nothing to spoil: as it was
    assert carries_body("junk-1")(answer)
    assert not carries_body("junk-2")(answer)


@pytest.mark.parametrize("delivery", DELIVERIES)
@pytest.mark.parametrize("content", HOSTILE_CONTENTS)
async def test_a_hostile_event_is_quarantined_and_the_bot_answers_what_follows(
    synapse: SynapseServer, lab: FaultLab, content: HostileContent, delivery: Delivery
) -> None:
    result = await run_hostile_event(lab, synapse, content=content, delivery=delivery)
    result.show()
    details = result.details
    bot = details["bot"]

    # The bot stayed up: every start reached bot_ready, none ended but by our SIGTERM.
    starts = 2 if delivery == "start_up" else 1
    assert details["alive"], f"the bot died:\n{bot.tail()}"
    assert len(bot.runs) == starts
    assert all(bot.events("bot_ready", run=n) for n in range(1, starts + 1))
    assert details["exit_codes"] == [0] * starts
    assert bot.events("fatal") == []
    assert result.notes["junk_delivered"] >= 1, "the proxy never delivered the junk"
    # The one event is quarantined: one line saying where and why, never what.
    lines = details["quarantined"]
    assert len(lines) == 1, f"event_quarantined lines for {details['junk']}: {lines}"
    line = lines[0]
    assert line["room_id"] == details["room"]
    assert line["sender"] == details["sender"]
    assert isinstance(line["reason"], str)
    assert line["reason"]
    assert details["canary"] not in json.dumps(line)
    assert len(json.dumps(line)) < 2000
    assert details["canary"] not in bot.text(), "a log line quotes the hostile content"
    # What came after it is answered, once each.
    assert result.lost == 0, f"lost: {details['lost_ids']}"
    assert result.duplicated == 0
    assert result.answered_once == result.sent == starts
