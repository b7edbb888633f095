"""Per-user limits on the mock clock: the message bucket (one notice per episode, the rest
recorded as handled without an answer, other users untouched) and the cap on chats.

The bucket counts the time a message was sent (its ``origin_server_ts``), not the time the
bot handles it: the tests give each burst its own timestamps, and the mock clock's jumps
change nothing.
"""

from __future__ import annotations

import email.utils
import itertools
from dataclasses import replace
from typing import Any

import trio

from bot.chats import Chat, marker_content
from bot.config import Settings
from bot.handler import RATE_LIMITED
from bot.store import Store
from fake_homeserver import ALICE, BASE_TS, FakeHomeserver, Sent, text_event
from ordering_harness import (
    Logs,
    chat,
    only_log,
    reply_to,
    running_bot,
    seed_store,
    until_handled,
)

BOB = "@bob:hs.test"
ROOM = "!alice:hs.test"
BOB_ROOM = "!bob:hs.test"
SECRET = "my secret words"
REFILL_S = 400.0  # 20 tokens at one every 20 s


def _limited(settings: Settings, **changes: Any) -> Settings:
    return replace(settings, user_messages_burst=20, user_messages_per_s=0.05, **changes)


async def _chats(settings: Settings, hs: FakeHomeserver, *chats: Chat) -> None:
    await seed_store(settings.store_path, chats=chats, token="s0")
    for one in chats:
        hs.add_room(one.room_id, marker=marker_content(one))


def _burst(
    prefix: str, sender: str, count: int, body: str = SECRET, *, at_s: float = 0.0
) -> list[dict[str, Any]]:
    """``count`` messages sent within one millisecond, ``at_s`` after the first burst."""
    ts = BASE_TS + int(at_s * 1000)
    return [text_event(f"${prefix}{n}", sender, f"{body} {n}", ts=ts) for n in range(count)]


async def _outcomes(store: Store, events: list[dict[str, Any]]) -> list[str | None]:
    return [await store.handled_outcome(event["event_id"]) for event in events]


def _reason(store: Store, event_id: str) -> str | None:
    row = store._db.execute("SELECT reason FROM events WHERE event_id = ?", (event_id,)).fetchone()
    return None if row is None else row[0]


def _notices(hs: FakeHomeserver, room: str) -> list[Sent]:
    return [sent for sent in hs.sent_in(room) if sent.txn_id.startswith("sb.rate_limit.")]


async def test_a_burst_of_25_gets_20_answers_one_notice_and_5_recorded_unanswered(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, settings: Settings, logs: Logs
) -> None:
    settings = _limited(settings)
    await _chats(settings, hs, chat("c1", ROOM))
    burst = _burst("m", ALICE, 25)
    async with running_bot(settings, hs) as bot:
        hs.queue_sync({ROOM: burst})
        await until_handled(bot.store, *[event["event_id"] for event in burst])
        outcomes = await _outcomes(bot.store, burst)
        reasons = [_reason(bot.store, event["event_id"]) for event in burst]

    assert outcomes == ["replied"] * 20 + ["notified"] + ["ignored"] * 4
    assert reasons == [None] * 20 + [RATE_LIMITED] * 5
    answered = [sent.reply_to for sent in hs.sent_in(ROOM) if sent not in _notices(hs, ROOM)]
    assert answered == [f"$m{n}" for n in range(20)]
    [notice] = _notices(hs, ROOM)
    assert notice.reply_to == "$m20"
    assert notice.msgtype == "m.notice"
    assert notice.content["m.mentions"] == {"user_ids": [ALICE]}
    assert "20 messages" in (notice.body or "")
    assert SECRET not in (notice.body or "")
    # The unanswered ones are marked read, like any message handled without a reply.
    assert hs.of("receipt")
    _, entry = only_log(logs, "user_rate_limited")
    assert entry["sender"] == ALICE
    assert entry["room_id"] == ROOM
    assert not any(SECRET in str(value) for log in logs for value in log.values())


async def test_tokens_come_back_with_time_and_a_new_episode_gets_a_new_notice(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, settings: Settings
) -> None:
    settings = _limited(settings)
    await _chats(settings, hs, chat("c1", ROOM))
    first = _burst("a", ALICE, 21)
    second = _burst("b", ALICE, 2, at_s=20.0)
    third = _burst("c", ALICE, 21, at_s=20.0 + REFILL_S)
    async with running_bot(settings, hs) as bot:
        hs.queue_sync({ROOM: first})
        await until_handled(bot.store, *[event["event_id"] for event in first])
        assert len(_notices(hs, ROOM)) == 1

        # Sent 20 s later, one token back: one answer; the same episode, no second notice.
        hs.queue_sync({ROOM: second})
        await until_handled(bot.store, *[event["event_id"] for event in second])
        assert await _outcomes(bot.store, second) == ["replied", "ignored"]
        assert len(_notices(hs, ROOM)) == 1

        # Sent when it is full again: a whole burst answered, the next episode told again.
        hs.queue_sync({ROOM: third})
        await hs.wait_for(reply_to("$c20"), ended=True)
        await until_handled(bot.store, *[event["event_id"] for event in third])
        assert await _outcomes(bot.store, third) == ["replied"] * 20 + ["notified"]

    assert [notice.reply_to for notice in _notices(hs, ROOM)] == ["$a20", "$c20"]


async def test_one_users_burst_does_not_limit_another_user(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, settings: Settings, logs: Logs
) -> None:
    settings = _limited(settings)
    await _chats(settings, hs, chat("c1", ROOM), chat("c2", BOB_ROOM, owner=BOB))
    alices, bobs = _burst("a", ALICE, 40), _burst("b", BOB, 20)
    async with running_bot(settings, hs) as bot:
        hs.queue_sync({ROOM: alices, BOB_ROOM: bobs})
        await until_handled(bot.store, *[event["event_id"] for event in alices + bobs])
        alice_outcomes = await _outcomes(bot.store, alices)
        bob_outcomes = await _outcomes(bot.store, bobs)

    assert alice_outcomes == ["replied"] * 20 + ["notified"] + ["ignored"] * 19
    assert bob_outcomes == ["replied"] * 20
    assert _notices(hs, BOB_ROOM) == []
    assert len(_notices(hs, ROOM)) == 1
    assert only_log(logs, "user_rate_limited")[1]["sender"] == ALICE


async def test_commands_count_too(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, settings: Settings
) -> None:
    settings = _limited(settings)
    await _chats(settings, hs, chat("c1", ROOM))
    commands = [text_event(f"$h{n}", ALICE, "!help") for n in range(20)]
    commands.append(text_event("$new", ALICE, "!new one too many"))
    async with running_bot(settings, hs) as bot:
        hs.queue_sync({ROOM: commands})
        await until_handled(bot.store, *[event["event_id"] for event in commands])
        outcomes = await _outcomes(bot.store, commands)

    assert outcomes == ["replied"] * 20 + ["notified"]
    # The hs fixture checks that no room was created: the `!new` never ran.
    assert [notice.reply_to for notice in _notices(hs, ROOM)] == ["$new"]


async def test_admins_are_limited_too_unless_the_setting_exempts_them(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, settings: Settings
) -> None:
    await _chats(settings, hs, chat("c1", ROOM))
    burst = _burst("m", ALICE, 21)
    later = _burst("n", ALICE, 25)
    admin = _limited(settings, admins=frozenset({ALICE}))
    async with running_bot(admin, hs) as bot:
        hs.queue_sync({ROOM: burst})
        await until_handled(bot.store, *[event["event_id"] for event in burst])
        assert (await _outcomes(bot.store, burst))[-1] == "notified"

    exempt = _limited(settings, admins=frozenset({ALICE}), limits_exempt_admins=True)
    async with running_bot(exempt, hs) as bot:
        hs.queue_sync({ROOM: later})
        await until_handled(bot.store, *[event["event_id"] for event in later])
        assert await _outcomes(bot.store, later) == ["replied"] * 25


async def test_messages_written_slowly_while_the_bot_was_down_are_all_answered(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, settings: Settings
) -> None:
    settings = _limited(settings)
    await _chats(settings, hs, chat("c1", ROOM))
    # Thirty messages, one a minute, all waiting when the bot starts: a catch-up, not a
    # burst, since the bucket counts when they were written.
    backlog = [
        text_event(f"$w{n}", ALICE, f"written {n}", ts=BASE_TS + n * 60_000) for n in range(30)
    ]
    hs.add_room(ROOM, marker=marker_content(chat("c1", ROOM)), timeline=backlog)
    async with running_bot(settings, hs) as bot:
        await until_handled(bot.store, *[event["event_id"] for event in backlog])
        assert await _outcomes(bot.store, backlog) == ["replied"] * 30


async def test_a_timestamp_from_the_future_refills_nothing(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, settings: Settings
) -> None:
    settings = _limited(settings)
    await _chats(settings, hs, chat("c1", ROOM))
    hs.date = email.utils.formatdate(BASE_TS / 1000, usegmt=True)  # the server's now
    burst = _burst("m", ALICE, 21)
    # A server over federation stamps these an hour ahead, as if the bucket had refilled.
    forged = _burst("f", ALICE, 5, at_s=3600.0)
    async with running_bot(settings, hs) as bot:
        hs.queue_sync({ROOM: burst})
        await until_handled(bot.store, *[event["event_id"] for event in burst])
        hs.queue_sync({ROOM: forged})
        await until_handled(bot.store, *[event["event_id"] for event in forged])
        outcomes = await _outcomes(bot.store, forged)

    # Counted as sent now: about two seconds of refill, not an hour's.
    assert outcomes.count("replied") <= 1
    assert set(outcomes[1:]) == {"ignored"}


async def test_after_a_restart_the_buckets_start_full(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, settings: Settings
) -> None:
    settings = _limited(settings)
    await _chats(settings, hs, chat("c1", ROOM))
    before, after = _burst("m", ALICE, 21), _burst("n", ALICE, 20)
    async with running_bot(settings, hs) as bot:
        hs.queue_sync({ROOM: before})
        await until_handled(bot.store, *[event["event_id"] for event in before])
    async with running_bot(settings, hs) as bot:
        hs.queue_sync({ROOM: after})
        await until_handled(bot.store, *[event["event_id"] for event in after])
        assert await _outcomes(bot.store, after) == ["replied"] * 20


# --- the cap on chats -----------------------------------------------------------------------


def _archived(one: Chat) -> Chat:
    return replace(one, archived=True)


async def test_new_past_the_cap_is_refused_with_the_way_out(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, settings: Settings
) -> None:
    settings = replace(settings, max_chats_per_user=3)
    mine = [chat(f"c{n}", f"!r{n}:hs.test") for n in range(3)]
    # Another user's chats and Alice's archived ones are not hers to count.
    others = [chat(f"b{n}", f"!b{n}:hs.test", owner=BOB) for n in range(5)]
    await _chats(settings, hs, *mine, *others, _archived(chat("old", "!old:hs.test")))
    async with running_bot(settings, hs) as bot:
        hs.queue_sync({mine[0].room_id: [text_event("$new", ALICE, "!new Another")]})
        await until_handled(bot.store, "$new")
        assert len(bot.store.chats()) == 9

    [reply] = [sent for sent in hs.sent if sent.reply_to == "$new"]
    assert "You have 3 chats, and 3 is the most" in (reply.body or "")
    assert "!archive" in (reply.body or "")
    # The hs fixture checks that nothing was created.


async def test_archived_chats_do_not_count_toward_the_cap(
    autojump_clock: trio.abc.Clock, settings: Settings, logs: Logs
) -> None:
    # Our own server, not the fixture: this `!new` is meant to try to make a room, which
    # the fake homeserver refuses (so the user is told it did not work).
    hs = FakeHomeserver(logs)
    settings = replace(settings, max_chats_per_user=3)
    mine = [chat("c0", "!r0:hs.test"), chat("c1", "!r1:hs.test")]
    archived = [_archived(chat(f"a{n}", f"!a{n}:hs.test")) for n in range(10)]
    await _chats(settings, hs, *mine, *archived)
    async with running_bot(settings, hs) as bot:
        hs.queue_sync({mine[0].room_id: [text_event("$new", ALICE, "!new Third")]})
        await until_handled(bot.store, "$new")

    assert hs.of("create_room"), "under the cap, !new went ahead"
    [reply] = [sent for sent in hs.sent if sent.reply_to == "$new"]
    assert "most" not in (reply.body or "")


async def test_admins_are_held_to_the_cap_unless_exempt(
    autojump_clock: trio.abc.Clock, settings: Settings, logs: Logs
) -> None:
    hs = FakeHomeserver(logs)
    settings = replace(settings, max_chats_per_user=1, admins=frozenset({ALICE}))
    mine = chat("c0", "!r0:hs.test")
    await _chats(settings, hs, mine)
    async with running_bot(settings, hs) as bot:
        hs.queue_sync({mine.room_id: [text_event("$new1", ALICE, "!new")]})
        await until_handled(bot.store, "$new1")
    assert hs.of("create_room") == []
    async with running_bot(replace(settings, limits_exempt_admins=True), hs) as bot:
        hs.queue_sync({mine.room_id: [text_event("$new2", ALICE, "!new")]})
        await until_handled(bot.store, "$new2")
    assert hs.of("create_room")


async def test_unarchive_past_the_cap_is_refused(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, settings: Settings
) -> None:
    settings = replace(settings, max_chats_per_user=2)
    active = [chat("c0", "!r0:hs.test"), chat("c1", "!r1:hs.test")]
    old = _archived(chat("old", "!old:hs.test"))
    await _chats(settings, hs, *active, old)
    async with running_bot(settings, hs) as bot:
        hs.queue_sync({old.room_id: [text_event("$back", ALICE, "!unarchive")]})
        await until_handled(bot.store, "$back")
        still = bot.store.chat_by_id("old")

    assert still is not None
    assert still.archived
    [reply] = [sent for sent in hs.sent if sent.reply_to == "$back"]
    assert "You have 2 chats, and 2 is the most" in (reply.body or "")
    # Neither the marker nor the Space was touched.
    assert [call for call in hs.account_data_writes() if call.room_id == old.room_id] == []


async def test_one_new_at_a_time_per_user_so_two_at_once_cannot_both_pass_the_cap(
    autojump_clock: trio.abc.Clock, settings: Settings, logs: Logs
) -> None:
    hs = FakeHomeserver(logs)
    hs.delays["create_room"] = 5.0  # making a room takes a while (and is then refused)
    settings = replace(settings, max_chats_per_user=10)
    rooms = [chat(f"c{n}", f"!r{n}:hs.test") for n in range(3)]
    bobs = chat("b0", BOB_ROOM, owner=BOB)
    await _chats(settings, hs, *rooms, bobs)
    async with running_bot(settings, hs) as bot:
        hs.queue_sync(
            {
                **{
                    one.room_id: [text_event(f"$new{n}", ALICE, "!new")]
                    for n, one in enumerate(rooms)
                },
                BOB_ROOM: [text_event("$bobnew", BOB, "!new")],
            }
        )
        await until_handled(bot.store, "$new0", "$new1", "$new2", "$bobnew")

    alices = [call for call in hs.of("create_room") if ALICE in str(call.body)]
    assert len(alices) == 3
    # Alice's `!new`s one after the other, each after the one before was answered.
    for earlier, later in itertools.pairwise(alices):
        assert earlier.ended is not None
        assert later.at >= earlier.ended
    # Bob's did not wait for Alice's.
    [bob_call] = [call for call in hs.of("create_room") if BOB in str(call.body)]
    assert bob_call.at == alices[0].at
