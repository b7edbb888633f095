"""Start-up order: initial sync, then reconciliation (once), then ready, then the sync loop and
the lanes; nothing takes a message against a half-restored chat map (issue items 1 and 2)."""

from __future__ import annotations

from functools import partial

import trio

from bot.chats import marker_content
from bot.config import Settings
from bot.runtime import BotRuntime, Phase, run_bot
from fake_homeserver import ALICE, Call, FakeHomeserver, text_event
from ordering_harness import (
    Logs,
    bot_parts,
    chat,
    only_log,
    reply_to,
    running_bot,
    seed_store,
    ticking,
    until_handled,
)

HOME = "!home:hs.test"
GONE = "!gone:hs.test"


async def test_initial_sync_then_one_reconciliation_then_ready_then_sync_loop_and_dispatch(
    autojump_clock: trio.abc.Clock,
    hs: FakeHomeserver,
    logs: Logs,
    settings: Settings,
) -> None:
    home = chat("c_home", HOME)
    await seed_store(settings.store_path, chats=[home], token="s0")
    hs.add_room(
        HOME, marker=marker_content(home), timeline=[text_event("$down", ALICE, "while away")]
    )

    async with ticking() as tasks:
        runtime: BotRuntime = await tasks.start(
            partial(run_bot, settings, transport=hs.transport())
        )
        hs.queue_sync({HOME: [text_event("$live", ALICE, "and now")]})
        await hs.wait_for(reply_to("$live"), ended=True)
        runtime.request_stop()

    # Reconciliation ran exactly once: one report logged, one full-state sync in the run.
    reconciled, _ = only_log(logs, "matrix_reconcile_complete")
    (initial,) = hs.of("initial_sync")
    assert initial.query["since"] == "s0"
    assert runtime.reconcile_report is not None
    assert [note.room_id for note in runtime.reconcile_report.known] == [HOME]
    ready, _ = only_log(logs, "bot_ready")
    assert reconciled < ready
    # Before reconciliation completed: authentication, the device's encryption keys
    # (made on this first start: is the device new to the server? then published),
    # and the initial sync; nothing else.
    before = [call.endpoint for call in hs.calls if not call.after_log(reconciled)]
    assert before == ["whoami", "keys_query", "keys_upload", "initial_sync"]
    # The sync loop and the lanes only exist after the bot said it was ready.
    long_polls, sends = hs.of("long_poll"), hs.of("send")
    assert long_polls
    assert sends
    assert all(call.after_log(ready) for call in long_polls + sends)
    assert hs.calls.index(long_polls[0]) > hs.calls.index(initial)
    assert [sent.reply_to for sent in hs.sent] == ["$down", "$live"]
    assert runtime.phase.value is Phase.STOPPED


async def test_the_ready_gate_is_set_once_after_reconciliation_and_before_any_message(
    autojump_clock: trio.abc.Clock,
    hs: FakeHomeserver,
    logs: Logs,
    settings: Settings,
) -> None:
    home = chat("c_home", HOME)
    # GONE is in the store but not in the initial sync: reconciliation asks joined_rooms,
    # and that answer takes a while, so an early gate would open while it waits.
    await seed_store(
        settings.store_path,
        chats=[home, chat("c_gone", GONE)],
        token="s0",
        inbox=[(HOME, text_event("$before", ALICE, "asked before the restart"))],
    )
    hs.add_room(
        HOME, marker=marker_content(home), timeline=[text_event("$down", ALICE, "while away")]
    )
    hs.delays["joined_rooms"] = 30.0
    seen_at_ready: list[tuple[list[str], list[str], int]] = []

    async with ticking() as tasks, bot_parts(settings, hs) as (runtime, _):

        async def watch_gate() -> None:
            await runtime.ready.wait()
            seen_at_ready.append(
                (
                    [entry["event"] for entry in logs],
                    [call.endpoint for call in hs.calls],
                    len(hs.sent),
                )
            )

        tasks.start_soon(watch_gate)
        await tasks.start(runtime.run)
        await hs.wait_for(reply_to("$down"), ended=True)
        runtime.request_stop()

    ((events, endpoints, sent),) = seen_at_ready
    # Set after reconciliation was logged and the initial batch went into the inbox...
    assert "matrix_reconcile_complete" in events
    assert runtime.ready.is_set()
    # ... and before any lane or long-poll took anything.
    assert "long_poll" not in endpoints
    assert sent == 0
    assert "bot_ready" not in events


async def test_slow_reconciliation_holds_back_the_sync_loop_and_the_pending_inbox(
    autojump_clock: trio.abc.Clock,
    hs: FakeHomeserver,
    logs: Logs,
    settings: Settings,
) -> None:
    """Fails if the sync loop or the lanes started before reconciliation finished: the
    confirming joined_rooms request takes 30 virtual seconds, and nothing may overtake it."""
    home = chat("c_home", HOME)
    # GONE is in the store but not in the initial sync: reconciliation asks joined_rooms.
    await seed_store(
        settings.store_path,
        chats=[home, chat("c_gone", GONE)],
        token="s0",
        inbox=[(HOME, text_event("$before", ALICE, "asked before the restart"))],
    )
    hs.add_room(
        HOME, marker=marker_content(home), timeline=[text_event("$down", ALICE, "while away")]
    )
    hs.delays["joined_rooms"] = 30.0
    phase_at: list[tuple[str, Phase]] = []

    def watch(runtime: BotRuntime) -> None:
        def observe(call: Call) -> None:
            phase_at.append((call.endpoint, runtime.phase.value))

        hs.observers.append(observe)

    async with running_bot(settings, hs, before_start=watch) as bot:
        # Bounded, so that a runtime in the wrong order fails on the assertions below.
        with trio.move_on_after(300):
            await until_handled(bot.store, "$down")
            # The sync loop starts beside the lanes: wait for its first request too.
            await hs.wait_for(lambda call: call.endpoint == "long_poll")
        assert bot.store.chat_by_id("c_gone") is None
        assert bot.store.chat_by_id("c_home") == home

    (joined,) = hs.of("joined_rooms")
    assert joined.ended is not None
    assert joined.ended - joined.at >= 30.0
    long_polls, sends = hs.of("long_poll"), hs.of("send")
    assert [c.at for c in long_polls if c.at < joined.ended] == []
    assert [c.at for c in sends if c.at < joined.ended] == []
    assert long_polls
    assert sends

    reconciled, report = only_log(logs, "matrix_reconcile_complete")
    ready, _ = only_log(logs, "bot_ready")
    assert not joined.after_log(reconciled)
    assert reconciled < ready
    assert report["conflict_rooms"] == [
        {
            "room_id": GONE,
            "chat_id": "c_gone",
            "reason": "room_left",
            "detail": "the bot is not in the room",
        }
    ]
    assert all(call.after_log(ready) for call in long_polls + sends)
    # The item left in the inbox by the previous run is answered after reconciliation, and
    # before what the initial sync brought in after it.
    assert [sent.reply_to for sent in hs.sent] == ["$before", "$down"]

    first_phase = dict(reversed(phase_at))
    assert first_phase["initial_sync"] is Phase.STARTING
    assert first_phase["joined_rooms"] is Phase.RECONCILING
    assert first_phase["long_poll"] is Phase.READY
    assert first_phase["send"] is Phase.READY
