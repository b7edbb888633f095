"""A message in a room the store does not know: one marker read, then an answer or a notice
(issue item 5). Repair reads; it never creates or writes anything."""

from __future__ import annotations

import trio

from bot.chats import CHAT_MARKER, marker_content
from bot.config import Settings
from bot.handler import REPAIR_FAILED_NOTICE, REPAIR_NOTICE_QUIET_S
from bot.runtime import Phase
from fake_homeserver import ALICE, FakeHomeserver, text_event
from ordering_harness import Logs, chat, only_log, running_bot, seed_store, until_handled

HOME = "!home:hs.test"
LOST = "!lost:hs.test"
STRANGER = "!stranger:hs.test"


async def test_a_room_whose_marker_the_initial_sync_missed_is_restored_from_the_server(
    autojump_clock: trio.abc.Clock,
    hs: FakeHomeserver,
    logs: Logs,
    settings: Settings,
) -> None:
    home, lost = chat("c_home", HOME), chat("c_lost", LOST)
    await seed_store(settings.store_path, chats=[home], token="s0")
    hs.add_room(HOME, marker=marker_content(home))
    # The server has the marker, but the initial sync did not deliver it.
    hs.add_room(LOST, marker=marker_content(lost), marker_in_sync=False)

    async with running_bot(settings, hs) as bot:
        assert bot.store.chat_for_room(LOST) is None
        hs.queue_sync({LOST: [text_event("$q1", ALICE, "anyone there?")]})
        await until_handled(bot.store, "$q1")
        assert bot.store.chat_for_room(LOST) == lost
        # A second message finds the chat in the store: no second marker read.
        hs.queue_sync({LOST: [text_event("$q2", ALICE, "and again")]})
        await until_handled(bot.store, "$q2")

    _, report = only_log(logs, "matrix_reconcile_complete")
    assert {"room_id": LOST, "chat_id": None, "reason": "no_marker", "detail": ""} in report[
        "skipped_rooms"
    ]
    ready, _ = only_log(logs, "bot_ready")
    (get,) = hs.of("get_room_account_data")
    assert (get.room_id, get.event_type, get.status) == (LOST, CHAT_MARKER, 200)
    assert get.after_log(ready)
    replies = hs.sent_in(LOST)
    assert [(r.reply_to, r.body, r.msgtype) for r in replies] == [
        ("$q1", "anyone there?", "m.notice"),
        ("$q2", "and again", "m.notice"),
    ]
    (first_send, *_) = hs.of("send")
    assert get.ended is not None
    assert get.ended <= first_send.at
    # Dispatched against the recovered chat id.
    _, repaired = only_log(logs, "chat_repaired")
    assert (repaired["room_id"], repaired["sender"], repaired["chat_id"]) == (LOST, ALICE, "c_lost")
    handled = [e for e in logs if e["event"] == "message_handled" and e["event_id"] == "$q1"]
    assert [(e["room_id"], e["chat_id"]) for e in handled] == [(LOST, "c_lost")]
    assert "chat_repair_failed" not in [e["event"] for e in logs]
    assert hs.account_data_writes() == []


async def test_a_room_without_a_marker_anywhere_gets_one_notice_and_the_bot_goes_on(
    autojump_clock: trio.abc.Clock,
    hs: FakeHomeserver,
    logs: Logs,
    settings: Settings,
) -> None:
    home = chat("c_home", HOME)
    await seed_store(settings.store_path, chats=[home], token="s0")
    hs.add_room(HOME, marker=marker_content(home))
    hs.add_room(STRANGER)  # no marker in the sync, none on the server: GET answers 404

    async with running_bot(settings, hs) as bot:
        hs.queue_sync({STRANGER: [text_event("$who", ALICE, "hello?")]})
        await until_handled(bot.store, "$who")
        hs.queue_sync({HOME: [text_event("$later", ALICE, "still there?")]})
        await until_handled(bot.store, "$later")
        assert bot.runtime.phase.value is Phase.READY
        assert await bot.store.handled_outcome("$who") == "notified"
        assert await bot.store.handled_outcome("$later") == "replied"
        assert bot.store.chat_for_room(STRANGER) is None
        assert await bot.store.pending() == []

    (get,) = hs.of("get_room_account_data")
    assert (get.room_id, get.event_type, get.status) == (STRANGER, CHAT_MARKER, 404)
    _, warning = only_log(logs, "chat_repair_failed")
    assert warning["log_level"] == "warning"
    assert (warning["room_id"], warning["event_id"], warning["sender"]) == (STRANGER, "$who", ALICE)
    assert warning["repair"] == {
        "ok": False,
        "chat_id": None,
        "reason": "no chat marker on the server",
    }
    (notice,) = hs.sent_in(STRANGER)
    assert notice.event_type == "m.room.message"
    assert (notice.msgtype, notice.body, notice.reply_to) == (
        "m.notice",
        REPAIR_FAILED_NOTICE,
        "$who",
    )
    assert [(r.reply_to, r.body) for r in hs.sent_in(HOME)] == [("$later", "still there?")]
    failures = {"job_failed", "job_given_up", "job_retry_later"}
    assert failures.isdisjoint(e["event"] for e in logs)
    assert hs.account_data_writes() == []


async def test_repair_does_not_take_a_chat_id_another_room_holds(
    autojump_clock: trio.abc.Clock,
    hs: FakeHomeserver,
    logs: Logs,
    settings: Settings,
) -> None:
    twin_a = chat("c_twin", "!twin-a:hs.test")
    await seed_store(settings.store_path, chats=[twin_a], token="s0")
    hs.add_room(twin_a.room_id, marker=marker_content(twin_a))
    # A second room whose marker (not in the sync) claims the same chat id.
    copy = chat("c_twin", "!twin-b:hs.test")
    hs.add_room(copy.room_id, marker=marker_content(copy), marker_in_sync=False)

    async with running_bot(settings, hs) as bot:
        hs.queue_sync({copy.room_id: [text_event("$dup", ALICE, "which chat is this?")]})
        await until_handled(bot.store, "$dup")
        assert bot.store.chats() == [twin_a]

    (get,) = hs.of("get_room_account_data")
    assert get.room_id == copy.room_id
    _, warning = only_log(logs, "chat_repair_failed")
    assert warning["repair"] == {
        "ok": False,
        "chat_id": "c_twin",
        "reason": f"chat id c_twin is held by room {twin_a.room_id}",
    }
    (notice,) = hs.sent_in(copy.room_id)
    assert (notice.msgtype, notice.body) == ("m.notice", REPAIR_FAILED_NOTICE)
    assert hs.account_data_writes() == []


async def test_an_unrepairable_room_gets_one_notice_per_quiet_period_and_every_message_recorded(
    autojump_clock: trio.abc.Clock,
    hs: FakeHomeserver,
    logs: Logs,
    settings: Settings,
) -> None:
    home = chat("c_home", HOME)
    await seed_store(settings.store_path, chats=[home], token="s0")
    hs.add_room(HOME, marker=marker_content(home))
    hs.add_room(STRANGER)  # no marker anywhere
    lines = [text_event(f"$l{n}", ALICE, f"line {n}") for n in range(10)]

    async with running_bot(settings, hs) as bot:
        hs.queue_sync({STRANGER: lines})
        await until_handled(bot.store, *[event["event_id"] for event in lines])
        outcomes = [await bot.store.handled_outcome(f"$l{n}") for n in range(10)]
        # A command in such a room is no different: recorded, no crash, no second notice.
        hs.queue_sync({STRANGER: [text_event("$rename", ALICE, "!rename Mine")]})
        await until_handled(bot.store, "$rename")
        renamed = await bot.store.handled_outcome("$rename")
        await trio.sleep(REPAIR_NOTICE_QUIET_S)
        hs.queue_sync({STRANGER: [text_event("$later", ALICE, "still nobody?")]})
        await until_handled(bot.store, "$later")
        later = await bot.store.handled_outcome("$later")
        assert bot.runtime.phase.value is Phase.READY

    assert outcomes == ["notified"] + ["ignored"] * 9
    assert renamed == "ignored"
    assert later == "notified"  # a new quiet period: told again
    assert [notice.reply_to for notice in hs.sent_in(STRANGER)] == ["$l0", "$later"]
    assert all(n.body == REPAIR_FAILED_NOTICE for n in hs.sent_in(STRANGER))
    warnings = [e for e in logs if e["event"] == "chat_repair_failed"]
    assert [w["event_id"] for w in warnings] == ["$l0", "$later"]
    # Each message still tried its own repair: a marker put back is found at once.
    assert len(hs.of("get_room_account_data")) == 12
    assert hs.account_data_writes() == []
