"""Reconciliation and repair only read (issue item 6).

Every test in this directory checks, through the ``hs`` fixture, that no room or Space is created
or linked and that no marker is written before ``matrix_reconcile_complete``. This test gives
those checks the hardest start-up to watch: every kind of report entry, both repair outcomes,
and an invite, the one thing that rightly writes a marker, after reconciliation.
"""

from __future__ import annotations

import trio

from bot.chats import CHAT_MARKER, marker_content
from bot.config import Settings
from fake_homeserver import ALICE, FakeHomeserver, text_event
from ordering_harness import Logs, chat, only_log, running_bot, seed_store, until_handled

READS_DURING_RECONCILIATION = {"whoami", "initial_sync", "joined_rooms"}


async def test_reconciliation_and_repair_only_read_markers(
    autojump_clock: trio.abc.Clock,
    hs: FakeHomeserver,
    logs: Logs,
    settings: Settings,
) -> None:
    known = chat("c_known", "!known:hs.test")
    moved = chat("c_moved", "!old-place:hs.test")
    stale = chat("c_stale", "!unmarked:hs.test")
    gone = chat("c_gone", "!gone:hs.test")
    lost = chat("c_lost", "!lost:hs.test")
    await seed_store(settings.store_path, chats=[known, moved, stale, gone], token="s0")
    hs.add_room(known.room_id, marker=marker_content(known))
    hs.add_room("!new-place:hs.test", marker=marker_content(chat("c_moved", "!new-place:hs.test")))
    hs.add_room(stale.room_id)  # joined, but its marker is gone from the server
    hs.add_room("!broken:hs.test", marker={"version": 99, "chat_id": "c_future"})
    hs.add_room("!twin:hs.test", marker=marker_content(chat("c_known", "!twin:hs.test")))
    hs.add_room(lost.room_id, marker=marker_content(lost), marker_in_sync=False)
    hs.add_room("!stranger:hs.test")
    hs.add_invite("!invited:hs.test", ALICE)

    async with running_bot(settings, hs) as bot:
        hs.queue_sync(
            {
                lost.room_id: [text_event("$lost", ALICE, "restore me")],
                "!stranger:hs.test": [text_event("$stranger", ALICE, "who are you?")],
            }
        )
        await until_handled(bot.store, "$lost", "$stranger")
        await hs.wait_for(lambda call: call.endpoint == "join", ended=True)

    reconciled, report = only_log(logs, "matrix_reconcile_complete")
    assert (report["restored"], report["known"], report["skipped"]) == (1, 1, 4)
    assert sorted(note["reason"] for note in report["conflict_rooms"]) == [
        "duplicate_chat_id",
        "local_disagrees",
        "room_left",
    ]
    during = {call.endpoint for call in hs.calls if not call.after_log(reconciled)}
    assert during <= READS_DURING_RECONCILIATION
    assert "joined_rooms" in during
    # Repair read one marker per unknown room, with GET only.
    gets = hs.of("get_room_account_data")
    assert {(call.room_id, call.event_type) for call in gets} >= {
        (lost.room_id, CHAT_MARKER),
        ("!stranger:hs.test", CHAT_MARKER),
    }
    assert all(call.after_log(reconciled) for call in gets)
    # The only write: the invite's marker, after reconciliation, then the join.
    (write,) = hs.account_data_writes()
    assert (write.room_id, write.event_type) == ("!invited:hs.test", CHAT_MARKER)
    assert write.after_log(reconciled)
    (join,) = hs.of("join")
    assert join.room_id == "!invited:hs.test"
    assert hs.calls.index(write) < hs.calls.index(join)
    assert hs.provisioning_calls() == []
