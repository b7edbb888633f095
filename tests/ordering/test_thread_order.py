"""Threads (issue 23) on the mock clock: a message in a thread is answered in that thread,
each thread is a conversation of its own and the main timeline another, commands work
there, a thread's start is read from the room (its root, its relations) the first time,
and after a lost store, and a thread message that comes through a gap or a restart is
answered once, in its thread. Hostile roots cost only their own context."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import trio

from bot.chats import Chat, marker_content
from bot.config import Settings
from bot.messages import IncomingMessage
from fake_homeserver import ALICE, BASE_TS, FakeHomeserver, Sent, text_event
from matrix_api.models import MessagesResponse, RoomEvent
from ordering_harness import Logs, chat, running_bot, seed_store, until_handled
from test_redaction_order import HOME, RecordingBackend, seeded

OTHER = "!other:hs.test"


@pytest.fixture
def hs(logs: Logs) -> Iterator[FakeHomeserver]:
    server = FakeHomeserver(logs)
    yield server
    assert server.unexpected == [], "requests the fake homeserver does not know"
    assert server.provisioning_calls() == []


def in_thread(event_id: str, body: str, root: str, *, ts: int = BASE_TS) -> dict[str, Any]:
    """A message in the thread rooted at ``root``, as Element sends it."""
    event = text_event(event_id, ALICE, body, ts=ts)
    event["content"]["m.relates_to"] = {
        "rel_type": "m.thread",
        "event_id": root,
        "is_falling_back": True,
        "m.in_reply_to": {"event_id": root},
    }
    return event


def reply_of(hs: FakeHomeserver, event_id: str) -> Sent:
    (sent,) = [s for s in hs.sent_in(HOME) if s.reply_to == event_id]
    return sent


def thread_of(sent: Sent) -> str | None:
    relates = sent.content.get("m.relates_to") or {}
    return relates.get("event_id") if relates.get("rel_type") == "m.thread" else None


def context_of(backend: RecordingBackend, body: str) -> list[tuple[str, str]]:
    (context,) = [context for asked, context in backend.contexts if asked == body]
    return context


async def test_each_thread_is_its_own_conversation_and_answered_in_place(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, logs: Logs, settings: Settings
) -> None:
    await seeded(settings, hs)
    backend = RecordingBackend()
    async with running_bot(settings, hs, backend=backend) as bot:
        hs.queue_sync({HOME: [text_event("$m1", ALICE, "main one")]})
        await until_handled(bot.store, "$m1")
        answer_m1 = reply_of(hs, "$m1").event_id
        hs.queue_sync(
            {
                HOME: [
                    in_thread("$a1", "on my message", "$m1"),
                    in_thread("$b1", "on your answer", answer_m1),
                    text_event("$m2", ALICE, "main two"),
                    in_thread("$a2", "more on my message", "$m1"),
                ]
            }
        )
        await until_handled(bot.store, "$a1", "$b1", "$m2", "$a2")

    # Every answer is where its message is: the thread with the reply fallback, or
    # the main timeline as a rich reply.
    for message, root in [("$a1", "$m1"), ("$b1", answer_m1), ("$a2", "$m1")]:
        assert reply_of(hs, message).content["m.relates_to"] == {
            "rel_type": "m.thread",
            "event_id": root,
            "is_falling_back": True,
            "m.in_reply_to": {"event_id": message},
        }
    for message in ("$m1", "$m2"):
        assert reply_of(hs, message).content["m.relates_to"] == {
            "m.in_reply_to": {"event_id": message}
        }
    # The contexts: a thread starts at its root, and nothing crosses over.
    assert context_of(backend, "on my message") == [("user", "main one")]
    assert context_of(backend, "on your answer") == [
        ("user", "main one"),
        ("assistant", "re: main one"),
    ]
    assert context_of(backend, "main two") == [("user", "main one"), ("assistant", "re: main one")]
    assert context_of(backend, "more on my message") == [
        ("user", "main one"),
        ("user", "on my message"),
        ("assistant", "re: on my message"),
    ]


async def test_commands_in_a_thread_answer_there_and_forget_only_the_thread(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, logs: Logs, settings: Settings
) -> None:
    await seeded(settings, hs)
    backend = RecordingBackend()
    async with running_bot(settings, hs, backend=backend) as bot:
        hs.queue_sync(
            {
                HOME: [
                    text_event("$m1", ALICE, "main one"),
                    in_thread("$t1", "thread one", "$m1"),
                    in_thread("$f", "!forget", "$m1"),
                    in_thread("$t2", "thread two", "$m1"),
                    text_event("$m2", ALICE, "main two"),
                ]
            }
        )
        await until_handled(bot.store, "$m1", "$t1", "$f", "$t2", "$m2")

    forgot = reply_of(hs, "$f")
    assert thread_of(forgot) == "$m1"
    assert forgot.content["body"].startswith("Forgotten")
    assert "thread" in forgot.content["body"]
    # The thread starts over (without its root); the main timeline keeps its own.
    assert context_of(backend, "thread two") == []
    assert context_of(backend, "main two") == [("user", "main one"), ("assistant", "re: main one")]


async def test_after_a_lost_store_a_thread_is_read_back_from_the_room(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, logs: Logs, settings: Settings
) -> None:
    await seeded(settings, hs)
    async with running_bot(settings, hs, backend=RecordingBackend()) as bot:
        hs.queue_sync(
            {
                HOME: [
                    text_event("$m1", ALICE, "main one"),
                    in_thread("$t1", "thread one", "$m1"),
                    text_event("$m2", ALICE, "main two"),
                ]
            }
        )
        await until_handled(bot.store, "$m1", "$t1", "$m2")
    settings.store_path.unlink()
    for suffix in ("-wal", "-shm"):
        settings.store_path.with_name(settings.store_path.name + suffix).unlink(missing_ok=True)
    # The chat is restored from its marker; the room keeps everything it was sent.
    await seed_store(settings.store_path, chats=[chat("c_home", HOME)], token="s0")

    backend = RecordingBackend()
    async with running_bot(settings, hs, backend=backend) as bot:
        hs.queue_sync(
            {
                HOME: [
                    in_thread("$t2", "thread two", "$m1"),
                    text_event("$m3", ALICE, "main three"),
                ]
            }
        )
        await until_handled(bot.store, "$t2", "$m3")

    assert thread_of(reply_of(hs, "$t2")) == "$m1"
    assert context_of(backend, "thread two") == [
        ("user", "main one"),
        ("user", "thread one"),
        ("assistant", "re: thread one"),
    ]
    # (The main timeline is read back with /messages, which this fake does not serve:
    # tests/backends/test_context_threads.py shows it leaves threads out.)
    relations = hs.of("relations")
    # Once per store: at the thread's first message, then at the first after the loss.
    assert [call.path.split("/relations/")[1] for call in relations] == ["$m1", "$m1"]
    assert [call.query.get("recurse") for call in relations] == ["true", "true"]


async def test_a_thread_message_from_a_gap_is_answered_in_its_thread(
    autojump_clock: trio.abc.Clock,
    hs: FakeHomeserver,
    logs: Logs,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await seeded(settings, hs)
    gap = RoomEvent(
        type="m.room.message",
        event_id="$gap",
        sender=ALICE,
        origin_server_ts=BASE_TS,
        content=in_thread("$gap", "written during the gap", "$m1")["content"],
    )
    pages: list[dict[str, Any]] = []

    async def messages(room_id: str, **kwargs: Any) -> MessagesResponse:
        # Gap filling pages back to the last sync (``to_token``); a context rebuild
        # reads the room's history, which holds nothing here.
        gap_filling = "to_token" in kwargs
        if gap_filling:
            pages.append(kwargs)
        chunk = [gap] if gap_filling and len(pages) == 1 else []
        return MessagesResponse(start="t_gap", chunk=chunk, end=None)

    async with running_bot(settings, hs, backend=RecordingBackend()) as bot:
        monkeypatch.setattr(bot.runtime._client, "messages", messages)
        hs.queue_sync({HOME: [text_event("$m1", ALICE, "main one")]})
        await until_handled(bot.store, "$m1")
        # The fake's timelines are never limited: this one batch is, a gap before it.
        original = hs._joined_room

        def limited_once(*args: Any, **kwargs: Any) -> Any:
            room = original(*args, **kwargs)
            if any(e["event_id"] == "$after" for e in room["timeline"]["events"]):
                room["timeline"]["limited"] = True
                room["timeline"]["prev_batch"] = "t_gap"
            return room

        monkeypatch.setattr(hs, "_joined_room", limited_once)
        hs.queue_sync({HOME: [text_event("$after", ALICE, "after the gap")]})
        await until_handled(bot.store, "$gap", "$after")

    assert pages, "the gap was filled with /messages"
    assert thread_of(reply_of(hs, "$gap")) == "$m1"
    assert thread_of(reply_of(hs, "$after")) is None
    replied = [s.reply_to for s in hs.sent_in(HOME)]
    assert replied.index("$gap") < replied.index("$after")


async def test_a_thread_message_in_the_inbox_at_restart_is_answered_once_in_its_thread(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, logs: Logs, settings: Settings
) -> None:
    await seeded(
        settings,
        hs,
        inbox=[(HOME, text_event("$m1", ALICE, "main one")), (HOME, in_thread("$t1", "t", "$m1"))],
    )
    async with running_bot(settings, hs, backend=RecordingBackend()) as bot:
        await until_handled(bot.store, "$m1", "$t1")
    async with running_bot(settings, hs, backend=RecordingBackend()) as bot:
        hs.queue_sync({HOME: [text_event("$m2", ALICE, "next")]})
        await until_handled(bot.store, "$m2")

    assert [s.reply_to for s in hs.sent_in(HOME)] == ["$m1", "$t1", "$m2"]
    assert thread_of(reply_of(hs, "$t1")) == "$m1"


async def test_a_root_the_server_does_not_have_costs_only_the_threads_context(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, logs: Logs, settings: Settings
) -> None:
    await seeded(settings, hs)
    backend = RecordingBackend()
    async with running_bot(settings, hs, backend=backend) as bot:
        hs.queue_sync(
            {
                HOME: [
                    in_thread("$t1", "rooted nowhere", "$no-such-event"),
                    in_thread("$t2", "rooted in junk", {"not": "an id"}),  # type: ignore[arg-type]
                    text_event("$m1", ALICE, "main"),
                ]
            }
        )
        await until_handled(bot.store, "$t1", "$m1")
        assert await bot.store.handled_outcome("$t2") == "quarantined"  # at intake

    # Answered, in its thread, without a context; the failure logged.
    assert thread_of(reply_of(hs, "$t1")) == "$no-such-event"
    assert context_of(backend, "rooted nowhere") == []
    failed = [entry for entry in logs if entry["event"] == "context_rebuild_failed"]
    assert len(failed) == 1
    quarantined = [entry for entry in logs if entry["event"] == "event_quarantined"]
    assert [entry.get("event_id") for entry in quarantined] == ["$t2"]
    assert [s.reply_to for s in hs.sent_in(HOME)] == ["$t1", "$m1"]


async def test_a_thread_does_not_wait_for_another_room(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, logs: Logs, settings: Settings
) -> None:
    """A slow answer in a thread holds up its own room (order), not another room."""
    home, other = chat("c_home", HOME), chat("c_other", OTHER)
    await seed_store(settings.store_path, chats=[home, other], token="s0")
    hs.add_room(HOME, marker=marker_content(home))
    hs.add_room(OTHER, marker=marker_content(other))
    backend = SlowFor("slow", seconds=30)
    async with running_bot(settings, hs, backend=backend) as bot:
        hs.queue_sync(
            {
                HOME: [in_thread("$t1", "slow", "$root"), text_event("$m1", ALICE, "then main")],
                OTHER: [text_event("$o1", ALICE, "elsewhere")],
            }
        )
        await until_handled(bot.store, "$t1", "$m1", "$o1")

    order = [s.reply_to for s in hs.sent if s.room_id in (HOME, OTHER)]
    assert order.index("$t1") < order.index("$m1")
    assert order.index("$o1") < order.index("$t1")
    assert thread_of(reply_of(hs, "$t1")) == "$root"


class SlowFor(RecordingBackend):
    """`RecordingBackend` that takes ``seconds`` for the message ``body`` only."""

    def __init__(self, body: str, *, seconds: float) -> None:
        super().__init__()
        self.slow_body, self.slow_s = body, seconds

    async def reply_streaming(
        self, chat: Chat, message: IncomingMessage, *args: Any, **kw: Any
    ) -> str:
        if message.body == self.slow_body:
            await trio.sleep(self.slow_s)
        return await super().reply_streaming(chat, message, *args, **kw)
