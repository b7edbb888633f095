"""The backend's time limit: a reply that takes longer gets the timeout notice at the limit,
and a backend that declares itself instant is called without one."""

from __future__ import annotations

from dataclasses import replace

import pytest
import trio

from bot.chats import Chat, marker_content
from bot.config import Settings
from bot.handler import BACKEND_TIMEOUT_NOTICE
from bot.messages import IncomingMessage
from fake_homeserver import ALICE, FakeHomeserver, text_event
from ordering_harness import Logs, chat, log_events, running_bot, seed_store, until_handled

HOME = "!home:hs.test"


class SlowBackend:
    """Answers after ``seconds`` of (virtual) time."""

    name = "slow"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def reply(self, chat: Chat, message: IncomingMessage) -> str:
        await trio.sleep(self.seconds)
        return f"slow: {message.body}"


class SlowButSaysInstant(SlowBackend):
    instant = True


async def _answer_to_one_message(
    settings: Settings, hs: FakeHomeserver, backend: SlowBackend
) -> tuple[float, str | None, str | None]:
    """How long after the message the answer went out, its body, and the outcome."""
    home = chat("c_home", HOME)
    await seed_store(settings.store_path, chats=[home], token="s0")
    hs.add_room(HOME, marker=marker_content(home))
    async with running_bot(settings, hs, backend=backend) as bot:
        hs.queue_sync({HOME: [text_event("$m1", ALICE, "hi")]})
        asked = trio.current_time()
        # Waiting for the send, not polling the store: these waits are long in virtual time.
        await hs.wait_for(lambda call: call.endpoint == "send", ended=True)
        await until_handled(bot.store, "$m1")
        outcome = await bot.store.handled_outcome("$m1")
    (sent,) = hs.sent
    assert sent.reply_to == "$m1"
    return sent.at - asked, sent.body, outcome


@pytest.mark.parametrize(
    ("backend", "expected_s", "expected_body", "expected_outcome"),
    [
        (SlowBackend(600), 30, BACKEND_TIMEOUT_NOTICE, "failed"),
        (SlowBackend(20), 20, "slow: hi", "replied"),
        # `instant` is the backend's promise that it waits on nothing (echo); this one
        # breaks it on purpose, to show that no limit is applied.
        (SlowButSaysInstant(60), 60, "slow: hi", "replied"),
    ],
    ids=["slower-than-the-limit", "within-the-limit", "says-it-is-instant"],
)
async def test_the_backend_gets_backend_timeout_s_unless_it_says_it_is_instant(
    autojump_clock: trio.abc.Clock,
    hs: FakeHomeserver,
    logs: Logs,
    settings: Settings,
    backend: SlowBackend,
    expected_s: float,
    expected_body: str,
    expected_outcome: str,
) -> None:
    settings = replace(settings, backend_timeout_s=30.0)

    took, body, outcome = await _answer_to_one_message(settings, hs, backend)

    assert expected_s <= took < expected_s + 1
    assert (body, outcome) == (expected_body, expected_outcome)
    assert ("backend_timed_out" in log_events(logs)) == (expected_outcome == "failed")
