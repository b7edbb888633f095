"""Encrypted rooms in time (issue 19): late and missing room keys (also across a restart),
rooms that must not wait for each other, hostile encrypted events, a to-device batch
delivered again after a failed commit and after a kill, and a restart in the middle of a
Megolm session.

The user's device is a `Peer` (matrix_crypto's OlmMachine) that claims one of the bot's
one-time keys from the fake homeserver, shares its room key over Olm and encrypts; it also
reads every reply, so a reply that is not encrypted, or that the user's client could not
decrypt (unknown session, reused Megolm index), fails the test. The server's clock follows
trio's (``hs.clock_base_ms``): the bot measures a message's wait for its key from the
message's ``origin_server_ts`` on that clock.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from bot.backends import EchoBackend
from bot.chats import marker_content
from bot.config import Settings
from bot.e2ee.sending import EncryptingClient
from bot.handler import UNDECRYPTABLE_NO_KEY_NOTICE, UNDECRYPTABLE_NOTICE
from bot.runtime import BotRuntime
from bot.store import Store
from e2ee_peer import MEGOLM, Peer
from fake_homeserver import ALICE, BASE_TS, BOB, BOT, FakeHomeserver, Sent, text_event
from matrix_crypto.machine import OlmMachine
from matrix_crypto.state import INBOUND_GROUP
from ordering_harness import (
    Logs,
    RunningBot,
    chat,
    log_events,
    seed_store,
    ticking,
    until_handled,
)

ROOM = "!enc:hs.test"
OTHER = "!other-enc:hs.test"
PLAIN = "!plain:hs.test"
ENCRYPTION = {"algorithm": MEGOLM}
SECRET = "plaintext-nobody-may-log"
# How long a message waits for its room key (issue 19: "up to a bound, e.g. 10 minutes").
KEY_WAIT_S = 600.0
SETTLE_S = 10.0


async def chats(hs: FakeHomeserver, settings: Settings, *, plain: tuple[str, ...] = ()) -> None:
    """The encrypted rooms ``ROOM`` and ``OTHER`` (and the unencrypted ``plain`` ones) as
    chats of Alice's that the store and the server know; a restart (the store has a sync
    token). The server's clock starts at ``BASE_TS``."""
    rooms = [ROOM, OTHER, *plain]
    known = [chat(f"c{n}", room_id) for n, room_id in enumerate(rooms)]
    await seed_store(settings.store_path, chats=known, token="s0")
    for c in known:
        encrypted = c.room_id not in plain
        hs.add_room(
            c.room_id, marker=marker_content(c), encryption=ENCRYPTION if encrypted else None
        )
    hs.clock_base_ms = BASE_TS


@asynccontextmanager
async def e2ee_bot_parts(
    settings: Settings, hs: FakeHomeserver
) -> AsyncIterator[tuple[BotRuntime, Store]]:
    """`ordering_harness.bot_parts` with the client `bot.runtime.run_bot` uses, so that
    the runtime brings up end-to-end encryption."""
    async with EncryptingClient(
        settings.homeserver,
        access_token=settings.access_token,
        user_id=settings.user_id,
        transport=hs.transport(),
    ) as client:
        store = await Store.open(settings.store_path, settings.user_id)
        try:
            yield BotRuntime(settings, client, store, EchoBackend(), rng=random.Random(7)), store
        finally:
            with trio.CancelScope(shield=True):
                await store.aclose()


@asynccontextmanager
async def running_bot(settings: Settings, hs: FakeHomeserver) -> AsyncIterator[RunningBot]:
    """`ordering_harness.running_bot` with end-to-end encryption up (echo backend)."""
    async with (
        ticking(),
        e2ee_bot_parts(settings, hs) as (runtime, store),
        trio.open_nursery() as nursery,
    ):
        await nursery.start(runtime.run)
        assert runtime._crypto is not None, "end-to-end encryption is not up"
        # The users' messages come some time after the bot's device published its keys
        # (a message from before that is never waited for: no key was sent for it).
        await trio.sleep(SETTLE_S)
        bot = RunningBot(runtime, store)
        yield bot
        await bot.stop()


def replies(hs: FakeHomeserver, room_id: str, event_id: str) -> list[Sent]:
    return [sent for sent in hs.sent_in(room_id) if sent.reply_to == event_id]


def only_reply(hs: FakeHomeserver, room_id: str, event_id: str) -> Sent:
    """The one reply to ``event_id``; fails naming how many there were."""
    found = replies(hs, room_id, event_id)
    assert len(found) == 1, f"{len(found)} replies to {event_id}, not one"
    return found[0]


def count_decryptions(bot: RunningBot) -> list[str]:
    """Every `decrypt_room_event` call of the bot's machine, by event id, from now on."""
    crypto = bot.runtime._crypto
    assert crypto is not None, "end-to-end encryption is not up"
    machine: OlmMachine = crypto.machine
    attempts: list[str] = []
    decrypt = machine.decrypt_room_event

    def counting(room_id: str, event: Any) -> Any:
        attempts.append(event.get("event_id"))
        return decrypt(room_id, event)

    machine.decrypt_room_event = counting  # type: ignore[method-assign]
    return attempts


async def recorded_reason(store: Store, event_id: str) -> str | None:
    def read() -> str | None:
        row = store._db.execute(
            "SELECT reason FROM events WHERE event_id = ?", (event_id,)
        ).fetchone()
        return row[0] if row else None

    return await store._run(read)


def assert_nothing_logged_of(logs: Logs, *texts: str) -> None:
    for text in texts:
        leaked = [entry["event"] for entry in logs if text in repr(entry)]
        assert not leaked, f"plaintext in log lines {leaked}"


# --- 1. late key ------------------------------------------------------------------------------


async def test_a_message_whose_key_comes_late_is_answered_when_it_arrives_and_not_before(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, logs: Logs, settings: Settings
) -> None:
    await chats(hs, settings)
    alice = Peer(hs, ALICE, "ALICEDEV")
    late_s = 300.0

    async with running_bot(settings, hs) as bot:
        key = alice.room_key_for_bot(ROOM)
        assert key, "the peer sent the bot no room key"
        attempts = count_decryptions(bot)
        message = alice.message(ROOM, "$late", "hello late", ts=hs.now_ms())
        waiting_from = len(hs.calls)
        hs.queue_sync({ROOM: [message]})
        await trio.sleep(late_s)
        assert replies(hs, ROOM, "$late") == [], "answered before its room key arrived"
        assert await bot.store.handled_outcome("$late") is None, "given up before the key came"
        waiting = hs.calls[waiting_from:]
        attempts_waiting = len(attempts)
        hs.queue_sync({}, to_device=key)
        key_at = trio.current_time()
        with trio.move_on_after(60):
            await until_handled(bot.store, "$late")

    reply = only_reply(hs, ROOM, "$late")
    assert reply.at >= key_at, f"answered at {reply.at}, before the key came at {key_at}"
    assert reply.at - key_at < 5, f"answered {reply.at - key_at:.0f} s after its key came"
    plain = alice.read(reply)
    assert plain.content["body"] == "hello late"
    # While it waited: the long-polls, one query of the sender's devices and one top-up
    # of the one-time key the peer claimed (both as the wait began), nothing else.
    endpoints = [call.endpoint for call in waiting]
    others = [
        (call.endpoint, call.at - waiting[0].at) for call in waiting if call.endpoint != "long_poll"
    ]
    assert sorted(e for e, _ in others) in ([], ["keys_query"], ["keys_query", "keys_upload"]), (
        f"requests while waiting for the key: {others}"
    )
    assert all(at < 1 for _, at in others), f"requests while waiting for the key: {others}"
    assert endpoints.count("long_poll") <= late_s / hs.long_poll_s + 2, (
        f"{endpoints.count('long_poll')} long-polls in {late_s:.0f} s"
    )
    assert 1 <= attempts_waiting <= 2, f"{attempts_waiting} decryption attempts before the key came"
    assert_nothing_logged_of(logs, "hello late")


# --- 2. key never arrives -------------------------------------------------------------------


async def test_a_key_that_never_comes_gets_one_notice_after_ten_minutes_then_the_room_goes_on(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, logs: Logs, settings: Settings
) -> None:
    await chats(hs, settings)
    alice = Peer(hs, ALICE, "ALICEDEV")
    phone = Peer(hs, ALICE, "ALICEPHONE")  # her other device: a session whose key does come

    async with running_bot(settings, hs) as bot:
        withheld = alice.room_key_for_bot(ROOM)
        sent_at = trio.current_time()
        hs.queue_sync({ROOM: [alice.message(ROOM, "$lost", SECRET, ts=hs.now_ms())]})
        await trio.sleep(60)
        later_key = phone.room_key_for_bot(ROOM)
        later = phone.message(ROOM, "$later", "sent again", ts=hs.now_ms())
        hs.queue_sync({ROOM: [later]}, to_device=later_key)
        await until_handled(bot.store, "$lost", "$later")
        assert await bot.store.handled_outcome("$lost") == "notified"
        reason = await recorded_reason(bot.store, "$lost")
        # The lost key turning up after all changes nothing.
        hs.queue_sync({}, to_device=withheld)
        await trio.sleep(60)

    notice = only_reply(hs, ROOM, "$lost")
    waited = notice.at - sent_at
    assert waited >= KEY_WAIT_S - 1, f"gave up on the key after {waited:.0f} s"
    assert waited < KEY_WAIT_S + 2 * hs.long_poll_s + 5, f"told the user only after {waited:.0f} s"
    assert alice.read(notice).content["body"] == UNDECRYPTABLE_NO_KEY_NOTICE
    assert reason == "room key missing"
    answer = only_reply(hs, ROOM, "$later")
    assert answer.at >= notice.at, "the later message overtook the one waiting for its key"
    assert alice.read(answer).content["body"] == "sent again"
    lines = [e for e in logs if e["event"] == "event_undecryptable"]
    assert [(e["event_id"], e["reason"]) for e in lines] == [("$lost", "room key missing")]
    assert_nothing_logged_of(logs, SECRET, "sent again")


async def test_a_restart_does_not_start_the_wait_for_a_key_over(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, logs: Logs, settings: Settings
) -> None:
    """The wait is measured from when the message was sent, on the server's clock: a bot
    restarted half way through waits the other half, not ten minutes more."""
    await chats(hs, settings)
    alice = Peer(hs, ALICE, "ALICEDEV")

    async with running_bot(settings, hs) as bot:
        alice.room_key_for_bot(ROOM)  # never delivered
        sent_at = trio.current_time()
        hs.queue_sync({ROOM: [alice.message(ROOM, "$lost", SECRET, ts=hs.now_ms())]})
        await trio.sleep(KEY_WAIT_S / 2)
        assert await bot.store.handled_outcome("$lost") is None

    assert replies(hs, ROOM, "$lost") == [], "told the user before the wait was over"
    async with running_bot(settings, hs) as bot:
        with trio.move_on_after(KEY_WAIT_S):
            await until_handled(bot.store, "$lost")
        reason = await recorded_reason(bot.store, "$lost")

    notice = only_reply(hs, ROOM, "$lost")
    waited = notice.at - sent_at
    assert KEY_WAIT_S - 1 <= waited < KEY_WAIT_S + 2 * hs.long_poll_s + 10, (
        f"told the user {waited:.0f} s after the message was sent"
    )
    assert alice.read(notice).content["body"] == UNDECRYPTABLE_NO_KEY_NOTICE
    assert reason == "room key missing"
    assert_nothing_logged_of(logs, SECRET)


# --- 3. other rooms do not wait -------------------------------------------------------------


async def test_a_message_waiting_for_its_key_holds_up_no_other_room(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, logs: Logs, settings: Settings
) -> None:
    await chats(hs, settings, plain=(PLAIN,))
    alice = Peer(hs, ALICE, "ALICEDEV")

    async with running_bot(settings, hs) as bot:
        withheld = alice.room_key_for_bot(ROOM)
        hs.queue_sync({ROOM: [alice.message(ROOM, "$waits", "for its key", ts=hs.now_ms())]})
        await trio.sleep(60)
        other_key = alice.room_key_for_bot(OTHER)
        hs.queue_sync(
            {
                PLAIN: [text_event("$plain", ALICE, "in the clear", ts=hs.now_ms())],
                OTHER: [alice.message(OTHER, "$other", "with its key", ts=hs.now_ms())],
            },
            to_device=other_key,
        )
        queued_at = trio.current_time()
        with trio.move_on_after(30):
            await until_handled(bot.store, "$plain", "$other")
        assert await bot.store.handled_outcome("$waits") is None
        hs.queue_sync({}, to_device=withheld)
        with trio.move_on_after(30):
            await until_handled(bot.store, "$waits")

    plain = only_reply(hs, PLAIN, "$plain")
    other = only_reply(hs, OTHER, "$other")
    for name, reply in (("unencrypted", plain), ("encrypted", other)):
        assert reply.at - queued_at < 5, (
            f"the {name} room's message was answered {reply.at - queued_at:.0f} s late"
        )
    assert plain.event_type == "m.room.message"
    assert plain.body == "in the clear"
    assert alice.read(other).content["body"] == "with its key"
    waited = only_reply(hs, ROOM, "$waits")
    assert hs.sent.index(waited) > hs.sent.index(other), "answered before its key came"
    assert alice.read(waited).content["body"] == "for its key"


# --- 4. hostile encrypted events ------------------------------------------------------------


Hostile = tuple[list[dict[str, Any]], list[dict[str, Any]]]
"""Timeline events and to-device events for the bot; made from the server, the user's
device and the first (honest, answered) message of the room."""


def garbage_ciphertext(hs: FakeHomeserver, alice: Peer, first: dict[str, Any]) -> Hostile:
    event = alice.message(ROOM, "$hostile", SECRET, ts=hs.now_ms())
    event["content"]["ciphertext"] = f"{SECRET}!!"
    return [event], []


def unknown_algorithm(hs: FakeHomeserver, alice: Peer, first: dict[str, Any]) -> Hostile:
    event = alice.message(ROOM, "$hostile", SECRET, ts=hs.now_ms())
    event["content"]["algorithm"] = "org.example.rot13"
    return [event], []


def ciphertext_not_a_string(hs: FakeHomeserver, alice: Peer, first: dict[str, Any]) -> Hostile:
    event = alice.message(ROOM, "$hostile", SECRET, ts=hs.now_ms())
    event["content"]["ciphertext"] = {"body": SECRET}
    return [event], []


def forwarded_key(hs: FakeHomeserver, alice: Peer, first: dict[str, Any]) -> Hostile:
    """A key that comes forwarded, not from its owner over Olm: the bot never asked for
    one, so it is refused, and the message waits for a key that never comes."""
    forwarded, group = alice.forwarded_room_key(ROOM)
    return [alice.group_message(group, ROOM, "$hostile", SECRET, ts=hs.now_ms())], [forwarded]


def spoofed_sender(hs: FakeHomeserver, alice: Peer, first: dict[str, Any]) -> Hostile:
    """Bob's device shares its key honestly, then an event claims Alice sent it."""
    bob = Peer(hs, BOB, "BOBDEV")
    key = bob.room_key_for_bot(ROOM)
    return [bob.message(ROOM, "$hostile", SECRET, ts=hs.now_ms(), sender=ALICE)], key


def replayed(hs: FakeHomeserver, alice: Peer, first: dict[str, Any]) -> Hostile:
    """The first message's ciphertext again under another event id (a server replaying
    it): its Megolm index was seen before."""
    return [{**first, "event_id": "$hostile", "origin_server_ts": hs.now_ms()}], []


HOSTILE = [
    pytest.param(garbage_ciphertext, UNDECRYPTABLE_NOTICE, "malformed ciphertext", id="garbage"),
    pytest.param(unknown_algorithm, UNDECRYPTABLE_NOTICE, "not a megolm event", id="algorithm"),
    pytest.param(ciphertext_not_a_string, UNDECRYPTABLE_NOTICE, "missing ciphertext", id="not-str"),
    pytest.param(forwarded_key, UNDECRYPTABLE_NO_KEY_NOTICE, "room key missing", id="forwarded"),
    pytest.param(
        spoofed_sender, UNDECRYPTABLE_NOTICE, "not a known device of sender", id="spoofed"
    ),
    pytest.param(replayed, UNDECRYPTABLE_NOTICE, "replay", id="replayed"),
]


@pytest.mark.parametrize(("hostile", "notice", "reason"), HOSTILE)
async def test_a_hostile_encrypted_event_gets_its_notice_and_never_an_echo(
    autojump_clock: trio.abc.Clock,
    hs: FakeHomeserver,
    logs: Logs,
    settings: Settings,
    hostile: Callable[[FakeHomeserver, Peer, dict[str, Any]], Hostile],
    notice: str,
    reason: str,
) -> None:
    await chats(hs, settings)
    alice = Peer(hs, ALICE, "ALICEDEV")

    async with running_bot(settings, hs) as bot:
        key = alice.room_key_for_bot(ROOM)
        first = alice.message(ROOM, "$first", "hello", ts=hs.now_ms())
        hs.queue_sync({ROOM: [first]}, to_device=key)
        await until_handled(bot.store, "$first")
        events, to_device = hostile(hs, alice, first)
        after = alice.message(ROOM, "$after", "still there?", ts=hs.now_ms())
        hs.queue_sync({ROOM: [*events, after]}, to_device=to_device)
        with trio.move_on_after(KEY_WAIT_S + 2 * hs.long_poll_s + 5):
            await until_handled(bot.store, "$hostile", "$after")
        outcome = await bot.store.handled_outcome("$hostile")
        recorded = await recorded_reason(bot.store, "$hostile")

    assert outcome == "notified", f"the hostile event's outcome: {outcome}"
    assert recorded is not None
    assert reason in recorded, recorded
    told = only_reply(hs, ROOM, "$hostile")
    assert alice.read(told).content["body"] == notice
    bodies = [alice.read(sent).content.get("body") for sent in hs.sent_in(ROOM)]
    assert bodies == ["hello", notice, "still there?"]
    lines = [e for e in logs if e.get("event_id") == "$hostile" and e["log_level"] != "debug"]
    assert [(e["event"], e["reason"]) for e in lines] == [("event_undecryptable", recorded)]
    if hostile is forwarded_key:
        refused = [e["reason"] for e in logs if e["event"] == "to_device_refused"]
        assert refused == ["unrequested forwarded room key"]
    assert_nothing_logged_of(logs, SECRET)


# --- 5. to-device delivered again -----------------------------------------------------------


class Killed(BaseException):
    """The process dies here."""


async def test_a_room_key_batch_whose_commit_failed_is_taken_when_delivered_again(
    autojump_clock: trio.abc.Clock,
    hs: FakeHomeserver,
    logs: Logs,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await chats(hs, settings)
    alice = Peer(hs, ALICE, "ALICEDEV")
    hs.repeat_answers = True  # the batch whose commit failed comes again
    commit = Store.commit_sync_batch
    failed: list[str] = []

    async def fails_once(
        self: Store, token: Any, items: Any, quarantined: Any = (), **crypto: Any
    ) -> Any:
        if not failed and any(item.event_id == "$m" for item in items):
            failed.append(token)
            raise OSError("disk I/O error")
        return await commit(self, token, items, quarantined, **crypto)

    monkeypatch.setattr(Store, "commit_sync_batch", fails_once)

    async with running_bot(settings, hs) as bot:
        key = alice.room_key_for_bot(ROOM)
        assert [e["content"]["ciphertext"][bot_curve(bot)]["type"] for e in key] == [0]
        hs.queue_sync({ROOM: [alice.message(ROOM, "$m", "once", ts=hs.now_ms())]}, to_device=key)
        with trio.move_on_after(120):
            await until_handled(bot.store, "$m")

    assert failed, "the commit never failed: the test tested nothing"
    assert log_events(logs).count("sync_batch_failed") == 1
    reply = only_reply(hs, ROOM, "$m")
    assert alice.read(reply).content["body"] == "once"
    assert [e["reason"] for e in logs if e["event"] == "to_device_refused"] == []


async def test_a_room_key_batch_the_bot_died_before_committing_is_taken_after_the_restart(
    autojump_clock: trio.abc.Clock,
    hs: FakeHomeserver,
    logs: Logs,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Killed as it commits the batch with the pre-key message (nothing of the batch
    reaches the disk): the restarted bot's stored account still has the one-time key the
    message used, and the server delivers the batch again (to-device events until a sync
    acknowledges them, the timeline since the stored token)."""
    await chats(hs, settings)
    alice = Peer(hs, ALICE, "ALICEDEV")
    commit = Store.commit_sync_batch

    async def dies(
        self: Store, token: Any, items: Any, quarantined: Any = (), **crypto: Any
    ) -> Any:
        # No checkpoint before this: the bot's other tasks get no turn in between,
        # as with a kill -9 while the transaction is on its way to the disk.
        if any(item.event_id == "$m" for item in items):
            raise Killed
        return await commit(self, token, items, quarantined, **crypto)

    monkeypatch.setattr(Store, "commit_sync_batch", dies)
    died = trio.Event()

    async with ticking() as tasks, e2ee_bot_parts(settings, hs) as (runtime, _):

        async def run_until_killed(task_status: trio.TaskStatus[None]) -> None:
            try:
                await runtime.run(task_status=task_status)
            except* Killed:
                died.set()

        await tasks.start(run_until_killed)
        await trio.sleep(SETTLE_S)  # see `running_bot`
        key = alice.room_key_for_bot(ROOM)
        message = alice.message(ROOM, "$m", "once", ts=hs.now_ms())
        hs.queue_sync({ROOM: [message]}, to_device=key)
        await died.wait()

    monkeypatch.setattr(Store, "commit_sync_batch", commit)
    assert replies(hs, ROOM, "$m") == []
    kinds = {kind for kind, _, _ in await stored_crypto(settings)}
    assert INBOUND_GROUP not in kinds, "the room key was stored without its batch's commit"
    hs.rooms[ROOM].timeline = [message]
    restarted_at = len(hs.calls)
    async with running_bot(settings, hs) as bot:
        with trio.move_on_after(120):
            await until_handled(bot.store, "$m")
    (initial,) = [c for c in hs.calls[restarted_at:] if c.endpoint == "initial_sync"]
    assert initial.answer["to_device"]["events"] == key, "the server did not deliver it again"

    reply = only_reply(hs, ROOM, "$m")
    assert alice.read(reply).content["body"] == "once"
    assert [e["reason"] for e in logs if e["event"] == "to_device_refused"] == []


async def stored_crypto(settings: Settings) -> list[tuple[str, str, str]]:
    store = await Store.open(settings.store_path, BOT)
    try:
        return await store.crypto_rows()
    finally:
        await store.aclose()


def bot_curve(bot: RunningBot) -> str:
    crypto = bot.runtime._crypto
    assert crypto is not None
    return crypto.machine.curve25519


# --- 6. restart -----------------------------------------------------------------------------


async def test_after_a_restart_the_same_megolm_sessions_go_on_both_ways(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, logs: Logs, settings: Settings
) -> None:
    await chats(hs, settings)
    alice = Peer(hs, ALICE, "ALICEDEV")

    async with running_bot(settings, hs) as bot:
        key = alice.room_key_for_bot(ROOM)
        hs.queue_sync({ROOM: [alice.message(ROOM, "$1", "one", ts=hs.now_ms())]}, to_device=key)
        await until_handled(bot.store, "$1")

    # The same Megolm session: the peer has nothing new to share.
    assert alice.room_key_for_bot(ROOM) == []
    assert INBOUND_GROUP in {kind for kind, _, _ in await stored_crypto(settings)}
    restarted_at = len(hs.calls)
    async with running_bot(settings, hs) as bot:
        hs.queue_sync(
            {
                ROOM: [
                    alice.message(ROOM, "$2", "two", ts=hs.now_ms()),
                    alice.message(ROOM, "$3", "three", ts=hs.now_ms()),
                ]
            }
        )
        with trio.move_on_after(120):
            await until_handled(bot.store, "$2", "$3")

    sent = [replies(hs, ROOM, event_id) for event_id in ("$1", "$2", "$3")]
    assert [len(r) for r in sent] == [1, 1, 1], "each message answered once"
    # Read in order by the user's client, whose replay check refuses an index seen
    # under another event id: a restarted outbound session would reuse index 0.
    read = [alice.read(reply) for (reply,) in sent]
    assert [r.content["body"] for r in read] == ["one", "two", "three"]
    assert len({r.session_id for r in read}) == 1, "the bot's outbound session did not survive"
    assert [r.message_index for r in read] == [0, 1, 2]
    assert alice.refused == []
    # After the restart, nothing brought the bot a key: it decrypted with the stored one.
    syncs = [c for c in hs.calls[restarted_at:] if c.endpoint in ("initial_sync", "long_poll")]
    assert all(c.answer is None or c.answer["to_device"]["events"] == [] for c in syncs)
