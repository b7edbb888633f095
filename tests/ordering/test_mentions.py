"""Every message the bot sends carries ``m.mentions`` (issue 21): notices, replies, the
edits of a growing reply (and their ``m.new_content``), the parts of a long answer,
command answers, the greeting of an accepted invite, failure notices. It is empty,
so that a reply notifies no one by accident (a client without it matches the body
against each user's id and name), except where the bot means to notify: the
per-user limit's notice mentions that user.

The test walks one scripted run that takes each of those paths, then every event the
scripted homeserver received.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from bot.backends.base import BackendError
from bot.backends.context import Turn
from bot.backends.streaming import ReplyOverrides, ReplySink
from bot.chats import Chat, marker_content
from bot.messages import IncomingMessage
from bot.replies.history import FAILED_KEY
from fake_homeserver import ALICE, BASE_TS, BOB, FakeHomeserver, Sent, text_event
from ordering_harness import Logs, chat, make_settings, running_bot, seed_store, until_handled

HOME = "!home:hs.test"
INVITED = "!invited:hs.test"
# Answers that name users and rooms: no client may take them for mentions.
NAMES = f"{ALICE} and {BOB}, @room"


class ScriptedBackend:
    """Streams ``grow`` as a reply growing by edits, fails on ``fail``, answers ``long``
    with an answer that becomes several events, and echoes the rest with ``NAMES``."""

    name = "scripted"

    async def reply_streaming(
        self,
        chat: Chat,
        message: IncomingMessage,
        context: list[Turn],
        sink: ReplySink,
        *,
        overrides: ReplyOverrides | None = None,
    ) -> str:
        if message.body == "grow":
            await sink.partial(f"Hello {ALICE}")
            await trio.sleep(2)
            await sink.partial(f"Hello {ALICE}, this grows")
            await trio.sleep(2)
            return f"Hello {ALICE}, this grows into {NAMES}"
        if message.body == "fail":
            await sink.partial("half of it")
            raise BackendError("scripted failure", user_message=f"It failed, {ALICE}.")
        if message.body == "long":
            return f"{NAMES} " * 2_000  # about 80 KB: more than one event holds
        return f"{NAMES}: {message.body}"


def _alice(event_id: str, body: str, n: int) -> dict[str, Any]:
    # Ten seconds apart: the per-user bucket (burst 3) refills between Alice's messages.
    return text_event(event_id, ALICE, body, ts=BASE_TS + n * 10_000)


async def test_every_message_the_bot_sends_carries_m_mentions(
    autojump_clock: trio.abc.Clock, logs: Logs, tmp_path: Path
) -> None:
    settings = replace(make_settings(tmp_path), user_messages_burst=3, user_messages_per_s=1.0)
    hs = FakeHomeserver(logs)
    home = chat("c_home", HOME)
    await seed_store(settings.store_path, chats=[home], token="s0")
    hs.add_room(HOME, marker=marker_content(home))
    hs.add_invite(INVITED, ALICE)

    script = ["grow", "fail", "long", "plain", "!help", "!status", "!chats", "!settings"]
    script += ["!new Plans", "!rename Better", "!forget", "!nonsense"]
    alice = [_alice(f"$a{n}", body, n) for n, body in enumerate(script)]
    # Five at once from Bob: three answered, a notice that mentions him, one ignored.
    bob = [text_event(f"$b{n}", BOB, f"bob {n}", ts=BASE_TS) for n in range(5)]
    async with running_bot(settings, hs, backend=ScriptedBackend()) as bot:
        await hs.wait_for(lambda call: call.endpoint == "send" and "sb.greeting." in call.path)
        hs.queue_sync({HOME: bob})
        await until_handled(bot.store, *(event["event_id"] for event in bob))
        for event in alice:
            hs.queue_sync({HOME: [event]})
            await until_handled(bot.store, event["event_id"])

    messages = [sent for sent in hs.sent if sent.event_type == "m.room.message"]
    # The run took every path that sends: a greeting, a reply grown by edits, a failure
    # notice, an answer of several events, command answers, the per-user limit's notice.
    kinds = {_kind(sent) for sent in messages}
    assert kinds >= {"greeting", "reply", "edit", "part", "failure", "command", "rate_limit"}
    assert len([s for s in messages if s.txn_id.startswith("sb.command.")]) == 8
    assert len([s for s in messages if s.txn_id.startswith("sb.part")]) >= 2

    for sent in messages:
        assert "m.mentions" in sent.content, sent
        new_content = sent.content.get("m.new_content")
        if new_content is not None:
            assert new_content["m.mentions"] == {}, sent
        if _kind(sent) == "rate_limit":
            assert sent.content["m.mentions"] == {"user_ids": [BOB]}, sent
        else:
            assert sent.content["m.mentions"] == {}, sent
    assert sum(_kind(sent) == "rate_limit" for sent in messages) == 1


def _kind(sent: Sent) -> str:
    txn = sent.txn_id
    if txn.startswith("sb.greeting."):
        return "greeting"
    if txn.startswith("sb.rate_limit."):
        return "rate_limit"
    if txn.startswith("sb.command."):
        return "command"
    if txn.startswith("sb.part"):
        return "part"
    relates = sent.content.get("m.relates_to") or {}
    if relates.get("rel_type") == "m.replace":
        return "failure" if sent.content["m.new_content"].get(FAILED_KEY) else "edit"
    return "failure" if sent.content.get(FAILED_KEY) else "reply"
