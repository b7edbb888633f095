"""The runtime against a real Synapse: invites, replies, restarts, lost stores, repair."""

from __future__ import annotations

import time
import types
from pathlib import Path

import pytest
import trio
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

import bot.chats
from bot.chats import CHAT_MARKER, Chat
from bot.handler import REPAIR_FAILED_NOTICE
from bot.invites import GREETING
from bot.logging import merge_log_context
from bot.messages import IncomingMessage
from bot.runtime import Phase
from bot.store import Store
from bot_harness import Person, bot_settings, replies_to, running_bot
from command_helpers import ask, linked_room
from conftest import MakeUser
from matrix_api import MatrixClient
from matrix_api.models import RoomID, SyncToken
from matrix_api.testing.synapse import SynapseServer
from matrix_helpers import ephemeral


async def _invite_and_greet(alice: Person, bot_id: str, name: str = "chat") -> RoomID:
    room_id = await alice.client.create_room(name=name, invite=[bot_id], preset="private_chat")
    await alice.wait_until(
        lambda: any(e.content.get("body") == GREETING for e in alice.bot_notices(room_id, bot_id)),
        what="the bot's greeting",
    )
    return room_id


async def test_invite_then_chat_gets_rich_notice_replies(
    synapse: SynapseServer, make_user: MakeUser, alice: Person, tmp_path: Path
) -> None:
    bot_user = make_user("bot")
    settings = bot_settings(synapse, bot_user, tmp_path / "store.sqlite3")
    async with running_bot(settings) as runtime:
        room_id = await _invite_and_greet(alice, bot_user.user_id)
        chat = runtime._store.chat_for_room(room_id)
        assert chat is not None
        assert chat.owner == alice.user.user_id

        asked = await alice.say(room_id, "hello bot")
        await alice.wait_until(
            lambda: asked in replies_to(alice.bot_notices(room_id, bot_user.user_id)),
            what="the reply",
        )
    reply = next(
        e for e in alice.bot_notices(room_id, bot_user.user_id) if asked in replies_to([e])
    )
    assert reply.content["msgtype"] == "m.notice"
    assert reply.content["body"] == "hello bot"
    # The marker is on the server, in the bot's room account data.
    async with running_bot(settings) as runtime:
        marker = await runtime._client.get_room_account_data(room_id, CHAT_MARKER)
    assert marker["chat_id"] == chat.chat_id
    assert marker["owner"] == alice.user.user_id


async def test_store_loss_restores_chats_and_answers_missed_messages_once(
    synapse: SynapseServer, make_user: MakeUser, alice: Person, tmp_path: Path
) -> None:
    bot_user = make_user("bot")
    store_path = tmp_path / "store.sqlite3"
    settings = bot_settings(synapse, bot_user, store_path)
    async with running_bot(settings) as runtime:
        rooms = [await _invite_and_greet(alice, bot_user.user_id, f"chat {i}") for i in range(2)]
        answered_before = await alice.say(rooms[0], "before the restart")
        await alice.wait_until(
            lambda: answered_before in replies_to(alice.bot_notices(rooms[0], bot_user.user_id)),
            what="the first reply",
        )
        chats_before = {r: runtime._store.chat_for_room(r) for r in rooms}

    # While the bot is down: messages in both rooms; then its store is deleted.
    missed = [await alice.say(room, f"while down {i}") for i in range(3) for room in rooms]
    for path in tmp_path.glob("store.sqlite3*"):
        path.unlink()

    with capture_logs() as logs:
        async with running_bot(settings) as runtime:
            for room in rooms:
                assert runtime._store.chat_for_room(room) == chats_before[room]

            def answered() -> set[str]:
                return {
                    t for r in rooms for t in replies_to(alice.bot_notices(r, bot_user.user_id))
                }

            await alice.wait_until(
                lambda: set(missed) <= answered(), what="replies to the missed messages"
            )
            # A little longer, to see that nothing is answered twice.
            await alice.sync_once(timeout_ms=1500)

    report = next(e for e in logs if e["event"] == "matrix_reconcile_complete")
    assert report["restored"] == 2
    for room in rooms:
        targets = replies_to(alice.bot_notices(room, bot_user.user_id))
        assert len(targets) == len(set(targets)), "a message was answered twice"
    all_targets = [
        t for room in rooms for t in replies_to(alice.bot_notices(room, bot_user.user_id))
    ]
    assert sorted(all_targets) == sorted([answered_before, *missed])


async def test_message_in_room_without_marker_gets_the_diagnostic_notice(
    synapse: SynapseServer, make_user: MakeUser, alice: Person, tmp_path: Path
) -> None:
    bot_user = make_user("bot")
    settings = bot_settings(synapse, bot_user, tmp_path / "store.sqlite3")
    async with running_bot(settings) as runtime:
        room_id = await _invite_and_greet(alice, bot_user.user_id)
        # Someone removes the marker on the server (an empty object is no marker).
        await runtime._client.put_room_account_data(room_id, CHAT_MARKER, {})

    for path in tmp_path.glob("store.sqlite3*"):
        path.unlink()
    with capture_logs(processors=[merge_contextvars, merge_log_context]) as logs:
        async with running_bot(settings):
            asked = await alice.say(room_id, "anyone there?")
            await alice.wait_until(
                lambda: asked in replies_to(alice.bot_notices(room_id, bot_user.user_id)),
                what="the diagnostic notice",
            )
    notice = next(
        e for e in alice.bot_notices(room_id, bot_user.user_id) if asked in replies_to([e])
    )
    assert notice.content["body"] == REPAIR_FAILED_NOTICE
    warning = next(e for e in logs if e["event"] == "chat_repair_failed")
    assert warning["room_id"] == room_id
    assert warning["sender"] == alice.user.user_id
    assert warning["event_id"] == asked
    assert warning["repair"]["ok"] is False


async def test_invite_from_a_user_not_allowed_is_declined(
    synapse: SynapseServer, make_user: MakeUser, alice: Person, tmp_path: Path
) -> None:
    bot_user = make_user("bot")
    from bot.config import AllowList

    settings = bot_settings(
        synapse,
        bot_user,
        tmp_path / "store.sqlite3",
        allowed=AllowList(users=frozenset({"@someone-else:localhost"})),
    )
    with capture_logs() as logs:
        async with running_bot(settings) as runtime:
            room_id = await alice.client.create_room(name="nope", invite=[bot_user.user_id])
            await alice.wait_until(
                lambda: any(e["event"] == "invite_declined" for e in logs),
                what="the invite to be declined",
            )
            assert runtime._store.chat_for_room(room_id) is None
    members = await alice.client.joined_members(room_id)
    assert bot_user.user_id not in members


async def test_history_from_before_the_bot_joined_is_not_answered(
    synapse: SynapseServer, make_user: MakeUser, alice: Person, tmp_path: Path
) -> None:
    bot_user = make_user("bot")
    settings = bot_settings(synapse, bot_user, tmp_path / "store.sqlite3")
    room_id = await alice.client.create_room(name="old room")
    history = [await alice.say(room_id, f"old message {i}") for i in range(3)]
    async with running_bot(settings):
        await alice.client.invite_user(room_id, bot_user.user_id)
        await alice.wait_until(
            lambda: any(
                e.content.get("body") == GREETING
                for e in alice.bot_notices(room_id, bot_user.user_id)
            ),
            what="the greeting",
        )
        asked = await alice.say(room_id, "new message")
        await alice.wait_until(
            lambda: asked in replies_to(alice.bot_notices(room_id, bot_user.user_id)),
            what="the reply",
        )
    answered = replies_to(alice.bot_notices(room_id, bot_user.user_id))
    assert answered == [asked]
    assert not set(history) & set(answered)


async def test_a_bot_clock_running_ahead_hides_no_first_message(
    synapse: SynapseServer,
    make_user: MakeUser,
    alice: Person,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The bot's clock runs two minutes ahead of the homeserver's. Messages older
    # than a chat are history; they must be older on the server's clock.
    real_time = time.time
    monkeypatch.setattr(bot.chats, "time", types.SimpleNamespace(time=lambda: real_time() + 120))
    bot_user = make_user("bot")
    settings = bot_settings(synapse, bot_user, tmp_path / "store.sqlite3")
    async with running_bot(settings) as runtime:
        # A chat from an invite ...
        invited = await _invite_and_greet(alice, bot_user.user_id)
        first = await alice.say(invited, "hello")
        await alice.wait_until(
            lambda: first in replies_to(alice.bot_notices(invited, bot_user.user_id)),
            what="the reply in the invited room",
        )
        # ... and one the bot makes.
        new = await ask(alice, invited, bot_user.user_id, "!new Plans")
        made = linked_room(new)
        await alice.client.join_room(made)
        in_made = await alice.say(made, "hello again")
        await alice.wait_until(
            lambda: in_made in replies_to(alice.bot_notices(made, bot_user.user_id)),
            what="the reply in the room the bot made",
        )
        seen = {e.event_id: e for e in alice.timeline[invited]}
        invite = next(
            e
            for e in seen.values()
            if e.type == "m.room.member" and e.content.get("membership") == "invite"
        )
        [command] = [seen[target] for target in replies_to([new])]
        for room_id, cause in ((invited, invite), (made, command)):
            chat = runtime._store.chat_for_room(room_id)
            assert chat is not None
            # On the server's clock, after what made the chat (give or take the
            # second a ``Date`` header leaves open), far from this machine's clock.
            assert cause.origin_server_ts - 1000 <= chat.created_ts < real_time() * 1000


async def test_restart_with_store_fills_a_gap_larger_than_the_timeline(
    synapse: SynapseServer, make_user: MakeUser, alice: Person, tmp_path: Path
) -> None:
    bot_user = make_user("bot")
    settings = bot_settings(synapse, bot_user, tmp_path / "store.sqlite3")
    async with running_bot(settings):
        room_id = await _invite_and_greet(alice, bot_user.user_id)
    # More than the 50 events per room the sync filter asks for: the timeline comes
    # back `limited` and the rest must be fetched through /messages.
    missed = [await alice.say(room_id, f"burst {i}") for i in range(70)]
    with capture_logs() as logs:
        async with running_bot(settings):
            await alice.wait_until(
                lambda: (
                    set(missed) <= set(replies_to(alice.bot_notices(room_id, bot_user.user_id)))
                ),
                timeout=60,
                what="70 replies",
            )
            await alice.sync_once(timeout_ms=1000)
    answered = replies_to(alice.bot_notices(room_id, bot_user.user_id))
    assert answered == missed, "every message answered once, in order"
    assert any(e["event"] == "sync_gap_filled" and e["events"] >= 20 for e in logs)


async def _read_by(
    client: MatrixClient, room_id: RoomID, since: SyncToken
) -> tuple[list[str], SyncToken]:
    """The events the client's user put an ``m.read`` receipt on in ``room_id`` since
    ``since``, and the next token. (Incremental: Synapse answers an identical /sync
    from a cache for a while.)"""
    response = await client.sync(since=since, timeout_ms=0)
    read = [
        event_id
        for content in ephemeral(response, room_id, "m.receipt")
        for event_id, kinds in content.items()
        if client.user_id in kinds.get("m.read", {})
    ]
    return read, response.next_batch


async def test_only_a_message_handled_without_reply_gets_the_bots_receipt(
    synapse: SynapseServer, make_user: MakeUser, alice: Person, tmp_path: Path
) -> None:
    # A reply marks the message it answers, for the user and for a start without a
    # store. A message the bot handles without answering (here: in an archived chat)
    # is marked by the bot's read receipt, and a start without a store leaves it be.
    bot_user = make_user("bot")
    settings = bot_settings(synapse, bot_user, tmp_path / "store.sqlite3")
    as_bot = MatrixClient(
        synapse.base_url, access_token=bot_user.access_token, user_id=bot_user.user_id
    )
    async with as_bot:
        since = (await as_bot.sync(timeout_ms=0)).next_batch
        async with running_bot(settings):
            room_id = await _invite_and_greet(alice, bot_user.user_id)
            archive = await alice.say(room_id, "!archive")
            await alice.wait_until(
                lambda: archive in replies_to(alice.bot_notices(room_id, bot_user.user_id)),
                what="the reply to !archive",
            )
        # Stopping sends the receipts still due: there were none.
        read, since = await _read_by(as_bot, room_id, since)
        assert read == []

        async with running_bot(settings) as runtime:
            unanswered = await alice.say(room_id, "anyone there?")
            with trio.fail_after(20):
                # Polling: the store tells no one when it commits.
                while await runtime._store.handled_outcome(unanswered) is None:  # noqa: ASYNC110
                    await trio.sleep(0.05)
        read, since = await _read_by(as_bot, room_id, since)
        assert read == [unanswered]

    for path in tmp_path.glob("store.sqlite3*"):
        path.unlink()
    with capture_logs() as logs:
        async with running_bot(settings) as runtime:
            assert await runtime._store.handled_outcome(unanswered) is None
            assert await runtime._store.pending() == []
    assert "catch_up_after_store_loss" not in [entry["event"] for entry in logs]
    assert replies_to(alice.bot_notices(room_id, bot_user.user_id)) == [archive]


class _StoreFillingEcho:
    """Echo, but the first answer also leaves the store unable to write, as a disk
    that fills while the backend works: the reply goes out, recording it fails."""

    name = "echo"

    def __init__(self) -> None:
        self.store: Store | None = None
        self.asked: list[str] = []

    async def reply(self, chat: Chat, message: IncomingMessage) -> str:
        self.asked.append(message.body)
        if len(self.asked) == 1:
            assert self.store is not None
            self.store._db.execute("PRAGMA query_only = ON")  # "readonly database"
        return message.body


async def test_a_store_that_cannot_write_for_a_while_loses_and_repeats_nothing(
    synapse: SynapseServer, make_user: MakeUser, alice: Person, tmp_path: Path
) -> None:
    bot_user = make_user("bot")
    backend = _StoreFillingEcho()
    bot_id = bot_user.user_id

    with capture_logs() as logs:
        async with running_bot(bot_settings(synapse, bot_user, tmp_path / "s.db"), backend) as rt:
            backend.store = rt._store
            room_id = await _invite_and_greet(alice, bot_id)

            # Answered, but not recorded: the job waits in the inbox and tries again.
            first = await alice.say(room_id, "first")
            await alice.wait_until(
                lambda: any(e["event"] == "job_retry_later" for e in logs), what="a retry"
            )
            # Not even taken in: the sync loop fetches the batch again later.
            second = await alice.say(room_id, "second")
            await alice.wait_until(
                lambda: any(e["event"] == "store_unavailable" for e in logs),
                what="the sync loop to find the store unavailable",
            )

            rt._store._db.execute("PRAGMA query_only = OFF")  # room on the disk again
            await alice.wait_until(
                lambda: {first, second} <= set(replies_to(alice.bot_notices(room_id, bot_id))),
                timeout=60,
                what="both answers",
            )
            assert await rt._store.pending() == []
            assert rt.phase.value is Phase.READY

    await alice.sync_once()
    answers = replies_to(alice.bot_notices(room_id, bot_id))
    assert sorted(answers) == sorted([first, second])  # one each: the re-send was a no-op
    assert backend.asked.count("first") >= 2  # the retry ran the job again
    assert not any(e["event"] in ("job_given_up", "job_failed") for e in logs)
    (unavailable, *_) = [e for e in logs if e["event"] == "store_unavailable"]
    assert "readonly database" in unavailable["error"]
