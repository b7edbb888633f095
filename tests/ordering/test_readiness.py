"""The operators' endpoints against the runtime, on the mock clock (issue 21): /readyz says
"not yet" all through a slow reconciliation and yes only once the lanes and the sync loop
run; /healthz turns 503 when the sync loop is stuck or the store cannot write, and back;
/metrics counts a scripted run exactly.

The endpoints are called through the ASGI app the listener serves (`OpsApp`), in virtual
time: real sockets have no place under the autojump clock (see test_readiness_listener.py
for the listener itself)."""

from __future__ import annotations

import json
from typing import Any

import trio
from prometheus_client.parser import text_string_to_metric_families

from bot.chats import marker_content
from bot.config import Settings
from bot.ops.health import readiness
from bot.ops.http import OpsApp
from bot.runtime import BotRuntime
from fake_homeserver import ALICE, BASE_TS, Call, FakeHomeserver, text_event
from ordering_harness import (
    Logs,
    chat,
    only_log,
    reply_to,
    running_bot,
    seed_store,
    until_handled,
)

HOME = "!home:hs.test"
GONE = "!gone:hs.test"
EVE = "@eve:elsewhere.test"  # not allowed: her messages are ignored


async def get(app: OpsApp, path: str) -> tuple[int, bytes]:
    """One GET through the ASGI interface, as hypercorn would make it."""
    sent: list[dict[str, Any]] = []
    scope = {"type": "http", "method": "GET", "path": path, "headers": [], "query_string": b""}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start, body = sent
    return start["status"], body["body"]


async def get_json(app: OpsApp, path: str) -> tuple[int, dict[str, Any]]:
    status, body = await get(app, path)
    return status, json.loads(body)


def ops_app(runtime: BotRuntime) -> OpsApp:
    return OpsApp(runtime.facts, runtime.metrics)


async def test_readyz_is_503_through_a_slow_reconciliation_and_200_once_taking_messages(
    autojump_clock: trio.abc.Clock,
    hs: FakeHomeserver,
    logs: Logs,
    settings: Settings,
) -> None:
    home = chat("c_home", HOME)
    # GONE is in the store but not in the initial sync: reconciliation asks joined_rooms,
    # and that answer takes 30 virtual seconds.
    await seed_store(settings.store_path, chats=[home, chat("c_gone", GONE)], token="s0")
    hs.add_room(HOME, marker=marker_content(home))
    hs.delays["joined_rooms"] = 30.0
    ready_at_call: list[tuple[str, bool]] = []
    polled: list[tuple[float, int, str]] = []

    def watch(runtime: BotRuntime) -> None:
        app = ops_app(runtime)

        def observe(call: Call) -> None:
            # What /readyz would have said as each request reached the homeserver.
            ready_at_call.append((call.endpoint, readiness(runtime.facts).ok))

        hs.observers.append(observe)

        async def probe() -> None:
            # A probe every virtual second from before the bootstrap to the end.
            while True:
                status, body = await get_json(app, "/readyz")
                polled.append((trio.current_time(), status, body["phase"]))
                await trio.sleep(1)

        probes.start_soon(probe)

    async with trio.open_nursery() as probes:
        async with running_bot(settings, hs, before_start=watch) as bot:
            app = ops_app(bot.runtime)
            await hs.wait_for(lambda call: call.endpoint == "long_poll")
            status, body = await get_json(app, "/readyz")
            assert status == 200
            assert body == {
                "ready": True,
                "phase": "ready",
                "gate": True,
                "lanes_started": True,
                "sync_started": True,
                "uptime_s": body["uptime_s"],
            }
            assert (await get(app, "/healthz"))[0] == 200
            await trio.sleep(5)  # the probe sees the bot ready too
            await bot.stop()
            # Stopped: not ready (a load balancer must stop sending anything our way).
            status, body = await get_json(app, "/readyz")
            assert (status, body["phase"]) == (503, "stopped")
        probes.cancel_scope.cancel()

    # The probe ran from before the bootstrap: 503 while starting and through the 30
    # virtual seconds reconciliation waited on joined_rooms, 200 only in phase "ready".
    assert polled[0][1:] == (503, "starting")
    assert len([at for at, _, phase in polled if phase == "reconciling"]) >= 30
    assert all(status == 503 for _, status, phase in polled if phase != "ready")
    first_ready = next(at for at, status, _ in polled if status == 200)
    assert first_ready >= 30.0
    # Up to reconciliation's end every request went out while /readyz said 503; every
    # long-poll went out after it said 200.
    reconciled, _ = only_log(logs, "matrix_reconcile_complete")
    assert ready_at_call[0] == ("whoami", False)
    assert ("joined_rooms", False) in ready_at_call
    long_polls = [ok for endpoint, ok in ready_at_call if endpoint == "long_poll"]
    assert long_polls
    assert all(long_polls)
    assert not any(
        ok
        for call, (_, ok) in zip(hs.calls, ready_at_call, strict=True)
        if not call.after_log(reconciled)
    )


async def test_healthz_turns_503_when_the_sync_loop_is_stuck_and_back_when_it_moves(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, settings: Settings
) -> None:
    home = chat("c_home", HOME)
    await seed_store(settings.store_path, chats=[home], token="s0")
    hs.add_room(HOME, marker=marker_content(home))

    async with running_bot(settings, hs) as bot:
        app = ops_app(bot.runtime)
        await hs.wait_for(lambda call: call.endpoint == "long_poll", ended=True)
        assert (await get(app, "/healthz"))[0] == 200
        # The long-poll in progress hangs for five minutes after its answer is ready
        # (the test's transport has no read timeout: as a stuck connection would).
        hs.delays["long_poll"] = 300.0
        stuck_at = trio.current_time()
        bound = bot.runtime.facts.sync_stale_after_s
        await trio.sleep(bound / 2)
        assert (await get(app, "/healthz"))[0] == 200  # a slow sync is not yet a stuck one
        await trio.sleep(bound)
        status, body = await get_json(app, "/healthz")
        assert status == 503
        assert body["reason"] == "sync_stale"
        assert body["sync"]["last_ok_s_ago"] >= bound
        assert body["sync"]["stale_after_s"] == bound
        assert (await get(app, "/readyz"))[0] == 200  # still ready: liveness is the alarm
        # The homeserver answers again: healthy once a /sync completes.
        del hs.delays["long_poll"]
        hs.queue_sync({HOME: [text_event("$back", ALICE, "anyone there?")]})
        await hs.wait_for(reply_to("$back"), ended=True)
        status, body = await get_json(app, "/healthz")
        assert status == 200, body
        assert body["sync"]["failures_in_row"] == 0
        assert trio.current_time() - stuck_at > bound


async def test_healthz_turns_503_when_the_store_cannot_write_and_back_when_it_can(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, settings: Settings
) -> None:
    home = chat("c_home", HOME)
    await seed_store(settings.store_path, chats=[home], token="s0")
    hs.add_room(HOME, marker=marker_content(home))
    hs.repeat_answers = True  # a batch that failed to commit comes back

    async with running_bot(settings, hs) as bot:
        app = ops_app(bot.runtime)
        await hs.wait_for(lambda call: call.endpoint == "long_poll", ended=True)
        assert (await get(app, "/healthz"))[0] == 200
        # The disk is read-only now ("attempt to write a readonly database").
        bot.store._db.execute("PRAGMA query_only = ON")
        hs.queue_sync({HOME: [text_event("$lost", ALICE, "is this kept?")]})
        while not bot.runtime.facts.store_failing:
            await bot.store.wait_for_change()
        status, body = await get_json(app, "/healthz")
        assert status == 503
        assert body["reason"] == "store_unwritable"
        assert body["store"]["last_error"] == "StoreUnavailable"
        assert "sqlite3" not in json.dumps(body)  # no path, no message text
        # Writable again: the batch commits on its next try, the message is answered.
        bot.store._db.execute("PRAGMA query_only = OFF")
        await until_handled(bot.store, "$lost")
        status, body = await get_json(app, "/healthz")
        assert status == 200, body


def parsed(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


async def test_metrics_count_a_scripted_run_exactly(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, settings: Settings
) -> None:
    home = chat("c_home", HOME)
    await seed_store(settings.store_path, chats=[home], token="s0")
    hs.add_room(HOME, marker=marker_content(home))
    hs.clock_base_ms = BASE_TS  # the server's clock: answers carry a Date header
    answered = [text_event(f"$a{i}", ALICE, f"question {i}", ts=BASE_TS) for i in range(5)]
    ignored = [text_event(f"$i{i}", EVE, f"not allowed {i}", ts=BASE_TS) for i in range(3)]
    junk = text_event("$junk", ALICE, "x", ts=BASE_TS)
    junk["content"]["body"] = 5  # not a string: quarantined at intake

    async with running_bot(settings, hs) as bot:
        app = ops_app(bot.runtime)
        await trio.sleep(2)  # two seconds after the server's clock started
        hs.queue_sync({HOME: [*answered[:3], *ignored, junk]})
        hs.queue_sync({HOME: answered[3:]})
        await until_handled(bot.store, *[e["event_id"] for e in answered + ignored])
        status, body = await get(app, "/metrics")
        assert status == 200
        text = body.decode()

    found = parsed(text)

    def value(name: str, **labels: str) -> float:
        return found.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("surfaces_messages_received_total", kind="message") == 8
    assert value("surfaces_messages_received_total", kind="invite") == 0
    assert value("surfaces_messages_handled_total", outcome="replied") == 5
    assert value("surfaces_messages_handled_total", outcome="ignored") == 3
    for outcome in ("notified", "failed", "quarantined"):
        assert value("surfaces_messages_handled_total", outcome=outcome) == 0
    assert value("surfaces_messages_quarantined_total", reason="malformed") == 1
    assert value("surfaces_messages_quarantined_total", reason="handling_error") == 0
    # Echo answers at once: each answer's latency is the virtual time since the message.
    assert value("surfaces_answer_latency_seconds_count", backend="echo") == 5
    assert value("surfaces_answer_latency_seconds_sum", backend="echo") >= 5 * 2
    assert value("surfaces_sync_lag_seconds_count") == 8
    # One send per answer, each counted under its template and never its room.
    send = "/_matrix/client/v3/rooms/{}/send/{}/{}"
    assert value("surfaces_matrix_requests_total", method="PUT", endpoint=send, status="200") == 5
    assert value("surfaces_matrix_rate_limited_total") == 0
    assert value("surfaces_sync_requests_total") >= 2
    assert value("surfaces_inbox_depth") == 0
    assert value("surfaces_chats_managed") == 1
    assert value("surfaces_spaces_managed") == 0
    assert value("surfaces_reconcile_last", count="known") == 1
    assert value("surfaces_ready") == 1
    assert value("surfaces_healthy") == 1
    assert value("surfaces_phase", phase="ready") == 1
    for secret in ("!home", "hs.test", "alice", "question", "$a"):
        assert secret not in text
