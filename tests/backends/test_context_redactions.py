"""The conversation rebuilt from a room after a lost store, with deleted messages (issue 23).

Synapse serves a redacted message with an empty content and ``redacted_because``: neither
it nor the bot's answer to it is a turn, as live handling takes the exchange out when the
redaction comes. Each rebuilt turn names its message, so a redaction after the rebuild
takes it out of the store too.
"""

from __future__ import annotations

from typing import Any

import httpx

from bot.backends.context import Turn
from bot.replies.history import load_room_turns
from matrix_api import MatrixClient, RetryPolicy
from matrix_api.models import EventID, RoomEvent, UserID
from test_context import ALICE, BOT, CHAT, SETTINGS, _messages_handler, event, reply, turns


def redacted(original: RoomEvent, **content: Any) -> RoomEvent:
    """``original`` as the server serves it once redacted (what is left of its content)."""
    return RoomEvent(
        type=original.type,
        event_id=original.event_id,
        sender=original.sender,
        origin_server_ts=original.origin_server_ts,
        content=dict(content),
        unsigned={"redacted_because": {"type": "m.room.redaction", "sender": original.sender}},
    )


def test_a_redacted_message_and_its_answer_are_not_turns() -> None:
    kept = event(ALICE, "kept", event_id="$kept")
    gone = event(ALICE, "my password is hunter2", event_id="$gone")
    events = [kept, reply("ok", "$kept"), redacted(gone), reply("noted", "$gone")]

    assert turns(events) == [Turn("user", "kept"), Turn("assistant", "ok")]


def test_a_redaction_that_left_odd_content_still_removes_the_turn() -> None:
    # A server that keeps more than the spec says (a msgtype, even a body) still marks it.
    gone = event(ALICE, "secret", event_id="$gone")
    events = [redacted(gone, msgtype="m.text", body="secret"), reply("noted", "$gone")]

    assert turns(events) == []


async def test_rebuilt_turns_carry_their_message_ids_after_trimming() -> None:
    history = [
        e
        for i in range(6)
        for e in (
            event(ALICE, f"question {i}", event_id=f"$q{i}", ts=1000 + 2 * i),
            reply(f"answer {i}", f"$q{i}", ts=1001 + 2 * i),
        )
    ]
    history[4] = redacted(history[4])  # $q2
    handler = _messages_handler(list(reversed(history)), [], 100)
    async with MatrixClient(
        "https://hs.example.org",
        access_token="t",
        user_id=UserID(BOT),
        transport=httpx.MockTransport(handler),
        retry_policy=RetryPolicy(max_attempts=1),
    ) as client:
        # A budget for about two exchanges: the oldest are trimmed away.
        rebuilt, sources = await load_room_turns(
            client, CHAT, SETTINGS, budget_chars=40, stop_at=EventID("$q5")
        )

    assert [t.content for t in rebuilt] == ["question 3", "answer 3", "question 4", "answer 4"]
    assert sources == ["$q3", "$q3", "$q4", "$q4"]
