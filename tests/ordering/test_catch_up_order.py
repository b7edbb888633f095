"""Messages sent while the bot was down come with the initial sync: they are answered after
reconciliation, each room's in timeline order (issue item 7)."""

from __future__ import annotations

import itertools

import trio

from bot.chats import marker_content
from bot.config import Settings
from fake_homeserver import ALICE, BASE_TS, BOT, FakeHomeserver, notice_event, text_event
from ordering_harness import Logs, chat, only_log, running_bot, seed_store, until_handled

A = "!a:hs.test"
B = "!b:hs.test"
BOB = "@bob:hs.test"
MALLORY = "@mallory:elsewhere.test"  # not allowed: ignored, never answered


async def test_messages_from_the_initial_sync_are_answered_after_reconciliation_in_order(
    autojump_clock: trio.abc.Clock,
    hs: FakeHomeserver,
    logs: Logs,
    settings: Settings,
) -> None:
    a, b = chat("c_a", A), chat("c_b", B)
    await seed_store(settings.store_path, chats=[a, b], token="s0")
    timeline_a = [
        text_event("$a1", ALICE, "first", ts=BASE_TS + 1),
        notice_event("$a-old", BOT, "an old answer", reply_to="$a0", ts=BASE_TS + 2),
        text_event("$a2", ALICE, "second", ts=BASE_TS + 3),
        text_event("$a-no", MALLORY, "let me in", ts=BASE_TS + 4),
        text_event("$a3", BOB, "third", ts=BASE_TS + 5),
    ]
    timeline_b = [
        text_event("$b1", BOB, "uno", ts=BASE_TS + 1),
        text_event("$b2", ALICE, "dos", ts=BASE_TS + 2),
        text_event("$b3", BOB, "tres", ts=BASE_TS + 3),
    ]
    hs.add_room(A, marker=marker_content(a), timeline=timeline_a)
    hs.add_room(B, marker=marker_content(b), timeline=timeline_b)
    # Slow sends: the two rooms' answers overlap in time, each room in its own lane.
    hs.delays["send"] = 1.0

    async with running_bot(settings, hs) as bot:
        await until_handled(bot.store, "$a3", "$b3")
        assert await bot.store.pending() == []
        assert await bot.store.handled_outcome("$a-no") == "ignored"

    (initial,) = hs.of("initial_sync")
    assert initial.query["since"] == "s0"
    reconciled, _ = only_log(logs, "matrix_reconcile_complete")
    ready, _ = only_log(logs, "bot_ready")
    assert reconciled < ready
    sends = hs.of("send")
    assert sends
    assert all(call.after_log(ready) for call in sends)
    assert [(r.reply_to, r.body) for r in hs.sent_in(A)] == [
        ("$a1", "first"),
        ("$a2", "second"),
        ("$a3", "third"),
    ]
    assert [(r.reply_to, r.body) for r in hs.sent_in(B)] == [
        ("$b1", "uno"),
        ("$b2", "dos"),
        ("$b3", "tres"),
    ]
    # Within a room, one answer at a time: each send starts after the previous one ended.
    for room in (A, B):
        in_room = [call for call in sends if call.room_id == room]
        for earlier, later in itertools.pairwise(in_room):
            assert earlier.ended is not None
            assert earlier.ended <= later.at
