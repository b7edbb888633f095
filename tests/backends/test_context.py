"""Conversation context: the budget, and rebuilding turns from a room's history."""

from __future__ import annotations

import json
from typing import Any

import httpx
from hypothesis import given
from hypothesis import strategies as st

from bot.backends.context import (
    FAILED_KEY,
    STREAMING_KEY,
    Turn,
    context_chars,
    find_reply,
    latest_contents,
    load_room_context,
    trim_context,
    turns_from_history,
)
from matrix_api import MatrixClient, RetryPolicy
from matrix_api.models import EventID, RoomEvent, RoomID, UserID

BOT = "@bot:example.org"
ALICE = "@alice:example.org"
ROOM = RoomID("!room:example.org")

# -- trim_context -------------------------------------------------------------------------


def test_everything_fits() -> None:
    turns = [Turn("system", "sys"), Turn("user", "a"), Turn("assistant", "b"), Turn("user", "c")]
    assert trim_context(turns, 1000) == turns


def test_oldest_turns_go_first_system_and_newest_user_stay() -> None:
    turns = [
        Turn("system", "S" * 10),
        Turn("user", "u1" * 10),
        Turn("assistant", "a1" * 10),
        Turn("user", "u2" * 10),
        Turn("assistant", "a2" * 10),
        Turn("user", "now"),
    ]
    kept = trim_context(turns, 10 + 3 + 40)
    assert kept == [turns[0], turns[3], turns[4], turns[5]]


def test_a_kept_history_never_starts_with_the_assistant() -> None:
    turns = [Turn("user", "u" * 50), Turn("assistant", "a" * 10), Turn("user", "now")]
    assert trim_context(turns, 20) == [Turn("user", "now")]


def test_the_pinned_turns_stay_even_over_budget() -> None:
    turns = [Turn("system", "S" * 100), Turn("user", "old"), Turn("user", "U" * 100)]
    assert trim_context(turns, 10) == [turns[0], turns[2]]


def test_no_older_turn_is_taken_past_a_gap() -> None:
    turns = [Turn("user", "x"), Turn("assistant", "y" * 100), Turn("user", "now")]
    assert trim_context(turns, 10) == [Turn("user", "now")]


_turns = st.lists(
    st.builds(Turn, st.sampled_from(["user", "assistant"]), st.text(max_size=40)), max_size=30
)


@given(
    system=st.lists(st.builds(Turn, st.just("system"), st.text(max_size=20)), max_size=2),
    rest=_turns,
    budget=st.integers(min_value=0, max_value=400),
)
def test_trimming_properties(system: list[Turn], rest: list[Turn], budget: int) -> None:
    turns = system + rest
    kept = trim_context(turns, budget)
    assert kept[: len(system)] == system
    users = [i for i, turn in enumerate(rest) if turn.role == "user"]
    if users:
        newest = users[-1]
        assert kept[len(kept) - (len(rest) - newest) :] == rest[newest:]
        history = kept[len(system) : len(kept) - (len(rest) - newest)]
        # history is a contiguous run that ends right before the newest user turn
        assert history == rest[newest - len(history) : newest]
        assert not history or history[0].role == "user"
        pinned = system + rest[newest:]
        assert context_chars(kept) <= max(budget, context_chars(pinned))
    else:
        assert context_chars(kept) <= max(budget, context_chars(system))


# -- history -------------------------------------------------------------------------------

_counter = iter(range(1, 10_000))


def event(
    sender: str,
    body: str,
    *,
    msgtype: str = "m.text",
    event_id: str | None = None,
    extra: dict[str, Any] | None = None,
    ts: int | None = None,
    redacted: bool = False,
) -> RoomEvent:
    number = next(_counter)
    content: dict[str, Any] = {"msgtype": msgtype, "body": body}
    content.update(extra or {})
    return RoomEvent(
        type="m.room.message",
        event_id=EventID(event_id or f"$e{number}"),
        sender=UserID(sender),
        origin_server_ts=ts if ts is not None else number * 1000,
        content=content,
        unsigned={"redacted_because": {}} if redacted else {},
    )


def reply(body: str, to: str, **kw: Any) -> RoomEvent:
    extra = {"m.relates_to": {"m.in_reply_to": {"event_id": to}}}
    extra.update(kw.pop("extra", {}))
    return event(BOT, body, msgtype="m.notice", extra=extra, **kw)


def edit(sender: str, target: str, body: str, msgtype: str = "m.notice", **kw: Any) -> RoomEvent:
    new: dict[str, Any] = {"msgtype": msgtype, "body": body}
    new.update(kw.pop("new_extra", {}))
    extra = {"m.new_content": new, "m.relates_to": {"rel_type": "m.replace", "event_id": target}}
    return event(sender, f"* {body}", msgtype=msgtype, extra=extra, **kw)


def test_user_messages_and_bot_notices_become_turns() -> None:
    events = [
        event(ALICE, "Hi!", event_id="$q1"),
        reply("Hello, Alice.", "$q1"),
        event(
            ALICE,
            "> <@bot:example.org> Hello, Alice.\n\nHow are you?",
            extra={"m.relates_to": {"m.in_reply_to": {"event_id": "$x"}}},
        ),
        event(BOT, "a text from the bot is not an answer", msgtype="m.text"),
        event(ALICE, "an emote", msgtype="m.emote"),
        event(ALICE, "gone", redacted=True),
    ]
    assert turns_from_history(events, BOT) == [
        Turn("user", "Hi!"),
        Turn("assistant", "Hello, Alice."),
        Turn("user", "How are you?"),
    ]


def test_the_latest_edit_of_each_message_counts() -> None:
    events = [
        event(ALICE, "Waht is 2+2?", event_id="$q1"),
        reply("Let me", "$q1", event_id="$r1", extra={STREAMING_KEY: True}),
        edit(BOT, "$r1", "Let me think", new_extra={STREAMING_KEY: True}),
        edit(ALICE, "$q1", "What is 2+2?", msgtype="m.text"),
        edit(BOT, "$r1", "It is 4."),
        edit(ALICE, "$r1", "Alice cannot edit the bot's answer", ts=10**9),
    ]
    assert turns_from_history(events, BOT) == [
        Turn("user", "What is 2+2?"),
        Turn("assistant", "It is 4."),
    ]
    assert latest_contents(events)["$r1"]["body"] == "It is 4."


def test_edits_are_ordered_by_timestamp_not_position() -> None:
    events = [
        reply("v0", "$q", event_id="$r"),
        edit(BOT, "$r", "newest", ts=5_000_000),
        edit(BOT, "$r", "older", ts=4_000_000),
    ]
    assert turns_from_history(events, BOT) == [Turn("assistant", "newest")]


def test_unfinished_and_failed_replies_are_left_out() -> None:
    events = [
        event(ALICE, "one", event_id="$q1"),
        reply("half an ans", "$q1", extra={STREAMING_KEY: True}),
        event(ALICE, "two", event_id="$q2"),
        reply("The assistant is unavailable.", "$q2", extra={FAILED_KEY: True}),
        event(ALICE, "three", event_id="$q3"),
        reply("partial", "$q3", event_id="$r3", extra={STREAMING_KEY: True}),
        edit(BOT, "$r3", "partial…\n\n⚠️ cut off", new_extra={FAILED_KEY: True}),
    ]
    assert turns_from_history(events, BOT) == [
        Turn("user", "one"),
        Turn("user", "two"),
        Turn("user", "three"),
    ]


def test_commands_and_their_answers_are_not_conversation_and_forget_resets() -> None:
    events = [
        event(ALICE, "remember 42", event_id="$q1"),
        reply("OK, 42.", "$q1"),
        event(ALICE, "!forget", event_id="$c1"),
        reply("Forgotten.", "$c1"),
        event(ALICE, "!help", event_id="$c2"),
        reply("Commands: ...", "$c2"),
        event(ALICE, "what number?", event_id="$q2"),
        reply("Which number?", "$q2"),
        event(ALICE, "!forgetful is not forget", event_id="$c3"),
    ]
    assert turns_from_history(events, BOT) == [
        Turn("user", "what number?"),
        Turn("assistant", "Which number?"),
    ]
    assert turns_from_history(events, BOT, command_prefix="/")[0] == Turn("user", "remember 42")


def test_stop_at_leaves_out_the_message_being_answered() -> None:
    events = [
        event(ALICE, "first", event_id="$q1"),
        reply("ok", "$q1"),
        event(ALICE, "second", event_id="$q2"),
        reply("answer to second", "$q2"),
    ]
    assert turns_from_history(events, BOT, stop_at="$q2") == [
        Turn("user", "first"),
        Turn("assistant", "ok"),
    ]


def test_find_reply() -> None:
    events = [
        event(ALICE, "q", event_id="$q"),
        reply("partial", "$q", event_id="$r"),
        edit(BOT, "$r", "whole"),
    ]
    found = find_reply(events, BOT, "$q")
    assert found is not None
    assert found.event_id == "$r"
    assert find_reply(events, BOT, "$other") is None


async def test_load_room_context_pages_back_until_the_chat_began() -> None:
    history = [event(ALICE, "before the chat", ts=500)] + [
        e
        for i in range(6)
        for e in (
            event(ALICE, f"q{i}", event_id=f"$q{i}", ts=1000 + 2 * i),
            reply(f"a{i}", f"$q{i}", ts=1001 + 2 * i),
        )
    ]
    newest_first = list(reversed(history))
    pages: list[dict[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        params = dict(request.url.params)
        pages.append(params)
        assert params["dir"] == "b"
        assert json.loads(params["filter"]) == {"types": ["m.room.message"]}
        start = int(params.get("from", "0"))
        chunk = newest_first[start : start + 4]
        end = start + 4
        body: dict[str, Any] = {
            "start": str(start),
            "chunk": [
                {
                    "type": e.type,
                    "event_id": e.event_id,
                    "sender": e.sender,
                    "origin_server_ts": e.origin_server_ts,
                    "content": e.content,
                }
                for e in chunk
            ],
        }
        if end < len(newest_first):
            body["end"] = str(end)
        return httpx.Response(200, json=body)

    async with MatrixClient(
        "https://hs.example.org",
        access_token="t",
        user_id=UserID(BOT),
        transport=httpx.MockTransport(handler),
        retry_policy=RetryPolicy(max_attempts=1),
    ) as client:
        turns = await load_room_context(
            client, ROOM, BOT, budget_chars=1000, since_ts=1000, stop_at=EventID("$q5"), page_size=4
        )
    expected = [[Turn("user", f"q{i}"), Turn("assistant", f"a{i}")] for i in range(5)]
    assert turns == [turn for pair in expected for turn in pair]
    assert len(pages) == 4  # the fourth page reached the event from before the chat
    assert "from" not in pages[0]


async def test_load_room_context_stops_at_twice_the_budget() -> None:
    history = [event(ALICE, "x" * 100) for _ in range(50)]
    newest_first = list(reversed(history))
    requests = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal requests
        requests += 1
        start = int(dict(request.url.params).get("from", "0"))
        chunk = [
            {
                "type": e.type,
                "event_id": e.event_id,
                "sender": e.sender,
                "origin_server_ts": e.origin_server_ts,
                "content": e.content,
            }
            for e in newest_first[start : start + 5]
        ]
        return httpx.Response(
            200, json={"start": str(start), "end": str(start + 5), "chunk": chunk}
        )

    async with MatrixClient(
        "https://hs.example.org",
        access_token="t",
        user_id=UserID(BOT),
        transport=httpx.MockTransport(handler),
    ) as client:
        turns = await load_room_context(client, ROOM, BOT, budget_chars=1000, page_size=5)
    assert requests == 4  # 20 messages of 100 characters: twice the budget
    assert context_chars(turns) <= 1000
