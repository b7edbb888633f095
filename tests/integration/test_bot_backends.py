"""The model and webhook backends through the whole bot, against a real Synapse.

The model is the fake OpenAI-compatible server of tests/backends (real wire format,
SSE streaming); the webhook receiver checks the signature the way a team's service
would.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio

from bot.backends.webhook import WebhookSettings, verify_signature
from bot.config import Settings
from bot.dispatch import MAX_RESUMPTIONS
from bot.handler import FAILED_NOTICE
from bot_harness import (
    Person,
    bot_settings,
    fake_openai_server,
    open_chat,
    replies_to,
    running_bot,
)
from bot_harness import model_bot as harness_model_bot
from conftest import MakeUser
from fake_openai import API_KEY, FakeOpenAI
from matrix_api.models import RoomEvent, RoomID
from matrix_api.testing.synapse import RegisteredUser, SynapseServer
from mini_http import HTTPRequest, Responder, serve_http

if TYPE_CHECKING:
    from faults.harness.bot_process import BotProcess
    from faults.harness.lab import FaultLab


@pytest.fixture
async def model_server() -> AsyncIterator[FakeOpenAI]:
    async with fake_openai_server("test-model", "other-model", token_delay=0.03) as server:
        yield server


def model_bot(
    synapse: SynapseServer, bot: RegisteredUser, store: Path, server: FakeOpenAI
) -> Settings:
    return harness_model_bot(synapse, bot, store, server, stream=True, edit_interval_s=0.3)


async def start_bot_process(
    lab: FaultLab,
    synapse: SynapseServer,
    bot: RegisteredUser,
    alice: Person,
    *,
    secret: str,
    **env: str,
) -> tuple[BotProcess, RoomID]:
    """``python -m bot run`` as ``bot`` with ``env`` (the server's users allowed),
    ready, and a chat alice opened with it. ``secret`` must never reach its logs."""
    process = lab.bot(synapse.base_url, bot.user_id, access_token=bot.access_token)
    process.env.update(env, BOT_ALLOWED_USERS=f":{synapse.server_name}")
    lab.remember_secret(secret)
    await process.start()
    await process.wait_ready()
    return process, await open_chat(alice, bot.user_id)


def final_text(events: list[RoomEvent], reply: RoomEvent) -> str:
    """What a client shows for ``reply``: its last replacement's new content."""
    body = reply.content["body"]
    for event in events:
        relates = event.content.get("m.relates_to", {})
        if relates.get("rel_type") == "m.replace" and relates.get("event_id") == reply.event_id:
            body = event.content["m.new_content"]["body"]
    return str(body)


def edits_of(events: list[RoomEvent], reply: RoomEvent) -> list[RoomEvent]:
    return [
        e
        for e in events
        if e.content.get("m.relates_to", {}).get("rel_type") == "m.replace"
        and e.content["m.relates_to"].get("event_id") == reply.event_id
    ]


async def ask(alice: Person, room_id: RoomID, bot_id: str, text: str, expected: str) -> RoomEvent:
    asked = await alice.say(room_id, text)

    def answered() -> RoomEvent | None:
        events = alice.timeline.get(room_id, [])
        for event in alice.bot_notices(room_id, bot_id):
            if asked in replies_to([event]) and final_text(events, event) == expected:
                return event
        return None

    await alice.wait_until(
        lambda: answered() is not None, timeout=30, what=f"the answer {expected!r}"
    )
    reply = answered()
    assert reply is not None
    return reply


def sent_messages(server: FakeOpenAI) -> list[list[dict[str, Any]]]:
    return [seen.body["messages"] for seen in server.requests]


async def test_a_streamed_answer_grows_by_edits_and_keeps_its_context_across_a_reset(
    synapse: SynapseServer,
    make_user: MakeUser,
    alice: Person,
    model_server: FakeOpenAI,
    tmp_path: Path,
) -> None:
    bot = make_user("bot")
    store = tmp_path / "store.sqlite3"
    settings = model_bot(synapse, bot, store, model_server)
    question = "tell me about the weather in the mountains today please"
    async with running_bot(settings):
        room_id = await open_chat(alice, bot.user_id)
        started = trio.current_time()
        reply = await ask(alice, room_id, bot.user_id, question, f"Echo: {question}")
        took = trio.current_time() - started
        await ask(alice, room_id, bot.user_id, "and tomorrow?", "Echo: and tomorrow?")

    events = alice.timeline[room_id]
    edits = edits_of(events, reply)
    assert reply.content["msgtype"] == "m.notice"
    assert edits, "the answer should appear early and grow by edits"
    assert edits[-1].content["m.new_content"]["body"] == f"Echo: {question}"
    print(f"\nstreamed answer: {len(edits)} edits, {took:.2f} s from question to final text")
    # The second question went with the first exchange as context.
    second = sent_messages(model_server)[-1]
    assert {"role": "user", "content": question} in second
    assert {"role": "assistant", "content": f"Echo: {question}"} in second

    # The store is lost: the context comes back from the room's history.
    for path in tmp_path.glob("store.sqlite3*"):
        path.unlink()
    async with running_bot(settings):
        await ask(alice, room_id, bot.user_id, "and the day after?", "Echo: and the day after?")
    third = sent_messages(model_server)[-1]
    assert {"role": "user", "content": question} in third
    assert {"role": "assistant", "content": "Echo: and tomorrow?"} in third


async def test_per_chat_model_survives_a_reset_and_forget_clears_the_context(
    synapse: SynapseServer,
    make_user: MakeUser,
    alice: Person,
    model_server: FakeOpenAI,
    tmp_path: Path,
) -> None:
    bot = make_user("bot")
    settings = model_bot(synapse, bot, tmp_path / "store.sqlite3", model_server)
    async with running_bot(settings):
        room_id = await open_chat(alice, bot.user_id)
        await ask(
            alice, room_id, bot.user_id, "!model other-model", "Model for this chat: other-model"
        )
        await ask(alice, room_id, bot.user_id, "first", "Echo: first")
        assert model_server.requests[-1].body["model"] == "other-model"
        await ask(
            alice,
            room_id,
            bot.user_id,
            "!forget",
            "Forgotten: the next message starts a new conversation.",
        )
    for path in tmp_path.glob("store.sqlite3*"):
        path.unlink()
    async with running_bot(settings):
        await ask(alice, room_id, bot.user_id, "second", "Echo: second")
    last = model_server.requests[-1].body
    assert last["model"] == "other-model", "the chat's model came back from its marker"
    contents = [m["content"] for m in last["messages"]]
    assert "first" not in contents, "the context before !forget stays forgotten"


async def test_a_model_error_becomes_a_specific_notice_and_a_failed_record(
    synapse: SynapseServer,
    make_user: MakeUser,
    alice: Person,
    model_server: FakeOpenAI,
    tmp_path: Path,
) -> None:
    from fake_openai import Script

    bot = make_user("bot")
    settings = model_bot(synapse, bot, tmp_path / "store.sqlite3", model_server)
    async with running_bot(settings) as runtime:
        room_id = await open_chat(alice, bot.user_id)
        model_server.then(Script(status=401))
        asked = await alice.say(room_id, "hello?")
        await alice.wait_until(
            lambda: asked in replies_to(alice.bot_notices(room_id, bot.user_id)),
            what="the failure notice",
        )
        assert await runtime._store.handled_outcome(asked) == "failed"
    notice = next(e for e in alice.bot_notices(room_id, bot.user_id) if asked in replies_to([e]))
    text = final_text(alice.timeline[room_id], notice)
    assert "key" in text.lower()
    assert API_KEY not in json.dumps(notice.content)


async def test_the_webhook_gets_a_signed_document_and_its_reply_is_posted(
    synapse: SynapseServer, make_user: MakeUser, alice: Person, tmp_path: Path
) -> None:
    secret = "a-shared-secret-of-some-length"
    received: list[tuple[bool, dict[str, Any]]] = []

    async def receiver(request: HTTPRequest, out: Responder) -> None:
        good = verify_signature(
            secret,
            request.body,
            request.headers.get("x-surfaces-signature"),
            request.headers.get("x-surfaces-timestamp"),
        )
        document = json.loads(request.body)
        received.append((good, document))
        reply = json.dumps({"reply": f"hook says: {document['body']}"}).encode()
        await out.send(200 if good else 401, reply, content_type="application/json")

    bot = make_user("bot")
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, receiver)
        webhook = WebhookSettings(url=f"http://127.0.0.1:{port}/hook", secret=secret)
        settings = replace(
            bot_settings(synapse, bot, tmp_path / "store.sqlite3"),
            backend="webhook",
            webhook=webhook,
        )
        async with running_bot(settings):
            room_id = await open_chat(alice, bot.user_id)
            await ask(alice, room_id, bot.user_id, "ping", "hook says: ping")
        nursery.cancel_scope.cancel()
    # Everything the bot sent here (the greeting, the answer), as Synapse kept it,
    # notifies no one (issue 21).
    sent = [e for e in alice.timeline[room_id] if e.sender == bot.user_id]
    sent = [e for e in sent if e.type == "m.room.message"]
    assert len(sent) >= 2
    assert all(e.content.get("m.mentions") == {} for e in sent), [e.content for e in sent]
    good, document = received[-1]
    assert good, "the signature verifies on the receiving side"
    assert document["room_id"] == room_id
    assert document["sender"] == alice.user.user_id
    assert document["body"] == "ping"


async def test_a_crash_mid_stream_never_leaves_two_answers(
    synapse: SynapseServer,
    make_user: MakeUser,
    alice: Person,
    model_server: FakeOpenAI,
    tmp_path: Path,
) -> None:
    """kill -9 while the reply is growing: after the restart the same reply is
    completed by an edit; the room never shows a second answer."""
    from faults.harness.lab import fault_lab

    model_server.token_delay = 0.15  # about six seconds for the whole answer
    question = " ".join(f"word{i}" for i in range(40))
    expected = f"Echo: {question}"
    bot = make_user("bot")
    async with fault_lab(tmp_path / "lab") as lab:
        process, room_id = await start_bot_process(
            lab,
            synapse,
            bot,
            alice,
            secret=API_KEY,
            BOT_BACKEND="model",
            MODEL_BASE_URL=model_server.base_url,
            MODEL_NAME="test-model",
            MODEL_API_KEY=API_KEY,
            MODEL_EDIT_INTERVAL_S="0.3",
        )
        asked = await alice.say(room_id, question)

        def reply() -> RoomEvent | None:
            return next(
                (e for e in alice.bot_notices(room_id, bot.user_id) if asked in replies_to([e])),
                None,
            )

        # The reply exists and has grown by at least one edit, but is not finished.
        await alice.wait_until(
            lambda: (r := reply()) is not None and bool(edits_of(alice.timeline[room_id], r)),
            what="the reply to start growing",
        )
        started = reply()
        assert started is not None
        assert final_text(alice.timeline[room_id], started) != expected
        await process.kill()

        await process.start()
        await process.wait_ready()
        await alice.wait_until(
            lambda: final_text(alice.timeline[room_id], started) == expected,
            timeout=60,
            what="the same reply to be completed",
        )
        await alice.sync_once(timeout_ms=1500)
        await process.stop()

    answers = [e for e in alice.bot_notices(room_id, bot.user_id) if asked in replies_to([e])]
    assert [e.event_id for e in answers] == [started.event_id], "one reply event, no second answer"


async def test_a_message_whose_handling_keeps_ending_the_bot_is_given_up(
    synapse: SynapseServer, make_user: MakeUser, alice: Person, tmp_path: Path
) -> None:
    """kill -9 every time the bot is handling one message: once more than
    MAX_RESUMPTIONS runs have taken it up again, the next gives it up with a notice
    instead of handling it, and the room goes on."""
    from faults.harness.lab import fault_lab
    from faults.harness.store_view import read_store

    secret = "a-shared-secret-of-some-length"
    asked_of_hook: list[str] = []

    async def receiver(request: HTTPRequest, out: Responder) -> None:
        body = json.loads(request.body)["body"]
        asked_of_hook.append(body)
        if body == "poison":
            await trio.sleep_forever()  # until the bot is killed, and then for good
        reply = json.dumps({"reply": f"hook says: {body}"}).encode()
        await out.send(200, reply, content_type="application/json")

    bot = make_user("bot")
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, receiver)
        async with fault_lab(tmp_path / "lab") as lab:
            process, room_id = await start_bot_process(
                lab,
                synapse,
                bot,
                alice,
                secret=secret,
                BOT_BACKEND="webhook",
                WEBHOOK_URL=f"http://127.0.0.1:{port}/hook",
                WEBHOOK_SECRET=secret,
                WEBHOOK_TIMEOUT_S="120",
            )
            poison = await alice.say(room_id, "poison")
            for runs in range(1, MAX_RESUMPTIONS + 2):
                await alice.wait_until(
                    lambda runs=runs: asked_of_hook.count("poison") == runs,
                    what=f"run {runs} to hand the message to the webhook",
                )
                await process.kill()
                await process.start()
                await process.wait_ready()

            await alice.wait_until(
                lambda: poison in replies_to(alice.bot_notices(room_id, bot.user_id)),
                what="the notice that the message was given up",
            )
            await ask(alice, room_id, bot.user_id, "after", "hook says: after")
            [given_up] = process.events("event_quarantined")
            await process.stop()
        nursery.cancel_scope.cancel()

    # Taken up again by MAX_RESUMPTIONS runs, each killed; the next did not try.
    assert asked_of_hook.count("poison") == MAX_RESUMPTIONS + 1
    assert given_up["event_id"] == poison
    assert f"{MAX_RESUMPTIONS + 1} runs of the bot in a row" in given_up["reason"]
    [notice] = [e for e in alice.bot_notices(room_id, bot.user_id) if poison in replies_to([e])]
    assert notice.content["body"].endswith(FAILED_NOTICE)
    assert read_store(process.store_path).handled[poison] == "quarantined"
