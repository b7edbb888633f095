"""Showing a reply in a room: the growing notice, its edits, the final answer, failures.

Unit tests run on the mock clock against `FakeRoom` (an httpx MockTransport); the last
test runs the model backend against the fake OpenAI server into the same room, on the
real clock.
"""

from __future__ import annotations

from itertools import pairwise

import pytest
import trio
import trio.testing

from bot.backends.model import ModelBackend, ModelError, ModelSettings
from bot.chats import Chat
from bot.messages import IncomingMessage, reply_txn_id
from bot.replies.history import FAILED_KEY, STREAMING_KEY
from bot.replies.markdown import split_message
from bot.replies.reply_sink import (
    MAX_CONTENT_BYTES,
    TYPING_DELAY_S,
    MatrixReplySink,
    edit_content,
    message_content,
    open_reply_sink,
)
from fake_openai import API_KEY, FakeOpenAI, Script
from matrix_api.models import EventID
from matrix_fake import ROOM, SOURCE, FakeRoom


async def test_a_streamed_reply_grows_by_edits_and_ends_whole(
    autojump_clock: trio.testing.MockClock,
) -> None:
    room = FakeRoom()
    started: list[str] = []

    async def on_started(event_id: EventID) -> None:
        started.append(event_id)

    async with (
        room.client() as client,
        open_reply_sink(client, ROOM, SOURCE, edit_interval_s=1.0, on_started=on_started) as sink,
    ):
        await sink.typing(True)
        await sink.typing(True)  # already on: nothing more
        await sink.typing(False)  # answered at once: the room never sees typing
        text = ""
        for word in ["The", "answer", "is", "**forty-two**,", "as", "everyone", "knows."]:
            text += ("" if not text else " ") + word
            await sink.partial(text)
            await trio.sleep(0.4)
        ids = await sink.finish(text)

    assert room.typing == []
    first, *edits = room.sent
    assert first.txn_id == reply_txn_id(SOURCE)  # the handler's own reply id
    assert first.content["m.relates_to"] == {"m.in_reply_to": {"event_id": SOURCE}}
    assert first.content[STREAMING_KEY] is True
    assert started == [first.event_id]
    assert all(e.is_edit and e.content["m.relates_to"]["event_id"] == first.event_id for e in edits)
    assert all(e.shown[STREAMING_KEY] for e in edits[:-1])
    final = edits[-1]
    assert STREAMING_KEY not in final.shown
    assert final.shown["body"] == text
    assert final.shown["formatted_body"] == (
        "<p>The answer is <strong>forty-two</strong>, as everyone knows.</p>"
    )
    assert final.content["body"] == f"* {text}"
    assert ids == [first.event_id]
    assert room.final_text(first.event_id) == text
    gaps = [b.at - a.at for a, b in pairwise(room.sent)]
    assert all(gap >= 1.0 - 1e-9 for gap in gaps)  # one event per interval at most
    assert sink.partial_edits == len(room.sent) - 1  # the first partial was the reply


async def test_without_partials_the_answer_is_one_message(
    autojump_clock: trio.testing.MockClock,
) -> None:
    room = FakeRoom()
    async with (
        room.client() as client,
        open_reply_sink(client, ROOM, SOURCE, edit_interval_s=1.0) as sink,
    ):
        ids = await sink.finish("Just *one* message.")
    (only,) = room.sent
    assert ids == [only.event_id]
    assert not only.is_edit
    assert STREAMING_KEY not in only.content
    assert only.content["formatted_body"] == "<p>Just <em>one</em> message.</p>"


async def test_a_long_answer_continues_in_more_events(
    autojump_clock: trio.testing.MockClock,
) -> None:
    room = FakeRoom()
    answer = "\n\n".join(f"Paragraph {i}:" + " lorem ipsum" * 20 for i in range(30))
    async with (
        room.client() as client,
        open_reply_sink(client, ROOM, SOURCE, edit_interval_s=0.5, part_bytes=2000) as sink,
    ):
        await sink.partial(answer[:5000])
        await trio.sleep(1)
        ids = await sink.finish(answer)
    first = room.sent[0]
    assert len(first.content["body"].encode()) <= 2000  # a partial shows the first part only
    assert len(ids) > 3
    assert ids[0] == first.event_id
    extra = [s for s in room.sent if s.event_id in ids[1:]]
    assert [s.txn_id for s in extra] == [
        reply_txn_id(SOURCE, f"part{i}") for i in range(1, len(ids))
    ]
    texts = [room.final_text(event_id) for event_id in ids]
    assert "\n\n".join(texts) == answer


async def test_a_reply_in_a_thread_stays_there_through_edits_and_parts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    room = FakeRoom()
    root = EventID("$thread-root")
    answer = "\n\n".join(f"Paragraph {i}:" + " lorem ipsum" * 20 for i in range(30))
    async with (
        room.client() as client,
        open_reply_sink(
            client, ROOM, SOURCE, edit_interval_s=0.5, part_bytes=2000, thread=root
        ) as sink,
    ):
        await sink.partial(answer[:100])
        await trio.sleep(1)
        await sink.partial(answer[:3000])
        await trio.sleep(1)
        ids = await sink.finish(answer)

    in_thread = {
        "rel_type": "m.thread",
        "event_id": root,
        "is_falling_back": True,
        "m.in_reply_to": {"event_id": SOURCE},
    }
    first = room.sent[0]
    assert first.content["m.relates_to"] == in_thread
    edits = [s for s in room.sent if s.is_edit]
    assert edits
    # An event has one relation: an edit is an m.replace, and the server keeps the
    # original's thread (no m.thread in the edit or in its new content).
    for edit in edits:
        assert edit.content["m.relates_to"] == {"rel_type": "m.replace", "event_id": first.event_id}
        assert "m.relates_to" not in edit.content["m.new_content"]
    parts = [s for s in room.sent if s.event_id in ids[1:]]
    assert len(parts) == len(ids) - 1 >= 2
    assert all(part.content["m.relates_to"] == in_thread for part in parts)
    assert "\n\n".join(room.final_text(event_id) for event_id in ids) == answer


@pytest.mark.parametrize("max_parts", [1, 3, 16])
async def test_an_answer_of_thousands_of_events_is_cut_at_max_parts(
    autojump_clock: trio.testing.MockClock, max_parts: int
) -> None:
    room = FakeRoom()
    answer = "\n\n".join(f"Paragraph {i}: " + "lorem ipsum " * 150 for i in range(5_000))
    assert len(answer) > 4_000 * 2000  # uncut, thousands of events
    with trio.fail_after(60):
        async with (
            room.client() as client,
            open_reply_sink(
                client, ROOM, SOURCE, edit_interval_s=0.5, part_bytes=2000, max_parts=max_parts
            ) as sink,
        ):
            ids = await sink.finish(answer)
    assert len(ids) == max_parts
    assert len(room.sent) == max_parts
    texts = [room.final_text(event_id) for event_id in ids]
    assert all(len(text.encode()) <= 2000 for text in texts)
    note = f"[answer cut: longer than {max_parts} messages]"
    assert texts[-1].endswith(f"\n\n{note}")
    assert all(note not in text for text in texts[:-1])
    texts[-1] = texts[-1].removesuffix(f"\n\n{note}")
    assert answer.startswith(texts[0])
    assert all(text in answer for text in texts)


async def test_an_answer_of_exactly_max_parts_events_is_not_cut(
    autojump_clock: trio.testing.MockClock,
) -> None:
    room = FakeRoom()
    answer = "\n\n".join(f"Paragraph {i}: " + "lorem ipsum " * 150 for i in range(3))
    parts = split_message(answer, 2000)
    async with (
        room.client() as client,
        open_reply_sink(
            client, ROOM, SOURCE, edit_interval_s=0.5, part_bytes=2000, max_parts=len(parts)
        ) as sink,
    ):
        ids = await sink.finish(answer)
    assert [room.final_text(event_id) for event_id in ids] == parts


def test_max_parts_must_be_at_least_one() -> None:
    with pytest.raises(ValueError, match="max_parts"):
        MatrixReplySink(FakeRoom().client(), ROOM, SOURCE, max_parts=0)


async def test_a_failure_after_partial_text_keeps_it_and_says_why(
    autojump_clock: trio.testing.MockClock,
) -> None:
    room = FakeRoom()
    async with (
        room.client() as client,
        open_reply_sink(client, ROOM, SOURCE, edit_interval_s=1.0) as sink,
    ):
        await sink.partial("Half an")
        await trio.sleep(2)
        event_id = await sink.fail("The answer was cut off.", partial="Half an answer")
    assert event_id == room.sent[0].event_id
    final = room.sent[-1]
    assert final.shown["body"] == "Half an answer\n\n⚠️ The answer was cut off."
    assert final.shown[FAILED_KEY] is True
    assert STREAMING_KEY not in final.shown


async def test_a_failure_before_any_text_is_the_reply(
    autojump_clock: trio.testing.MockClock,
) -> None:
    room = FakeRoom()
    async with (
        room.client() as client,
        open_reply_sink(client, ROOM, SOURCE, edit_interval_s=1.0) as sink,
    ):
        await sink.fail("The assistant's server refused the bot's API key.")
    (only,) = room.sent
    assert only.txn_id == reply_txn_id(SOURCE)
    assert only.content["body"] == "The assistant's server refused the bot's API key."
    assert only.content[FAILED_KEY] is True


async def test_a_rerun_edits_the_reply_it_had_started(
    autojump_clock: trio.testing.MockClock,
) -> None:
    room = FakeRoom()
    async with (
        room.client() as client,
        open_reply_sink(
            client, ROOM, SOURCE, edit_interval_s=1.0, existing_event_id=EventID("$started")
        ) as sink,
    ):
        await sink.partial("again")
        await trio.sleep(2)
        await sink.finish("again, whole")
    assert all(s.is_edit and s.content["m.relates_to"]["event_id"] == "$started" for s in room.sent)
    assert room.sent[-1].shown["body"] == "again, whole"


async def test_a_rerun_after_a_crash_gets_the_same_reply_event(
    autojump_clock: trio.testing.MockClock,
) -> None:
    room = FakeRoom()
    async with room.client() as client:
        async with open_reply_sink(client, ROOM, SOURCE, edit_interval_s=1.0) as sink:
            await sink.partial("first run, cut short")
            await trio.sleep(0.5)
        # (the crash: the block was left without finish)
        async with open_reply_sink(client, ROOM, SOURCE, edit_interval_s=1.0) as sink:
            await sink.partial("second run")
            await trio.sleep(1.5)
            ids = await sink.finish("second run, whole answer")
    replies = [s for s in room.sent if not s.is_edit]
    assert len(replies) == 1  # never a second answer
    assert ids == [replies[0].event_id]
    assert room.final_text(replies[0].event_id) == "second run, whole answer"


async def test_a_failed_partial_edit_is_skipped(autojump_clock: trio.testing.MockClock) -> None:
    room = FakeRoom(fail_sends=1)
    async with (
        room.client() as client,
        open_reply_sink(client, ROOM, SOURCE, edit_interval_s=1.0) as sink,
    ):
        await sink.partial("lost preview")
        await trio.sleep(2)
        await sink.finish("the answer")
    (only,) = room.sent
    assert only.content["body"] == "the answer"


def test_an_edit_stays_within_the_event_size() -> None:
    body = "<" * 25_000  # HTML-escaped four times longer
    content = edit_content(EventID("$x"), f"```\n{body}\n```")
    import msgspec

    assert len(msgspec.json.encode(content)) <= MAX_CONTENT_BYTES
    assert content["m.new_content"]["body"] == f"```\n{body}\n```"


async def test_typing_shows_only_when_the_backend_waits_longer_than_the_delay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    room = FakeRoom()
    async with (
        room.client() as client,
        open_reply_sink(client, ROOM, SOURCE, edit_interval_s=1.0) as sink,
    ):
        await sink.typing(True)
        await trio.sleep(TYPING_DELAY_S - 0.1)
        assert room.typing == []
        await trio.sleep(0.2)
        assert room.typing == [True]
        await trio.sleep(5)
        assert room.typing == [True]  # once
        await sink.typing(False)
        assert room.typing == [True, False]
        # Waiting again later shows it again, after the delay again.
        await sink.typing(True)
        await trio.sleep(TYPING_DELAY_S / 2)
        await sink.typing(False)
        await trio.sleep(5)
        ids = await sink.finish("done")
    assert room.typing == [True, False]
    assert room.final_text(ids[0]) == "done"


async def test_model_to_room_end_to_end(openai: FakeOpenAI) -> None:
    """The model backend streams into the room; the final event holds the whole answer."""
    openai.then(Script(answer="Streaming *works*: " + "token " * 40, token_delay=0.005))
    room = FakeRoom()
    settings = ModelSettings.from_mapping(
        {"base_url": openai.base_url, "api_key": API_KEY, "model": "test-model"}
    )
    chat = Chat("c_1", ROOM, "@alice:example.org", "t", 0)
    message = IncomingMessage(SOURCE, "@alice:example.org", "go", 0)
    async with (
        ModelBackend(settings) as backend,
        room.client() as client,
        open_reply_sink(client, ROOM, SOURCE, edit_interval_s=0.05) as sink,
    ):
        answer = await backend.reply_streaming(chat, message, [], sink)
        ids = await sink.finish(answer)
    assert room.final_text(ids[0]) == answer
    assert room.typing == []  # the first token came well within TYPING_DELAY_S
    assert len(room.sent) >= 3  # the reply, some edits, the final edit
    assert sink.partial_edits + 1 == len(room.sent)  # the first partial is the reply


async def test_model_failure_mid_stream_ends_the_reply(openai: FakeOpenAI) -> None:
    openai.then(Script(answer="one two three four five six", disconnect_after=4, token_delay=0.02))
    room = FakeRoom()
    settings = ModelSettings.from_mapping(
        {"base_url": openai.base_url, "api_key": API_KEY, "model": "test-model"}
    )
    chat = Chat("c_1", ROOM, "@alice:example.org", "t", 0)
    message = IncomingMessage(SOURCE, "@alice:example.org", "go", 0)
    async with (
        ModelBackend(settings) as backend,
        room.client() as client,
        open_reply_sink(client, ROOM, SOURCE, edit_interval_s=0.01) as sink,
    ):
        try:
            await backend.reply_streaming(chat, message, [], sink)
        except ModelError as exc:
            event_id = await sink.fail(exc.user_message, exc.partial)
    assert room.final_text(event_id).startswith("one two three four\n\n⚠️ ")
    assert len([s for s in room.sent if not s.is_edit]) == 1


@pytest.mark.parametrize(
    "body",
    [
        "@alice:example.org, see **this**",
        # Past MAX_CONTENT_BYTES: the HTML and then the fallback are dropped, not m.mentions.
        "**@alice:example.org** " * 5_000,
    ],
)
def test_replies_and_edits_mention_no_one_whatever_their_size(body: str) -> None:
    reply = message_content(body, reply_to=EventID("$q"), streaming=True)
    assert reply["m.mentions"] == {}
    edit = edit_content(EventID("$r"), body)
    # The edit's own (those it newly mentions) and the replaced content's.
    assert edit["m.mentions"] == {}
    assert edit["m.new_content"]["m.mentions"] == {}
