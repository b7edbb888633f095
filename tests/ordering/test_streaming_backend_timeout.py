"""The backend's time limit for a streaming backend: the same deadline and the same
notice as for a plain one (`test_backend_timeout.py`), with the text already shown kept."""

from __future__ import annotations

from dataclasses import replace

import pytest
import trio

from bot.backends.context import Turn
from bot.backends.streaming import ReplyOverrides, ReplySink
from bot.chats import Chat, marker_content
from bot.config import Settings
from bot.handler import BACKEND_TIMEOUT_NOTICE
from bot.messages import IncomingMessage
from bot.replies.history import FAILED_KEY
from fake_homeserver import ALICE, FakeHomeserver, Sent, text_event
from ordering_harness import Logs, chat, log_events, running_bot, seed_store, until_handled

HOME = "!home:hs.test"


class SlowStreamingBackend:
    """Shows ``partial`` (when given) at once, then answers after ``seconds``."""

    name = "slow-streaming"

    def __init__(self, seconds: float, partial: str = "") -> None:
        self.seconds = seconds
        self.partial = partial

    async def reply_streaming(
        self,
        chat: Chat,
        message: IncomingMessage,
        context: list[Turn],
        sink: ReplySink,
        *,
        overrides: ReplyOverrides | None = None,
    ) -> str:
        if self.partial:
            await sink.partial(self.partial)
        await trio.sleep(self.seconds)
        return f"{self.partial}slow: {message.body}"


async def _answer_to_one_message(
    settings: Settings, hs: FakeHomeserver, backend: SlowStreamingBackend
) -> tuple[float, list[Sent], str | None]:
    """How long after the message the last event went out, the events, and the outcome."""
    home = chat("c_home", HOME)
    await seed_store(settings.store_path, chats=[home], token="s0")
    hs.add_room(HOME, marker=marker_content(home))
    async with running_bot(settings, hs, backend=backend) as bot:
        hs.queue_sync({HOME: [text_event("$m1", ALICE, "hi")]})
        asked = trio.current_time()
        await until_handled(bot.store, "$m1")
        outcome = await bot.store.handled_outcome("$m1")
    sent = hs.sent_in(HOME)
    assert sent, "nothing was sent"
    return sent[-1].at - asked, sent, outcome


def _shown(event: Sent) -> dict[str, object]:
    """What clients show for ``event``: an edit's new content, else the event's own."""
    new_content = event.content.get("m.new_content")
    return new_content if isinstance(new_content, dict) else event.content


async def test_a_silent_streaming_backend_gets_the_timeout_notice_at_the_limit(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, logs: Logs, settings: Settings
) -> None:
    settings = replace(settings, backend_timeout_s=30.0)

    took, sent, outcome = await _answer_to_one_message(settings, hs, SlowStreamingBackend(600))

    assert 30 <= took < 31
    (reply,) = sent
    assert reply.reply_to == "$m1"
    assert (reply.body, outcome) == (BACKEND_TIMEOUT_NOTICE, "failed")
    # Not an answer: a conversation rebuilt from the room leaves it out.
    assert reply.content.get(FAILED_KEY) is True
    events = log_events(logs)
    assert "backend_timed_out" in events
    assert "backend_failed" not in events


async def test_a_streaming_backend_past_the_limit_keeps_its_text_and_adds_the_notice(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, logs: Logs, settings: Settings
) -> None:
    settings = replace(settings, backend_timeout_s=30.0)
    backend = SlowStreamingBackend(600, partial="Half an answer ")

    took, sent, outcome = await _answer_to_one_message(settings, hs, backend)

    assert 30 <= took < 31
    first, *edits = sent
    assert first.reply_to == "$m1"
    assert first.body == "Half an answer "  # the partial text, as given
    assert edits, "the reply was not ended by an edit"
    final = _shown(edits[-1])
    assert final["body"] == f"Half an answer\n\n⚠️ {BACKEND_TIMEOUT_NOTICE}"
    assert final.get(FAILED_KEY) is True
    assert outcome == "failed"
    assert "backend_timed_out" in log_events(logs)


@pytest.mark.parametrize("seconds", [0, 29])
async def test_a_streaming_backend_within_the_limit_answers(
    autojump_clock: trio.abc.Clock,
    hs: FakeHomeserver,
    logs: Logs,
    settings: Settings,
    seconds: float,
) -> None:
    settings = replace(settings, backend_timeout_s=30.0)

    took, sent, outcome = await _answer_to_one_message(settings, hs, SlowStreamingBackend(seconds))

    assert seconds <= took < seconds + 2
    assert _shown(sent[-1])["body"] == "slow: hi"
    assert outcome == "replied"
    assert "backend_timed_out" not in log_events(logs)
