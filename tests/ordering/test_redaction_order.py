"""Deletions (issue 23): a message its sender redacts is not answered if the bot has not
answered it yet, and leaves the conversation if it has, whenever the redaction comes: in
the message's own batch, while the message waits behind another in its room's lane, or
while the bot is down (the catch-up batch). With ``redact_answers`` the bot's answer goes
too, once, whatever restarts. Junk redactions cost nothing but a log line per batch."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import trio

from bot.backends.context import Turn
from bot.backends.streaming import ReplyOverrides, ReplySink
from bot.chats import Chat, marker_content
from bot.config import Settings
from bot.messages import IncomingMessage
from fake_homeserver import (
    ALICE,
    BASE_TS,
    BOT,
    Answer,
    Call,
    FakeHomeserver,
    notice_event,
    text_event,
)
from ordering_harness import Logs, chat, running_bot, seed_store, until_handled

HOME = "!home:hs.test"


def redaction_event(
    event_id: str, sender: str, target: Any, *, ts: int = BASE_TS, top_level: bool = False
) -> dict[str, Any]:
    """An m.room.redaction as /sync delivers it: ``redacts`` in the content (room version
    11), or at the top level (older versions) with ``top_level``."""
    event: dict[str, Any] = {
        "type": "m.room.redaction",
        "event_id": event_id,
        "sender": sender,
        "origin_server_ts": ts,
        "content": {"reason": "oops, my password"},
        "unsigned": {"age": 10},
    }
    if top_level:
        event["redacts"] = target
    else:
        event["content"]["redacts"] = target
    return event


class RedactingHomeserver(FakeHomeserver):
    """`FakeHomeserver` that also takes redactions (``redact``), de-duplicated by
    transaction id like sends."""

    def __init__(self, logs: list[Any]) -> None:
        super().__init__(logs)
        self.redactions: list[tuple[str, str, str]] = []
        """(room id, redacted event id, transaction id) of each redaction made."""

    def _route(self, call: Call, segments: list[str]) -> Any:
        match segments[4:]:
            case ["rooms", room_id, "redact", event_id, txn_id] if call.method == "PUT":
                call.endpoint, call.room_id = "redact", room_id
                return lambda: self._redact(room_id, event_id, txn_id)
        return super()._route(call, segments)

    async def _redact(self, room_id: str, event_id: str, txn_id: str) -> Answer:
        key = (room_id, "m.room.redaction", txn_id)
        if key not in self._txns:
            self._txns[key] = f"$redaction{len(self.redactions)}"
            self.redactions.append((room_id, event_id, txn_id))
        return 200, {"event_id": self._txns[key]}


@pytest.fixture
def hs(logs: Logs) -> Iterator[RedactingHomeserver]:
    server = RedactingHomeserver(logs)
    yield server
    assert server.unexpected == [], "requests the fake homeserver does not know"
    assert server.provisioning_calls() == []


class RecordingBackend:
    """A streaming backend that answers "re: <body>" after ``seconds`` and records the
    context of each request (what the model would be sent)."""

    name = "recording"

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds
        self.contexts: list[tuple[str, list[tuple[str, str]]]] = []

    async def reply_streaming(
        self,
        chat: Chat,
        message: IncomingMessage,
        context: list[Turn],
        sink: ReplySink,
        *,
        overrides: ReplyOverrides | None = None,
    ) -> str:
        self.contexts.append((message.body, [(t.role, t.content) for t in context]))
        await trio.sleep(self.seconds)
        return f"re: {message.body}"


def answered(hs: FakeHomeserver) -> list[str | None]:
    return [sent.reply_to for sent in hs.sent_in(HOME)]


async def seeded(settings: Settings, hs: FakeHomeserver, *, inbox: Any = ()) -> Chat:
    home = chat("c_home", HOME)
    await seed_store(settings.store_path, chats=[home], token="s0", inbox=inbox)
    hs.add_room(HOME, marker=marker_content(home))
    return home


async def test_a_message_redacted_in_its_own_batch_is_not_answered(
    autojump_clock: trio.abc.Clock, hs: RedactingHomeserver, logs: Logs, settings: Settings
) -> None:
    await seeded(settings, hs)
    async with running_bot(settings, hs) as bot:
        hs.queue_sync(
            {
                HOME: [
                    text_event("$m1", ALICE, "my password is hunter2"),
                    redaction_event("$r1", ALICE, "$m1"),
                    text_event("$m2", ALICE, "hello"),
                ]
            }
        )
        await until_handled(bot.store, "$m2", "$r1")
        assert await bot.store.handled_outcome("$m1") == "redacted"

    assert answered(hs) == ["$m2"]
    assert hs.redactions == []


async def test_a_top_level_redacts_is_honoured_and_junk_there_costs_nothing(
    autojump_clock: trio.abc.Clock, hs: RedactingHomeserver, logs: Logs, settings: Settings
) -> None:
    """Room versions 1-10 put the target at the top level (a server that does not also
    copy it into the content, as Synapse does): read there too; junk there is one
    unreadable redaction, never the loss of the batch."""
    await seeded(settings, hs)
    async with running_bot(settings, hs) as bot:
        hs.queue_sync(
            {
                HOME: [
                    text_event("$m1", ALICE, "my password is hunter2"),
                    redaction_event("$r1", ALICE, "$m1", top_level=True),
                    redaction_event("$r2", ALICE, {"not": "an id"}, top_level=True),
                    text_event("$m2", ALICE, "hello"),
                ]
            }
        )
        await until_handled(bot.store, "$m2", "$r1")
        assert await bot.store.handled_outcome("$m1") == "redacted"

    assert answered(hs) == ["$m2"]
    unreadable = [entry for entry in logs if entry["event"] == "redactions_unreadable"]
    assert [entry["count"] for entry in unreadable] == [1]


async def test_a_message_redacted_while_waiting_in_its_lane_is_not_answered(
    autojump_clock: trio.abc.Clock, hs: RedactingHomeserver, logs: Logs, settings: Settings
) -> None:
    await seeded(settings, hs)
    backend = RecordingBackend(seconds=20)
    async with running_bot(settings, hs, backend=backend) as bot:
        hs.queue_sync({HOME: [text_event("$m0", ALICE, "slow one")]})
        hs.queue_sync({HOME: [text_event("$m1", ALICE, "regret")]})
        # $m0 is being answered (20 s); $m1 waits behind it in the room's lane.
        await trio.sleep(5)
        assert await bot.store.handled_outcome("$m1") is None
        hs.queue_sync({HOME: [redaction_event("$r1", ALICE, "$m1")]})
        await until_handled(bot.store, "$m0", "$m1", "$r1")
        hs.queue_sync({HOME: [text_event("$m2", ALICE, "next")]})
        await until_handled(bot.store, "$m2")

    assert await_outcomes_ok(answered(hs))
    assert [body for body, _ in backend.contexts] == ["slow one", "next"]
    # The next context holds the first exchange only.
    assert backend.contexts[-1][1] == [("user", "slow one"), ("assistant", "re: slow one")]


def await_outcomes_ok(replies: list[str | None]) -> bool:
    """Each answered message once, none of them the redacted one."""
    firsts = [reply for reply in replies if reply is not None]
    return "$m1" not in firsts and {"$m0", "$m2"} <= set(firsts)


async def test_a_redaction_that_came_while_the_bot_was_down_stops_the_answer(
    autojump_clock: trio.abc.Clock, hs: RedactingHomeserver, logs: Logs, settings: Settings
) -> None:
    # The last run took $m1 in and stopped before answering it; the redaction came
    # while it was down and arrives in the catch-up batch.
    await seeded(settings, hs, inbox=[(HOME, text_event("$m1", ALICE, "secret"))])
    hs.rooms[HOME].timeline = [redaction_event("$r1", ALICE, "$m1")]

    async with running_bot(settings, hs) as bot:
        await until_handled(bot.store, "$m1", "$r1")
        assert await bot.store.handled_outcome("$m1") == "redacted"

    assert answered(hs) == []


async def test_an_answered_message_redacted_leaves_the_next_context(
    autojump_clock: trio.abc.Clock, hs: RedactingHomeserver, logs: Logs, settings: Settings
) -> None:
    await seeded(settings, hs)
    backend = RecordingBackend()
    async with running_bot(settings, hs, backend=backend) as bot:
        for n, body in enumerate(["one", "two secret", "three"]):
            hs.queue_sync({HOME: [text_event(f"$m{n}", ALICE, body)]})
            await until_handled(bot.store, f"$m{n}")
        hs.queue_sync({HOME: [redaction_event("$r1", ALICE, "$m1")]})
        await until_handled(bot.store, "$r1")
        hs.queue_sync({HOME: [text_event("$m9", ALICE, "four")]})
        await until_handled(bot.store, "$m9")
        assert await bot.store.handled_outcome("$m1") == "replied"  # exactly-once holds

    assert backend.contexts[-1] == (
        "four",
        [("user", "one"), ("assistant", "re: one"), ("user", "three"), ("assistant", "re: three")],
    )
    # The answer stays by default.
    assert hs.redactions == []


async def test_with_redact_answers_the_answer_is_redacted_once_across_a_restart(
    autojump_clock: trio.abc.Clock, hs: RedactingHomeserver, logs: Logs, settings: Settings
) -> None:
    settings = replace(settings, redact_answers=True)
    await seeded(settings, hs)
    async with running_bot(settings, hs) as bot:
        hs.queue_sync({HOME: [text_event("$m1", ALICE, "oops")]})
        await until_handled(bot.store, "$m1")
        (answer,) = hs.sent_in(HOME)
        # The redact call is cut off before its answer (the server did act): the bot stops.
        hs.delays["redact"] = 1000
        hs.queue_sync({HOME: [redaction_event("$r1", ALICE, "$m1")]})
        await hs.wait_for(lambda call: call.endpoint == "redact")
    assert await_pending(settings) == ["$r1"]
    hs.delays.clear()

    async with running_bot(settings, hs) as bot:
        await until_handled(bot.store, "$r1")

    redacts = [call for call in hs.calls if call.endpoint == "redact"]
    assert len(redacts) == 2  # tried again after the restart...
    assert redacts[0].path == redacts[1].path  # ...with the same transaction id
    assert hs.redactions == [(HOME, answer.event_id, hs.redactions[0][2])]  # made once


def await_pending(settings: Settings) -> list[str]:
    import sqlite3

    connection = sqlite3.connect(settings.store_path)
    try:
        return [
            row[0]
            for row in connection.execute("SELECT event_id FROM events WHERE outcome IS NULL")
        ]
    finally:
        connection.close()


async def test_junk_redactions_are_logged_once_and_the_bot_keeps_answering(
    autojump_clock: trio.abc.Clock, hs: RedactingHomeserver, logs: Logs, settings: Settings
) -> None:
    settings = replace(settings, redact_answers=True)
    await seeded(settings, hs)
    async with running_bot(settings, hs) as bot:
        hs.queue_sync({HOME: [text_event("$m1", ALICE, "hi")]})
        await until_handled(bot.store, "$m1")
        (answer,) = hs.sent_in(HOME)
        junk = [
            redaction_event("$j1", ALICE, None),
            redaction_event("$j2", ALICE, 42),
            redaction_event("$j3", ALICE, {"$m1": 1}),
            redaction_event("$j4", ALICE, "no-dollar"),
            redaction_event("$j5", ALICE, "$" + "x" * 300),
            redaction_event("$j6", ALICE, answer.event_id),  # the bot's own answer
            redaction_event("$j7", ALICE, "$state-event"),
            redaction_event("$j8", BOT, "$m1"),  # the bot's own redaction
            notice_event("$n1", ALICE, "a notice"),
            *[redaction_event(f"$flood{n}", ALICE, f"$unknown{n}") for n in range(2000)],
            text_event("$m2", ALICE, "still there?"),
        ]
        hs.queue_sync({HOME: junk})
        await until_handled(bot.store, "$m2")
        assert await bot.store.handled_outcome("$m1") == "replied"

    assert answered(hs) == ["$m1", "$m2"]
    assert hs.redactions == []
    unreadable = [entry for entry in logs if entry["event"] == "redactions_unreadable"]
    assert [entry["count"] for entry in unreadable] == [5]
    applied = [entry for entry in logs if entry["event"] == "redactions_applied"]
    assert [(e["applied"], e["unknown"]) for e in applied] == [(0, 2002)]


async def test_a_message_waiting_for_its_room_key_stops_waiting_when_redacted(
    autojump_clock: trio.abc.Clock, logs: Logs, settings: Settings
) -> None:
    # The encrypted-room scenario of test_e2ee_order.py (its own fake homeserver).
    from e2ee_peer import Peer
    from test_e2ee_order import ROOM, chats, replies
    from test_e2ee_order import running_bot as e2ee_running_bot

    hs = FakeHomeserver(logs)
    await chats(hs, settings)
    alice = Peer(hs, ALICE, "ALICEDEV")
    phone = Peer(hs, ALICE, "ALICEPHONE")

    async with e2ee_running_bot(settings, hs) as bot:
        alice.room_key_for_bot(ROOM)  # withheld: the message waits for it (ten minutes)
        hs.queue_sync({ROOM: [alice.message(ROOM, "$gone", "never mind", ts=hs.now_ms())]})
        await trio.sleep(60)
        assert await bot.store.handled_outcome("$gone") is None
        redacted_at = trio.current_time()
        hs.queue_sync({ROOM: [redaction_event("$r1", ALICE, "$gone", ts=hs.now_ms())]})
        await until_handled(bot.store, "$gone", "$r1")
        stopped_after = trio.current_time() - redacted_at
        assert await bot.store.handled_outcome("$gone") == "redacted"
        # The room goes on at once.
        key = phone.room_key_for_bot(ROOM)
        hs.queue_sync(
            {ROOM: [phone.message(ROOM, "$next", "hello", ts=hs.now_ms())]}, to_device=key
        )
        await until_handled(bot.store, "$next")

    assert stopped_after < 5, f"the redacted message still waited {stopped_after:.0f} s"
    assert replies(hs, ROOM, "$gone") == []  # no "could not decrypt" notice either
    assert len(replies(hs, ROOM, "$next")) == 1
