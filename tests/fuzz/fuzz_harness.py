"""Running a real `BotRuntime` through a hostile `Scenario`, and checking what it did.

The homeserver is the scripted one of ``tests/ordering`` (`FakeHomeserver`), with its
/sync answers replaced by the scenario's raw bytes, keyed by the ``since`` token as a
real server's are: the same token gets the same batch again (after the step's glitches,
served once each). Everything else (whoami, account data, sends, joins, receipts) is the
fake's own.

`check_scenario` is the property. For each scenario, the bot:

* starts and reaches READY, and no exception escapes the runtime at any point (and
  when the scenario says so, is stopped after a batch and started again on its store,
  with what it had not handled yet still in the inbox);
* answers the final message exactly once, with the echo of its body;
* moves its sync token past every batch (to `FINAL_TOKEN`);
* leaves nothing in the inbox: every event taken in ends handled, answered, failed or
  quarantined (with a reason, read back from the store);
* never logs message contents (`CANARY`), and logs each quarantined event without them.

Each example is bounded in virtual time (``trio.fail_after`` on the mock clock) and in
real time (a watchdog thread cancels the run; should the trio thread be stuck where it
cannot be cancelled, faulthandler dumps every thread's stack and ends the process, so
the suite fails instead of hanging).
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sqlite3
import tempfile
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import httpx
import trio
from fuzz_strategies import (
    CANARY,
    FINAL_BODY,
    FINAL_EVENT,
    FINAL_TOKEN,
    KNOWN_CHAT,
    KNOWN_ROOM,
    SEED_TOKEN,
    Scenario,
    dump,
    known_marker,
    sync_body,
)
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs
from trio.testing import MockClock

from bot.config import Settings
from bot.logging import merge_log_context
from bot.runtime import BotRuntime, Phase
from fake_homeserver import Call, FakeHomeserver
from ordering_harness import Logs, bot_parts, chat, make_settings, seed_store, ticking

__all__ = ["REAL_LIMIT_S", "FuzzHomeserver", "check_scenario", "run_scenario"]

# Virtual seconds start-up may take (retries of the start-up sync included).
STARTUP_WITHIN_S = 900.0
# Virtual seconds from READY to the final answer: ample for every backoff the bot may
# take on the way (sync retries are capped at 60 s apart), far from "forever".
FINAL_WITHIN_S = 1_800.0
# Virtual seconds for the inbox to empty once the final message is answered.
SETTLE_WITHIN_S = 600.0
# Real seconds one example may take; a wedged bot spins its retries until then.
REAL_LIMIT_S = float(os.environ.get("SURFACES_FUZZ_REAL_LIMIT_S", "60"))
_POLL_S = 1.0

_RAW_ANSWER: ContextVar[list[bytes]] = ContextVar("_RAW_ANSWER")


class FuzzHomeserver(FakeHomeserver):
    """`FakeHomeserver` whose /sync answers come from a `Scenario`, as raw bytes."""

    def __init__(self, scenario: Scenario, logs: Logs) -> None:
        super().__init__(logs)
        self.steps = dict(zip(scenario.tokens(), scenario.steps, strict=True))
        self.served: Counter[str | None] = Counter()
        self.unknown_since: list[str | None] = []
        self.hold_since: str | None = None
        """A sync from this token is held until the client gives up (a restart)."""
        # What joined_rooms and a marker GET answer (a repair reads the marker here).
        self.add_room(KNOWN_ROOM, marker=known_marker())

    async def handle(self, request: httpx.Request) -> httpx.Response:
        slot: list[bytes] = []
        token = _RAW_ANSWER.set(slot)
        try:
            response = await super().handle(request)
        finally:
            _RAW_ANSWER.reset(token)
        if not slot:
            return response
        return httpx.Response(
            response.status_code, content=slot[0], headers={"Content-Type": "application/json"}
        )

    def _route(self, call: Call, segments: list[str]) -> Callable[[], Awaitable[Any]]:
        if segments[4:] == ["sync"] and call.method == "GET":
            full_state = call.query.get("full_state") == "true"
            call.endpoint = "initial_sync" if full_state else "long_poll"
            return lambda: self._scripted_sync(call)
        return super()._route(call, segments)

    async def _scripted_sync(self, call: Call) -> tuple[int, dict[str, Any]]:
        since = call.query.get("since")
        if since is not None and since == self.hold_since:
            await trio.sleep_forever()
        step = self.steps.get(since)
        if step is not None:
            body = step.answer(self.served[since])
            self.served[since] += 1
        else:
            if since != FINAL_TOKEN:
                self.unknown_since.append(since)
            elif call.endpoint == "long_poll":
                await trio.sleep(self.long_poll_s)  # nothing new since the last batch
            body = dump(sync_body(FINAL_TOKEN))
        _RAW_ANSWER.get().append(body)
        return 200, {}


class _Watchdog:
    """Cancels a trio run from another thread after ``limit_s`` real seconds."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.fired = False
        self._scope: trio.CancelScope | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._timer = threading.Timer(limit_s, self._fire)
        self._timer.daemon = True

    def arm(self, scope: trio.CancelScope) -> None:
        self._scope = scope
        self._token = trio.lowlevel.current_trio_token()
        self._timer.start()
        # Last resort for a thread stuck where trio cannot cancel it (a C loop).
        faulthandler.dump_traceback_later(self.limit_s * 3, exit=True)

    def disarm(self) -> None:
        self._timer.cancel()
        faulthandler.cancel_dump_traceback_later()

    def _fire(self) -> None:
        self.fired = True
        scope, token = self._scope, self._token
        if scope is None or token is None:
            return
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(scope.cancel, trio_token=token)


def check_scenario(scenario: Scenario) -> Logs:
    """Run ``scenario`` and assert the property (see the module docstring); returns
    the captured logs. The first exception of an exception group is raised on its
    own, so that distinct failures stay distinct to hypothesis."""
    watchdog = _Watchdog(REAL_LIMIT_S)
    with (
        tempfile.TemporaryDirectory(prefix="surfaces-fuzz-") as tmp,
        capture_logs(processors=[merge_contextvars, merge_log_context]) as logs,
    ):
        settings = make_settings(Path(tmp))
        try:
            clock = MockClock(autojump_threshold=0)
            trio.run(run_scenario, scenario, settings, logs, watchdog, clock=clock)
        except BaseException as exc:
            error = _first_leaf(exc) if isinstance(exc, BaseExceptionGroup) else exc
            error.add_note(f"last log events: {_log_tail(logs)}")
            if error is exc:
                raise
            raise error from None
        finally:
            watchdog.disarm()
        _check_store(settings.store_path)
    return logs


def _check_store(path: Path) -> None:
    """Read back what the stopped bot left: nothing pending, and a reason (without
    content) for every quarantined event."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        pending = db.execute("SELECT event_id FROM events WHERE outcome IS NULL").fetchall()
        quarantined = db.execute(
            "SELECT event_id, reason FROM events WHERE outcome = 'quarantined'"
        ).fetchall()
    assert pending == [], f"left in the inbox: {pending}"
    for event_id, reason in quarantined:
        assert reason, f"quarantined without a reason: {event_id!r}"
        assert CANARY not in reason, f"message content in a quarantine reason: {event_id!r}"


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


async def run_scenario(
    scenario: Scenario, settings: Settings, logs: Logs, watchdog: _Watchdog | None = None
) -> None:
    hs = FuzzHomeserver(scenario, logs)
    if scenario.seeded:
        known = chat(KNOWN_CHAT, KNOWN_ROOM)
        await seed_store(settings.store_path, chats=[known], token=SEED_TOKEN)
    with trio.CancelScope() as real_time:
        if watchdog is not None:
            watchdog.arm(real_time)
        if scenario.restart_at is not None:
            await _run_until_token(settings, hs, logs, scenario.restart_at)
        await _run_to_the_end(settings, hs, logs)
    if real_time.cancelled_caught:
        raise AssertionError(
            f"the example took more than {REAL_LIMIT_S} real seconds; " + _diagnosis(hs, None, logs)
        )
    answers = [sent for sent in hs.sent if sent.reply_to == FINAL_EVENT]
    assert [a.body for a in answers] == [FINAL_BODY], f"answers to the final message: {answers}"
    assert hs.unknown_since == [], f"synced from tokens the server never gave: {hs.unknown_since}"
    _check_logs(logs)


# The store opens (in a worker thread) before any deadline exists: with the autojump
# threshold at 0 the clock would otherwise race to the next deadline while the thread
# works (see tests/ordering/conftest.py). Hence bot_parts before ticking below.


async def _start(
    runtime: BotRuntime, nursery: trio.Nursery, hs: FuzzHomeserver, logs: Logs
) -> None:
    try:
        with trio.fail_after(STARTUP_WITHIN_S):
            await nursery.start(runtime.run)
    except trio.TooSlowError:
        raise AssertionError(
            f"start-up did not reach READY within {STARTUP_WITHIN_S} virtual s; "
            + _diagnosis(hs, None, logs)
        ) from None
    assert runtime.phase.value is Phase.READY


async def _run_until_token(settings: Settings, hs: FuzzHomeserver, logs: Logs, token: str) -> None:
    """Run the bot until it has committed the batch that hands out ``token``, then stop
    it gracefully: what it took in and has not handled yet waits in the store."""
    async with (
        bot_parts(settings, hs) as (runtime, store),
        ticking(STARTUP_WITHIN_S + FINAL_WITHIN_S + 60),
        trio.open_nursery() as nursery,
    ):
        hs.hold_since = token
        await _start(runtime, nursery, hs, logs)
        try:
            with trio.fail_after(FINAL_WITHIN_S):
                await hs.wait_for(lambda call: call.query.get("since") == token)
        except trio.TooSlowError:
            raise AssertionError(
                "never got to the restart: " + _diagnosis(hs, store.sync_token, logs)
            ) from None
        assert store.sync_token == token
        runtime.request_stop()
        await runtime.phase.wait_value(Phase.STOPPED)
        hs.hold_since = None


async def _run_to_the_end(settings: Settings, hs: FuzzHomeserver, logs: Logs) -> None:
    """Run the bot until it has answered the final message and emptied its inbox."""
    async with (
        bot_parts(settings, hs) as (runtime, store),
        ticking(STARTUP_WITHIN_S + FINAL_WITHIN_S + SETTLE_WITHIN_S + 60),
        trio.open_nursery() as nursery,
    ):
        await _start(runtime, nursery, hs, logs)
        try:
            with trio.fail_after(FINAL_WITHIN_S):
                await hs.wait_for(_replies_to(FINAL_EVENT), ended=True)
        except trio.TooSlowError:
            raise AssertionError(
                f"the final message was not answered within {FINAL_WITHIN_S} virtual s; "
                + _diagnosis(hs, store.sync_token, logs)
            ) from None
        with trio.move_on_after(SETTLE_WITHIN_S):
            while await store.pending() or store.sync_token != FINAL_TOKEN:  # noqa: ASYNC110
                await trio.sleep(_POLL_S)
        pending = await store.pending()
        assert pending == [], f"still in the inbox: {[p.event_id for p in pending]}; " + (
            _diagnosis(hs, store.sync_token, logs)
        )
        assert store.sync_token == FINAL_TOKEN, _diagnosis(hs, store.sync_token, logs)
        assert await store.handled_outcome(FINAL_EVENT) == "replied"
        assert runtime.phase.value is Phase.READY
        runtime.request_stop()
        await runtime.phase.wait_value(Phase.STOPPED)


def _replies_to(event_id: str) -> Callable[[Call], bool]:
    def matches(call: Call) -> bool:
        if call.endpoint != "send" or not isinstance(call.body, dict):
            return False
        relates = call.body.get("m.relates_to") or {}
        return (relates.get("m.in_reply_to") or {}).get("event_id") == event_id

    return matches


def _check_logs(logs: Logs) -> None:
    for entry in logs:
        assert CANARY not in repr(entry), f"message content in a log line: {entry['event']}"
        if entry["event"] == "event_quarantined":
            assert "content" not in entry
            assert "body" not in entry


def _log_tail(logs: Logs, count: int = 12) -> list[str]:
    return [
        f"{entry['event']}({str(entry.get('error', entry.get('reason', '')))[:100]})"
        for entry in logs[-count:]
    ]


def _diagnosis(hs: FuzzHomeserver, token: str | None, logs: Logs) -> str:
    """What a failure report needs: where the sync got to, and the warnings (counted)."""
    loud = Counter(
        f"{entry['event']}: {str(entry.get('error', entry.get('reason', '')))[:160]}"
        for entry in logs
        if entry.get("log_level") in ("warning", "error", "critical", "exception")
    )
    return f"token {token!r}; syncs served per since {dict(hs.served)}; warnings {dict(loud)}"
