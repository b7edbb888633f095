"""The key backup in time (issue 20): each room key goes up once, in batches, and not
again after a restart; a backup the server replaces or answers badly for stops only
the backup, never the answers.

The user's device is a `Peer` (see test_e2ee_order.py); the fake homeserver keeps the
backup versions and their keys (`FakeHomeserver.key_backups`, ``room_keys``).
"""

from __future__ import annotations

import trio

from bot.config import Settings
from bot.e2ee.key_backup import BACKUP_BATCH_DELAY_S, _stored
from e2ee_peer import Peer
from fake_homeserver import ALICE, BOT, FakeHomeserver
from matrix_crypto import backup
from matrix_crypto.canonical import verify
from ordering_harness import Logs, RunningBot, log_events, until_handled
from test_e2ee_order import ROOM, assert_nothing_logged_of, chats, only_reply, running_bot


def put_calls(hs: FakeHomeserver, since: int = 0) -> list[dict[str, object]]:
    return [c.body for c in hs.calls[since:] if c.endpoint == "put_room_keys"]


def backed_up(hs: FakeHomeserver, version: str = "1") -> set[str]:
    return {session for room in hs.room_keys[version].values() for session in room}


def backup_key(bot: RunningBot) -> backup.BackupKey:
    crypto = bot.runtime._crypto
    pickle_key = bot.runtime._pickle_key
    assert crypto is not None
    assert pickle_key is not None
    _, key = _stored(crypto, pickle_key)
    assert key is not None, "no backup key kept in the store"
    return key


async def until_backed_up(hs: FakeHomeserver, *session_ids: str) -> None:
    await hs.wait_for(lambda _: set(session_ids) <= backed_up(hs), ended=True)


async def test_each_room_key_is_backed_up_once_and_not_again_after_a_restart(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, logs: Logs, settings: Settings
) -> None:
    await chats(hs, settings)
    alice = Peer(hs, ALICE, "ALICEDEV")
    phone = Peer(hs, ALICE, "ALICEPHONE")

    async with running_bot(settings, hs) as bot:
        [version] = hs.key_backups
        device = bot.runtime._crypto.machine.device_id  # type: ignore[union-attr]
        # The version's public key is signed by the bot's device.
        auth_data = version["auth_data"]
        device_keys = hs.device_keys
        assert verify(auth_data, BOT, f"ed25519:{device}", device_keys["keys"][f"ed25519:{device}"])
        key = alice.room_key_for_bot(ROOM)
        message = alice.message(ROOM, "$1", "one", ts=hs.now_ms())
        hs.queue_sync({ROOM: [message]}, to_device=key)
        await until_handled(bot.store, "$1")
        alice_session = message["content"]["session_id"]
        reply_session = only_reply(hs, ROOM, "$1").content["session_id"]
        with trio.fail_after(60):
            await until_backed_up(hs, alice_session, reply_session)
        await trio.sleep(30)
        first_run = put_calls(hs)
        stored_key = backup_key(bot)

    # Alice's key and the bot's own (so a restored bot reads its own answers too), each
    # once; a burst goes up in one request, not one per key.
    assert 1 <= len(first_run) <= 2, f"{len(first_run)} backup uploads for two room keys"
    assert backed_up(hs) == {alice_session, reply_session}
    rooms = {r: {"sessions": s} for r, s in hs.room_keys["1"].items()}
    sessions, refused = backup.decrypt_room_keys(
        stored_key, {r: v["sessions"] for r, v in rooms.items()}, user_id=BOT
    )
    assert refused == []
    # Written by the bot itself: authenticated, so a restore trusts them.
    assert {(s.session_id, s.authenticated) for s in sessions} == {
        (alice_session, True),
        (reply_session, True),
    }

    restarted_at = len(hs.calls)
    async with running_bot(settings, hs) as bot:
        await trio.sleep(60)
        assert put_calls(hs, restarted_at) == [], "backed up again after a restart"
        assert [c.endpoint for c in hs.calls[restarted_at:]].count("create_key_backup") == 0
        # A new session from her phone: that one goes up, alone.
        key = phone.room_key_for_bot(ROOM)
        later = phone.message(ROOM, "$2", "two", ts=hs.now_ms())
        hs.queue_sync({ROOM: [later]}, to_device=key)
        await until_handled(bot.store, "$2")
        handled_at = trio.current_time()

    # Stopped at once: the stop sent it up, sooner than the batch delay would have.
    [call] = [c for c in hs.calls[restarted_at:] if c.endpoint == "put_room_keys"]
    assert call.at - handled_at < BACKUP_BATCH_DELAY_S
    [upload] = put_calls(hs, restarted_at)
    uploaded = {s for room in upload["rooms"].values() for s in room["sessions"]}  # type: ignore[attr-defined]
    assert uploaded == {later["content"]["session_id"]}
    assert_nothing_logged_of(logs, "one", "two")


async def test_a_backup_replaced_by_another_client_stops_the_backup_not_the_answers(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, logs: Logs, settings: Settings
) -> None:
    await chats(hs, settings)
    alice = Peer(hs, ALICE, "ALICEDEV")
    phone = Peer(hs, ALICE, "ALICEPHONE")

    async with running_bot(settings, hs) as bot:
        # Another client of the bot's account makes a backup of its own.
        other = backup.BackupKey.create()
        hs.key_backups.append(
            {"version": "2", "algorithm": backup.ALGORITHM, "auth_data": other.auth_data()}
        )
        hs.room_keys["2"] = {}
        key = alice.room_key_for_bot(ROOM)
        hs.queue_sync({ROOM: [alice.message(ROOM, "$1", "one", ts=hs.now_ms())]}, to_device=key)
        await until_handled(bot.store, "$1")
        await trio.sleep(30)
        key = phone.room_key_for_bot(ROOM)
        hs.queue_sync({ROOM: [phone.message(ROOM, "$2", "two", ts=hs.now_ms())]}, to_device=key)
        await until_handled(bot.store, "$2")
        await trio.sleep(30)

    assert only_reply(hs, ROOM, "$1")
    assert only_reply(hs, ROOM, "$2")
    assert hs.room_keys["2"] == {}, "keys went into a backup whose key the bot does not hold"
    assert log_events(logs).count("key_backup_replaced") == 1
    # One refused upload, then no more tries.
    assert len(put_calls(hs)) == 1


async def test_a_backup_the_server_answers_badly_for_never_stops_the_bot(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, logs: Logs, settings: Settings
) -> None:
    await chats(hs, settings)
    alice = Peer(hs, ALICE, "ALICEDEV")
    # A version of an algorithm the bot does not know, with a hostile auth_data.
    hs.key_backups.append({"version": "1", "algorithm": "x" * 10_000, "auth_data": {"a": [1]}})
    hs.room_keys["1"] = {}

    async with running_bot(settings, hs) as bot:
        key = alice.room_key_for_bot(ROOM)
        hs.queue_sync({ROOM: [alice.message(ROOM, "$1", "one", ts=hs.now_ms())]}, to_device=key)
        await until_handled(bot.store, "$1")
        await trio.sleep(30)

    assert alice.read(only_reply(hs, ROOM, "$1")).content["body"] == "one"
    assert put_calls(hs) == []
    [line] = [e for e in logs if e["event"] == "key_backup_unavailable"]
    assert len(line["reason"]) < 200
