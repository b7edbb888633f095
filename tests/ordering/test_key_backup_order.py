"""The key backup in time (issue 20): each room key goes up once, in batches, and not
again after a restart; a backup the server replaces or answers badly for stops only
the backup, never the answers.

The user's device is a `Peer` (see test_e2ee_order.py); the fake homeserver keeps the
backup versions and their keys (`FakeHomeserver.key_backups`, ``room_keys``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import trio
import vodozemac

from bot.config import Settings
from bot.e2ee import key_backup
from bot.e2ee.key_backup import _stored, describe_backup
from bot.handler import UNDECRYPTABLE_NO_KEY_NOTICE, UNDECRYPTABLE_NOTICE
from e2ee_peer import Peer
from fake_homeserver import ALICE, BASE_TS, BOT, FakeHomeserver
from matrix_api import MatrixClient
from matrix_crypto import backup
from matrix_crypto.canonical import verify
from matrix_crypto.cross_signing import SecretStorageKey
from ordering_harness import Logs, RunningBot, log_events, until_handled
from test_e2ee_order import (
    ROOM,
    assert_nothing_logged_of,
    chats,
    only_reply,
    running_bot,
    stored_crypto,
)


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
    autojump_clock: trio.abc.Clock,
    hs: FakeHomeserver,
    logs: Logs,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
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
    # From here the batch delay outlasts the run: whatever goes up, the stop sent.
    monkeypatch.setattr(key_backup, "BACKUP_BATCH_DELAY_S", 3600.0)
    async with running_bot(settings, hs) as bot:
        await trio.sleep(60)
        assert put_calls(hs, restarted_at) == [], "backed up again after a restart"
        assert [c.endpoint for c in hs.calls[restarted_at:]].count("create_key_backup") == 0
        # A new session from her phone: that one goes up, alone.
        key = phone.room_key_for_bot(ROOM)
        later = phone.message(ROOM, "$2", "two", ts=hs.now_ms())
        hs.queue_sync({ROOM: [later]}, to_device=key)
        await until_handled(bot.store, "$2")

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


# --- restoring ------------------------------------------------------------------------------


def backup_made_elsewhere(
    hs: FakeHomeserver,
    alice: Peer,
    *,
    authenticated: vodozemac.GroupSession,
    anyones: vodozemac.GroupSession,
) -> SecretStorageKey:
    """The account's secret storage and key backup as another device of the bot's left
    them: one session the bot's own backup code wrote (MAC'd), one anyone could have."""
    storage = SecretStorageKey.create()
    key = backup.BackupKey.create()
    hs.account_data[storage.event_type] = storage.description()
    hs.account_data["m.secret_storage.default_key"] = storage.default_key_content()
    hs.account_data[backup.SECRET_NAME] = storage.encrypt(backup.SECRET_NAME, key.to_base64())
    hs.key_backups.append(
        {"version": "1", "algorithm": backup.ALGORITHM, "auth_data": key.auth_data()}
    )
    entries = {}
    for group in (authenticated, anyones):
        exported = vodozemac.InboundGroupSession(group.session_key).export_at(0)
        assert exported is not None
        session = backup.RoomKeyToBackUp(
            room_id=ROOM,
            session_id=group.session_id,
            sender_curve25519=alice.machine.curve25519,
            sender_claimed_ed25519=alice.machine.ed25519,
            session_key=exported.to_base64(),
            first_message_index=0,
            authenticated=True,
        )
        entries[group.session_id] = (
            backup.authenticated_backup_data(key, BOT, session)
            if group is authenticated
            else backup.backup_data(key.public_key, session)
        )
    hs.room_keys["1"] = {ROOM: entries}
    return storage


async def test_a_backup_made_elsewhere_is_restored_before_the_messages_that_need_it(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, logs: Logs, settings: Settings
) -> None:
    """Messages older than the bot's device, in sessions only the backup holds, wait for
    the restore instead of failing at once: the one from the bot's own backup is
    answered, the one anyone could have filed gets the could-not-verify notice."""
    await chats(hs, settings)
    alice = Peer(hs, ALICE, "ALICEDEV")
    ours, anyones = vodozemac.GroupSession(), vodozemac.GroupSession()
    storage = backup_made_elsewhere(hs, alice, authenticated=ours, anyones=anyones)
    before = BASE_TS - 60_000
    hs.rooms[ROOM].timeline = [
        alice.group_message(ours, ROOM, "$ours", "from the backup", ts=before),
        alice.group_message(anyones, ROOM, "$anyones", "filed by anyone", ts=before),
    ]
    settings = replace(settings, recovery_key=storage.recovery_key)

    async with running_bot(settings, hs) as bot:
        with trio.fail_after(120):
            await until_handled(bot.store, "$ours", "$anyones")
        await trio.sleep(10)

    assert alice.read(only_reply(hs, ROOM, "$ours")).content["body"] == "from the backup"
    assert alice.read(only_reply(hs, ROOM, "$anyones")).content["body"] == UNDECRYPTABLE_NOTICE
    [restored] = [e for e in logs if e["event"] == "key_backup_restored"]
    assert (restored["sessions"], restored["authenticated"], restored["refused"]) == (2, 1, 0)
    # What came from the backup is not sent back; no second backup is made.
    endpoints = [c.endpoint for c in hs.calls]
    assert endpoints.count("create_key_backup") == 0
    assert put_calls(hs) == [] or all(
        ours.session_id not in str(body) and anyones.session_id not in str(body)
        for body in put_calls(hs)
    )
    assert_nothing_logged_of(logs, "from the backup", "filed by anyone")


HOSTILE_SECRET_STORAGE = {
    "secret is not base64": lambda hs, storage: hs.account_data.__setitem__(
        backup.SECRET_NAME, storage.encrypt(backup.SECRET_NAME, "!!not base64!!")
    ),
    "secret is another key": lambda hs, storage: hs.account_data.__setitem__(
        backup.SECRET_NAME,
        storage.encrypt(backup.SECRET_NAME, backup.BackupKey.create().to_base64()),
    ),
    "secret is garbage": lambda hs, storage: hs.account_data.__setitem__(
        backup.SECRET_NAME, {"encrypted": {storage.key_id: {"iv": 5, "ciphertext": [None]}}}
    ),
    "default key names nothing": lambda hs, storage: hs.account_data.__setitem__(
        "m.secret_storage.default_key", {"key": ["x" * 100_000]}
    ),
    "key description is hostile": lambda hs, storage: hs.account_data.__setitem__(
        storage.event_type, {"algorithm": "m.secret_storage.v1.aes-hmac-sha2", "iv": {}}
    ),
    "secret missing": lambda hs, storage: hs.account_data.pop(backup.SECRET_NAME),
}


@pytest.mark.parametrize("damage", HOSTILE_SECRET_STORAGE, ids=list(HOSTILE_SECRET_STORAGE))
async def test_damaged_secret_storage_leaves_the_backup_alone_and_the_bot_answering(
    autojump_clock: trio.abc.Clock,
    hs: FakeHomeserver,
    logs: Logs,
    settings: Settings,
    damage: str,
) -> None:
    await chats(hs, settings)
    alice = Peer(hs, ALICE, "ALICEDEV")
    ours, anyones = vodozemac.GroupSession(), vodozemac.GroupSession()
    storage = backup_made_elsewhere(hs, alice, authenticated=ours, anyones=anyones)
    HOSTILE_SECRET_STORAGE[damage](hs, storage)
    hs.rooms[ROOM].timeline = [
        alice.group_message(ours, ROOM, "$ours", "from the backup", ts=BASE_TS - 60_000)
    ]
    settings = replace(settings, recovery_key=storage.recovery_key)

    async with running_bot(settings, hs) as bot:
        with trio.fail_after(120):
            await until_handled(bot.store, "$ours")
        key = alice.room_key_for_bot(ROOM)
        hs.queue_sync({ROOM: [alice.message(ROOM, "$new", "new", ts=hs.now_ms())]}, to_device=key)
        await until_handled(bot.store, "$new")

    notice = alice.read(only_reply(hs, ROOM, "$ours")).content["body"]
    assert notice == UNDECRYPTABLE_NO_KEY_NOTICE
    assert alice.read(only_reply(hs, ROOM, "$new")).content["body"] == "new"
    failed = [e for e in logs if e["event"] in ("key_backup_unavailable", "key_backup_failed")]
    assert len(failed) == 1, failed
    assert len(repr(failed)) < 1_000
    assert storage.recovery_key not in repr(logs)
    # The backup is left as it was: nothing written into it, no new one made over it.
    assert [c.endpoint for c in hs.calls].count("create_key_backup") == 0
    assert put_calls(hs) == []


async def test_doctor_says_what_the_backup_holds(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, logs: Logs, settings: Settings
) -> None:
    await chats(hs, settings)
    alice = Peer(hs, ALICE, "ALICEDEV")
    async with running_bot(settings, hs) as bot:
        key = alice.room_key_for_bot(ROOM)
        hs.queue_sync({ROOM: [alice.message(ROOM, "$1", "one", ts=hs.now_ms())]}, to_device=key)
        await until_handled(bot.store, "$1")
    rows = await stored_crypto(settings)

    async with MatrixClient(
        settings.homeserver, access_token=settings.access_token, transport=hs.transport()
    ) as client:
        fine, line = await describe_backup(client, rows, recovery_key_known=False)
        assert fine
        assert (
            line == "key backup: version 1, 2 room keys backed up from this store, 2 on the server"
        )
        # Another client replaced it with a backup of its own.
        other = backup.BackupKey.create()
        hs.key_backups.append(
            {"version": "2", "algorithm": backup.ALGORITHM, "auth_data": other.auth_data()}
        )
        hs.room_keys["2"] = {}
        fine, line = await describe_backup(client, rows, recovery_key_known=False)
        assert not fine
        assert "version 2 cannot be read or written" in line
        fine, line = await describe_backup(client, rows, recovery_key_known=True)
        assert fine
        assert "restores it" in line
        hs.key_backups.clear()
        assert await describe_backup(client, rows, recovery_key_known=False) == (
            True,
            "key backup: none yet: the next start makes one",
        )


async def test_a_backup_the_server_keeps_refusing_is_retried_with_backoff_not_in_a_loop(
    autojump_clock: trio.abc.Clock,
    hs: FakeHomeserver,
    logs: Logs,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Uploads that fail (a server answering 500 to each, past the request's own
    retries) are tried again after a growing wait, logged once, and the keys go up
    once the server takes them; the answers never wait for any of it."""
    await chats(hs, settings)
    alice = Peer(hs, ALICE, "ALICEDEV")
    refusing = True
    room_keys = hs._room_keys

    async def flaky(version: str | None, body: Any) -> tuple[int, dict[str, Any]]:
        if body is not None and refusing:
            return 500, {"errcode": "M_UNKNOWN", "error": "x" * 100_000}
        return await room_keys(version, body)

    monkeypatch.setattr(hs, "_room_keys", flaky)
    async with running_bot(settings, hs) as bot:
        key = alice.room_key_for_bot(ROOM)
        message = alice.message(ROOM, "$1", "one", ts=hs.now_ms())
        hs.queue_sync({ROOM: [message]}, to_device=key)
        await until_handled(bot.store, "$1")
        await trio.sleep(600)
        refused = len(put_calls(hs))
        refusing = False
        await hs.wait_for(lambda _: message["content"]["session_id"] in backed_up(hs), ended=True)

    assert alice.read(only_reply(hs, ROOM, "$1")).content["body"] == "one"
    # Ten minutes of refusals: a handful of rounds (each with the request's own
    # retries), not a loop.
    assert 2 <= refused <= 40, f"{refused} uploads in ten minutes of refusals"
    failed = [e for e in logs if e["event"] == "key_backup_upload_failed"]
    assert len(failed) == 1
    assert len(repr(failed)) < 2_000
