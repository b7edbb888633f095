"""The reconciliation report: recoverable trouble does not stop start-up, and the report is
logged once with every field (issue items 3 and 4)."""

from __future__ import annotations

import trio

from bot.chats import marker_content
from bot.config import Settings
from bot.runtime import Phase
from fake_homeserver import ALICE, FakeHomeserver, text_event
from ordering_harness import Logs, chat, only_log, running_bot, seed_store, until_handled

PLAIN = "!plain:hs.test"
BROKEN = "!broken:hs.test"
TWIN_A = "!twin-a:hs.test"
TWIN_B = "!twin-b:hs.test"
GOOD = "!good:hs.test"


async def test_skips_and_conflicts_are_reported_and_startup_reaches_the_sync_loop(
    autojump_clock: trio.abc.Clock,
    hs: FakeHomeserver,
    logs: Logs,
    settings: Settings,
) -> None:
    hs.add_room(PLAIN)  # no marker
    hs.add_room(BROKEN, marker={"version": 1, "chat_id": 42, "owner": ALICE})
    # Two rooms claim one chat id; listed in the "wrong" order on purpose.
    hs.add_room(TWIN_B, marker=marker_content(chat("c_twin", TWIN_B)))
    hs.add_room(TWIN_A, marker=marker_content(chat("c_twin", TWIN_A)))
    hs.add_room(GOOD, marker=marker_content(chat("c_good", GOOD)))

    async with running_bot(settings, hs) as bot:
        assert bot.runtime.phase.value is Phase.READY
        hs.queue_sync({GOOD: [text_event("$hello", ALICE, "hello")]})
        await until_handled(bot.store, "$hello")
        assert {c.chat_id: c.room_id for c in bot.store.chats()} == {
            "c_twin": TWIN_A,
            "c_good": GOOD,
        }

    reconciled, report = only_log(logs, "matrix_reconcile_complete")
    assert report["log_level"] == "warning"  # it has a conflict: the operator is told
    counts = {key: report[key] for key in ("rooms_seen", "restored", "known", "updated")}
    assert counts == {"rooms_seen": 5, "restored": 2, "known": 0, "updated": 0}
    assert (report["skipped"], report["conflicts"]) == (2, 1)
    assert sorted(report["skipped_rooms"], key=lambda note: note["room_id"]) == [
        {
            "room_id": BROKEN,
            "chat_id": None,
            "reason": "bad_marker",
            "detail": "chat_id missing or not a string",
        },
        {"room_id": PLAIN, "chat_id": None, "reason": "no_marker", "detail": ""},
    ]
    assert report["conflict_rooms"] == [
        {
            "room_id": TWIN_B,
            "chat_id": "c_twin",
            "reason": "duplicate_chat_id",
            "detail": f"chat id also claimed by {TWIN_A}, which keeps it",
        }
    ]
    # ... and start-up went on to the sync loop, which answered a message.
    ready, _ = only_log(logs, "bot_ready")
    assert reconciled < ready
    assert any(call.after_log(ready) for call in hs.of("long_poll"))
    assert [(sent.room_id, sent.reply_to) for sent in hs.sent] == [(GOOD, "$hello")]


async def test_the_report_is_logged_once_with_all_its_fields(
    autojump_clock: trio.abc.Clock,
    hs: FakeHomeserver,
    logs: Logs,
    settings: Settings,
) -> None:
    known = chat("c_known", "!known:hs.test")
    renamed = chat("c_renamed", "!renamed:hs.test", title="Old title")
    gone = chat("c_gone", "!gone:hs.test")
    new = chat("c_new", "!new:hs.test")
    await seed_store(settings.store_path, chats=[known, renamed, gone], token="s0")
    hs.add_room(known.room_id, marker=marker_content(known))
    hs.add_room(renamed.room_id, marker=marker_content(renamed.with_title("New title")))
    hs.add_room(new.room_id, marker=marker_content(new))
    hs.add_room(PLAIN)
    hs.add_invite("!invited:hs.test", ALICE)

    async with running_bot(settings, hs) as bot:
        # The invite is taken after start-up (a marker written, the room joined, a greeting).
        await hs.wait_for(lambda call: call.endpoint == "send", ended=True)
        runtime_report = bot.runtime.reconcile_report

    reconciled, entry = only_log(logs, "matrix_reconcile_complete")
    assert reconciled < only_log(logs, "bot_ready")[0]
    # A conflict (the room left) needs the operator: the line is a warning.
    assert (entry["event"], entry["log_level"]) == ("matrix_reconcile_complete", "warning")
    expected = {
        "rooms_seen": 4,
        "restored": 1,
        "known": 1,
        "updated": 1,
        "skipped": 1,
        "conflicts": 1,
        "pending_invites": 1,
        "skipped_rooms": [{"room_id": PLAIN, "chat_id": None, "reason": "no_marker", "detail": ""}],
        "conflict_rooms": [
            {
                "room_id": gone.room_id,
                "chat_id": "c_gone",
                "reason": "room_left",
                "detail": "the bot is not in the room",
            }
        ],
    }
    assert {key: entry.get(key) for key in expected} == expected
    assert isinstance(entry["duration_ms"], float)
    assert entry["duration_ms"] >= 0
    # The log entry is the report the runtime keeps, field for field.
    assert runtime_report is not None
    fields = {key: value for key, value in entry.items() if key not in ("event", "log_level")}
    assert fields == runtime_report.log_fields()
