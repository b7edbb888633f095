"""Junk from the homeserver costs only itself: the bot starts, stays up, and answers what
comes after it (issue 15).

Events a server that validates less than Synapse could relay: wrong types where strings
belong, content nested far deeper than any decoder follows. Each is recorded in the store as
quarantined with a reason and logged once as ``event_quarantined``; nothing of its content
reaches a log line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio

from bot.backends import EchoBackend
from bot.chats import marker_content
from bot.config import Settings
from bot.replies.history import FAILED_KEY
from bot.runtime import Phase
from bot.store import Store
from fake_homeserver import ALICE, BASE_TS, FakeHomeserver, text_event
from matrix_api import MatrixError
from ordering_harness import (
    Logs,
    bot_parts,
    chat,
    log_events,
    running_bot,
    seed_store,
    ticking,
    until_handled,
)

ROOM = "!a:hs.test"
SECRET = "the-content-nobody-may-log"
DEEP = b'"@@deep@@"'  # stands, in the fake's JSON, for content too deep to build as objects


async def a_known_chat(
    hs: FakeHomeserver, settings: Settings, timeline: list[dict[str, Any]] | None = None
) -> None:
    """``ROOM`` as a chat the store and the server know, with ``timeline`` in the start-up
    sync; the store has a sync token, so this is a restart."""
    a = chat("c_a", ROOM)
    await seed_store(settings.store_path, chats=[a], token="s0")
    hs.add_room(ROOM, marker=marker_content(a), timeline=timeline or [])


def junk(event_id: str, **content: Any) -> dict[str, Any]:
    event = text_event(event_id, ALICE, SECRET, ts=BASE_TS + 1)
    event["content"].update(content)
    return event


def deep_event(event_id: str) -> dict[str, Any]:
    return junk(event_id, nested=DEEP.decode().strip('"'))


def rewriting_syncs(hs: FakeHomeserver, rewrite: Callable[[bytes, int], bytes]) -> None:
    """Pass every /sync answer of ``hs`` through ``rewrite(body, nth)`` (nth: 0, 1, ...).

    A /sync from a position asked for before gets the same answer again, as from a real
    server (the fake would move on to its next scripted batch).
    """
    answers: dict[str | None, tuple[int, bytes]] = {}
    count = 0

    async def handle(request: httpx.Request) -> httpx.Response:
        nonlocal count
        if not request.url.path.endswith("/sync"):
            return await hs.handle(request)
        since = request.url.params.get("since")
        if since not in answers or "full_state" in request.url.params:
            response = await hs.handle(request)
            answers[since] = (response.status_code, rewrite(response.content, count))
            count += 1
        status, body = answers[since]
        return httpx.Response(status, content=body)

    hs.transport = lambda: httpx.MockTransport(handle)  # type: ignore[method-assign]


def with_deep_content(depth: int) -> Callable[[bytes, int], bytes]:
    deep = b"[" * depth + b"]" * depth
    return lambda body, _: body.replace(DEEP, deep)


def quarantine_lines(logs: Logs) -> list[dict[str, Any]]:
    return [dict(entry) for entry in logs if entry["event"] == "event_quarantined"]


def assert_nothing_logged_of_the_content(logs: Logs) -> None:
    assert all(SECRET not in repr(entry) for entry in logs)


JUNK = [
    pytest.param(junk("$junk", msgtype=["m.text"]), "msgtype is a list", id="msgtype-list"),
    pytest.param(junk("$junk", msgtype={"a": 1}), "msgtype is a dict", id="msgtype-object"),
    pytest.param(junk("$junk", msgtype=7), "msgtype is a int", id="msgtype-number"),
    pytest.param(junk("$junk", body={"text": SECRET}), "body is a dict", id="body-object"),
    pytest.param(junk("$junk", **{"m.relates_to": [1]}), "m.relates_to is a list", id="relates"),
    pytest.param(deep_event("$junk"), "nested deeper than", id="deep"),
]


@pytest.mark.parametrize(("event", "reason"), JUNK)
async def test_junk_in_the_long_poll_is_quarantined_and_the_next_message_answered(
    autojump_clock: trio.abc.Clock,
    hs: FakeHomeserver,
    logs: Logs,
    settings: Settings,
    event: dict[str, Any],
    reason: str,
) -> None:
    await a_known_chat(hs, settings)
    rewriting_syncs(hs, with_deep_content(100_000))

    async with running_bot(settings, hs) as bot:
        hs.queue_sync({ROOM: [event, text_event("$same-batch", ALICE, "also here")]})
        await until_handled(bot.store, "$junk", "$same-batch")
        hs.queue_sync({ROOM: [text_event("$later", ALICE, "still there?")]})
        await until_handled(bot.store, "$later")
        assert bot.runtime.phase.value is Phase.READY
        assert await bot.store.handled_outcome("$junk") == "quarantined"
        assert reason in (await bot.store.quarantined())["$junk"]

    assert [(s.reply_to, s.body) for s in hs.sent_in(ROOM)] == [
        ("$same-batch", "also here"),
        ("$later", "still there?"),
    ]
    [line] = quarantine_lines(logs)
    assert (line["room_id"], line["event_id"], line["sender"]) == (ROOM, "$junk", ALICE)
    assert reason in line["reason"]
    assert_nothing_logged_of_the_content(logs)


@pytest.mark.parametrize(("event", "reason"), JUNK)
async def test_junk_in_the_initial_sync_does_not_stop_the_start(
    autojump_clock: trio.abc.Clock,
    hs: FakeHomeserver,
    logs: Logs,
    settings: Settings,
    event: dict[str, Any],
    reason: str,
) -> None:
    await a_known_chat(hs, settings, [event])
    rewriting_syncs(hs, with_deep_content(100_000))

    async with running_bot(settings, hs) as bot:
        await until_handled(bot.store, "$junk")
        hs.queue_sync({ROOM: [text_event("$later", ALICE, "hello")]})
        await until_handled(bot.store, "$later")
        assert await bot.store.handled_outcome("$junk") == "quarantined"

    assert "bot_ready" in log_events(logs)
    assert [s.reply_to for s in hs.sent_in(ROOM)] == ["$later"]
    assert [line["event_id"] for line in quarantine_lines(logs)] == ["$junk"]
    assert_nothing_logged_of_the_content(logs)


async def test_a_start_up_sync_that_cannot_be_read_is_asked_for_again(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, logs: Logs, settings: Settings
) -> None:
    await a_known_chat(hs, settings, [text_event("$m", ALICE, "hi")])
    broken = [b"[]", b'{"rooms": {}}', b"{" * 100_000]
    rewriting_syncs(hs, lambda body, nth: broken[nth] if nth < len(broken) else body)

    async with running_bot(settings, hs) as bot:
        await until_handled(bot.store, "$m")

    assert log_events(logs).count("initial_sync_failed") == len(broken)
    assert [s.reply_to for s in hs.sent_in(ROOM)] == ["$m"]


async def test_a_stop_while_the_start_up_sync_keeps_failing_stops_cleanly(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, logs: Logs, settings: Settings
) -> None:
    rewriting_syncs(hs, lambda body, nth: b"[]")

    async with ticking() as tasks, bot_parts(settings, hs) as (runtime, _):
        tasks.start_soon(runtime.run)
        while log_events(logs).count("initial_sync_failed") < 3:  # noqa: ASYNC110
            await trio.sleep(1.0)
        runtime.request_stop()
        await runtime.phase.wait_value(Phase.STOPPED)

    events = log_events(logs)
    assert "bot_stopped_before_ready" in events
    assert "matrix_reconcile_complete" not in events


async def test_a_batch_that_keeps_failing_is_given_up_and_the_bot_goes_on(
    autojump_clock: trio.abc.Clock,
    hs: FakeHomeserver,
    logs: Logs,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await a_known_chat(hs, settings)
    commit = Store.commit_sync_batch

    async def fails_on_poison(
        self: Store, token: Any, items: Any, quarantined: Any = (), **crypto: Any
    ) -> Any:
        if any(item.event_id == "$poison" for item in items):
            raise RuntimeError("a bug that this batch sets off")
        return await commit(self, token, items, quarantined, **crypto)

    monkeypatch.setattr(Store, "commit_sync_batch", fails_on_poison)
    rewriting_syncs(hs, lambda body, nth: body)  # the failed batch is fetched again

    async with running_bot(settings, hs) as bot:
        hs.queue_sync({ROOM: [text_event("$poison", ALICE, "x"), text_event("$with", ALICE, "y")]})
        await until_handled(bot.store, "$poison", "$with")
        hs.queue_sync({ROOM: [text_event("$after", ALICE, "after")]})
        await until_handled(bot.store, "$after")
        quarantined = await bot.store.quarantined()

    assert set(quarantined) == {"$poison", "$with"}
    assert quarantined["$poison"].startswith("sync failed: RuntimeError at ")
    events = log_events(logs)
    assert events.count("sync_batch_failed") == 5
    assert events.count("sync_batch_given_up") == 1
    assert [s.reply_to for s in hs.sent_in(ROOM)] == ["$after"]


async def test_an_event_that_intake_chokes_on_costs_only_itself(
    autojump_clock: trio.abc.Clock,
    hs: FakeHomeserver,
    logs: Logs,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import bot.intake

    await a_known_chat(hs, settings)
    actionable = bot.intake.is_actionable

    def chokes(event: Any, bot_user_id: str) -> bool:
        if event.event_id == "$choke":
            raise KeyError(SECRET)
        return actionable(event, bot_user_id)

    monkeypatch.setattr(bot.intake, "is_actionable", chokes)
    rewriting_syncs(hs, lambda body, nth: body)

    async with running_bot(settings, hs) as running:
        hs.queue_sync({ROOM: [text_event("$choke", ALICE, "x"), text_event("$fine", ALICE, "y")]})
        await until_handled(running.store, "$choke", "$fine")
        reason = (await running.store.quarantined())["$choke"]

    assert reason.startswith("intake failed: KeyError at ")
    assert [s.reply_to for s in hs.sent_in(ROOM)] == ["$fine"]
    assert_nothing_logged_of_the_content(logs)


async def test_a_gap_that_cannot_be_filled_is_left_after_a_few_tries(
    autojump_clock: trio.abc.Clock,
    hs: FakeHomeserver,
    logs: Logs,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await a_known_chat(hs, settings)

    async def refuses(*args: Any, **kwargs: Any) -> Any:
        raise MatrixError.from_response(400, {"errcode": "M_INVALID_PARAM", "error": "bad"})

    def limited(body: bytes, nth: int) -> bytes:
        return body.replace(b'"limited":false', b'"limited":true') if b"$m" in body else body

    rewriting_syncs(hs, limited)
    async with running_bot(settings, hs) as bot:
        monkeypatch.setattr(bot.runtime._client, "messages", refuses)
        hs.queue_sync({ROOM: [text_event("$m", ALICE, "after a gap")]})
        await until_handled(bot.store, "$m")

    events = log_events(logs)
    assert events.count("sync_failed") == 3
    assert events.count("sync_gap_unfilled") == 1
    assert [s.reply_to for s in hs.sent_in(ROOM)] == ["$m"]


async def test_a_message_the_handler_keeps_failing_on_is_quarantined_with_a_notice(
    autojump_clock: trio.abc.Clock,
    hs: FakeHomeserver,
    logs: Logs,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await a_known_chat(hs, settings)
    reply = EchoBackend.reply

    async def fails_on_poison(self: EchoBackend, chat: Any, message: Any) -> str:
        if message.body == "poison":
            raise ValueError(SECRET)
        return await reply(self, chat, message)

    monkeypatch.setattr(EchoBackend, "reply", fails_on_poison)

    async with running_bot(settings, hs) as bot:
        hs.queue_sync({ROOM: [text_event("$p", ALICE, "poison"), text_event("$n", ALICE, "ok")]})
        await until_handled(bot.store, "$p", "$n")
        assert await bot.store.handled_outcome("$p") == "quarantined"
        reason = (await bot.store.quarantined())["$p"]

    assert reason.startswith("handling failed: ValueError at ")
    failure, answer = hs.sent_in(ROOM)
    assert (failure.reply_to, answer.reply_to) == ("$p", "$n")
    # Marked as no answer, so a conversation rebuilt from the room leaves the exchange out.
    assert failure.content.get(FAILED_KEY) is True
    assert FAILED_KEY not in answer.content
    [line] = quarantine_lines(logs)
    assert (line["event_id"], line["reason"]) == ("$p", reason)
    assert_nothing_logged_of_the_content(logs)
