"""An encrypted chat's conversation read back from the room after a lost store, against Synapse.

The person is matrix-js-sdk with its Rust crypto (js_client.py) in an encrypted direct chat
with the model bot (the fake OpenAI server records every context it gets). The bot loses
its store and comes back as a new device: with the recovery key kept, it restores the key
backup its old device wrote and reads the conversation back from the room, the person's
messages and its own answers (encrypted by the old device) decrypted with the backup's
keys; the main timeline without the thread, the thread from its root and /relations.
Without the recovery key nothing of the past decrypts: the context starts afresh, and
nothing fails or is answered twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio
from structlog.testing import capture_logs

from bot.config import Settings
from bot.invites import GREETING
from bot.replies.history import STREAMING_KEY
from bot.runtime import BotRuntime
from bot_harness import fake_openai_server, model_bot, running_bot
from fake_openai import FakeOpenAI
from js_client import JsClient, Message, open_js_client
from matrix_api.testing.synapse import RegisteredUser, SynapseServer
from matrix_helpers import MakeUser

SCENARIO_S = 300
"""Seconds one scenario may take as a whole (a broken exchange fails, it does not hang)."""
TIMEOUT = 60.0
"""Seconds any one wait may take (a loaded machine is slow, never this slow)."""

Context = list[tuple[str, Any]]


def contents(messages: list[dict[str, Any]]) -> Context:
    """The conversation a request carries, without its system prompt."""
    return [(m["role"], m["content"]) for m in messages if m["role"] != "system"]


def answer_of(message: str) -> str:
    """What the fake server answers to ``message`` (its default script)."""
    return f"Echo: {message}"


class Chat:
    """Alice (the js client) and the bot in one encrypted direct chat."""

    def __init__(self, alice: JsClient, room_id: str, bot_id: str, server: FakeOpenAI) -> None:
        self.alice = alice
        self.room_id = room_id
        self.bot_id = bot_id
        self.server = server

    async def ask(self, body: str, *, thread: str | None = None) -> tuple[str, Message, Context]:
        """Sends ``body`` (in the thread of root ``thread``); its event id, the bot's
        answer to it once whole (a streamed answer's final edit is in), and the context
        the model server got for it (exactly one request)."""
        before = len(self.server.requests)
        sent = await self.alice.send_text(self.room_id, body, thread_id=thread)
        answer = await self.alice.wait_for_message(
            self.room_id, sender=self.bot_id, in_reply_to=sent, timeout=TIMEOUT
        )
        assert answer.encrypted
        assert not answer.decryption_failure, answer.decryption_failure_reason
        await self.whole(answer, answer_of(body))
        assert len(self.server.requests) == before + 1
        return sent, answer, contents(self.server.requests[-1].body["messages"])

    async def whole(self, answer: Message, text: str) -> None:
        """Once ``answer`` shows ``text`` whole: as sent, or (streamed) by its final
        edit. Bounded."""
        with trio.fail_after(TIMEOUT):
            while True:
                shown = [] if answer.content.get(STREAMING_KEY) else [answer.body]
                for m in await self.alice.messages(self.room_id):
                    relates = m.wire_relates_to or {}
                    if (
                        m.sender == self.bot_id
                        and relates.get("rel_type") == "m.replace"
                        and relates.get("event_id") == answer.event_id
                    ):
                        assert not m.decryption_failure, m.decryption_failure_reason
                        shown.append(m.content.get("m.new_content", {}).get("body"))
                if shown and shown[-1] == text:
                    return
                await trio.sleep(0.2)

    async def replies_to(self, event_id: str) -> list[Message]:
        """The bot's answers to ``event_id`` (their first events; edits not counted)."""
        return [
            m
            for m in await self.alice.messages(self.room_id)
            if m.sender == self.bot_id
            and (m.wire_relates_to or {}).get("rel_type") != "m.replace"
            and (m.wire_relates_to or {}).get("m.in_reply_to", {}).get("event_id") == event_id
        ]


def settings_for(
    synapse: SynapseServer, bot: RegisteredUser, store: Path, server: FakeOpenAI
) -> Settings:
    # The password lets a new device publish its cross-signing again, as in production.
    return replace(model_bot(synapse, bot, store, server), password=bot.password)


async def greeted_dm(alice: JsClient, bot_id: str) -> str:
    room_id = await alice.create_encrypted_dm(bot_id)
    greeting = await alice.wait_for_message(room_id, sender=bot_id, timeout=TIMEOUT)
    assert greeting.encrypted
    assert greeting.body == GREETING
    return room_id


async def knows_new_device(alice: JsClient, bot_id: str, runtime: BotRuntime) -> str:
    """The bot's new device id, once alice's client knows that device (her next message
    is encrypted for it too): a message she writes now needs no backup to be read."""
    crypto = runtime._crypto
    assert crypto is not None
    device_id = crypto.machine.device_id
    with trio.fail_after(TIMEOUT):
        while True:
            if device_id in {d.device_id for d in await alice.devices(bot_id)}:
                break
            await trio.sleep(0.2)
    return device_id


def lose_store(directory: Path, *, keep_recovery_key: bool) -> None:
    """All of the bot's store (its pickle key too); the recovery key file (which the
    operator keeps elsewhere) only when not ``keep_recovery_key``."""
    lost = [
        path
        for path in directory.iterdir()
        if not (keep_recovery_key and path.name.endswith(".recovery-key"))
    ]
    assert lost
    for path in lost:
        path.unlink()
    assert (directory / "store.sqlite3.recovery-key").exists() == keep_recovery_key


def rebuilds(logs: Sequence[Mapping[str, Any]]) -> list[tuple[int, bool]]:
    """Each context the bot read from the room: (turns, in a thread)."""
    return [(e["turns"], e["thread"]) for e in logs if e["event"] == "context_rebuilt"]


async def test_after_a_lost_store_an_encrypted_chat_is_read_back_through_the_key_backup(
    synapse: SynapseServer, make_user: MakeUser, tmp_path: Path
) -> None:
    alice_user, bot = make_user("alice"), make_user("bot")
    with trio.fail_after(SCENARIO_S):
        async with fake_openai_server() as server, open_js_client("alice") as alice:
            await alice.login(
                synapse.base_url, alice_user.user_id, alice_user.password, thread_support=True
            )
            settings = settings_for(synapse, bot, tmp_path / "store.sqlite3", server)
            async with running_bot(settings):
                room_id = await greeted_dm(alice, bot.user_id)
                chat = Chat(alice, room_id, bot.user_id, server)
                q1, _, context = await chat.ask("the first question")
                assert context == [("user", "the first question")]
                _, _, context = await chat.ask("the second question")
                assert context == [
                    ("user", "the first question"),
                    ("assistant", answer_of("the first question")),
                    ("user", "the second question"),
                ]
                # A thread on the first question: a conversation of its own.
                _, t1_answer, context = await chat.ask("aside in a thread", thread=q1)
                assert context == [("user", "the first question"), ("user", "aside in a thread")]
                assert t1_answer.thread_root_id == q1
            lose_store(tmp_path, keep_recovery_key=True)
            asked = len(server.requests)

            with capture_logs() as logs:
                async with running_bot(settings) as runtime:
                    new_device = await knows_new_device(alice, bot.user_id, runtime)
                    assert new_device != bot.device_id
                    # The main timeline: both exchanges, read back and decrypted (the
                    # answers were encrypted by the old device), the thread left out.
                    q3, q3_answer, context = await chat.ask("the third question")
                    assert context == [
                        ("user", "the first question"),
                        ("assistant", answer_of("the first question")),
                        ("user", "the second question"),
                        ("assistant", answer_of("the second question")),
                        ("user", "the third question"),
                    ]
                    assert q3_answer.thread_root_id is None
                    # The thread: its root, then its exchange through /relations.
                    _, t2_answer, context = await chat.ask("more in the thread", thread=q1)
                    assert context == [
                        ("user", "the first question"),
                        ("user", "aside in a thread"),
                        ("assistant", answer_of("aside in a thread")),
                        ("user", "more in the thread"),
                    ]
                    assert t2_answer.thread_root_id == q1
                    # Read once: the store has them now.
                    _, _, context = await chat.ask("the fourth question")
                    assert context[-3:] == [
                        ("user", "the third question"),
                        ("assistant", answer_of("the third question")),
                        ("user", "the fourth question"),
                    ]
                    assert len(context) == 7
            assert len(server.requests) == asked + 3
            assert [m.event_id for m in await chat.replies_to(q3)] == [q3_answer.event_id]

    assert rebuilds(logs) == [(4, False), (3, True)]
    assert not [e for e in logs if e["event"] == "context_rebuild_failed"]
    # The keys came from the backup the old device wrote (its own outbound session and
    # alice's), authenticated by the backup's MAC.
    [restored] = [e for e in logs if e["event"] == "key_backup_restored"]
    assert restored["authenticated"] == restored["sessions"] >= 2
    assert restored["refused"] == 0


async def test_a_lost_store_without_its_recovery_key_starts_the_context_afresh(
    synapse: SynapseServer, make_user: MakeUser, tmp_path: Path
) -> None:
    # Nothing of the past decrypts (the backup cannot be opened, alice's session reached
    # the new device at a later index): the rebuild reads no turn, nothing fails, the
    # message is answered once and the conversation goes on from it.
    alice_user, bot = make_user("alice"), make_user("bot")
    with trio.fail_after(SCENARIO_S):
        async with fake_openai_server() as server, open_js_client("alice") as alice:
            await alice.login(
                synapse.base_url, alice_user.user_id, alice_user.password, thread_support=True
            )
            settings = settings_for(synapse, bot, tmp_path / "store.sqlite3", server)
            async with running_bot(settings):
                room_id = await greeted_dm(alice, bot.user_id)
                chat = Chat(alice, room_id, bot.user_id, server)
                await chat.ask("the first question")
                await chat.ask("the second question")
            lose_store(tmp_path, keep_recovery_key=False)
            asked = len(server.requests)

            with capture_logs() as logs:
                async with running_bot(settings) as runtime:
                    await knows_new_device(alice, bot.user_id, runtime)
                    q3, q3_answer, context = await chat.ask("the third question")
                    assert context == [("user", "the third question")]
                    _, _, context = await chat.ask("the fourth question")
                    assert context == [
                        ("user", "the third question"),
                        ("assistant", answer_of("the third question")),
                        ("user", "the fourth question"),
                    ]
            assert len(server.requests) == asked + 2
            assert [m.event_id for m in await chat.replies_to(q3)] == [q3_answer.event_id]

    assert rebuilds(logs) == [(0, False)]
    assert not [e for e in logs if e["event"] == "context_rebuild_failed"]
    assert not [e for e in logs if e["event"] == "key_backup_restored"]
    assert [e["event"] for e in logs if e["event"] == "key_backup_unavailable"] == [
        "key_backup_unavailable"
    ]
