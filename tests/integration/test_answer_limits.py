"""Answers from outside within limits, through the whole bot, against a real Synapse.

A model server that never stops streaming gets its answer cut at the bot's character
limit, with the note, in the room; a webhook that sends an endless body gets the user a
clear notice. Either way the bot answers the next message as usual.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import trio

from bot.backends.model import ModelSettings
from bot.backends.webhook import WebhookSettings
from bot_harness import Person, bot_settings, replies_to, running_bot
from conftest import MakeUser
from matrix_api.models import RoomID
from matrix_api.testing.synapse import SynapseServer
from mini_http import HTTPRequest, Responder, serve_http
from test_bot_backends import final_text, open_chat

SECRET = "a-shared-secret-of-some-length"


def token(text: str) -> bytes:
    return b"data: " + json.dumps({"choices": [{"delta": {"content": text}}]}).encode() + b"\n\n"


class FirstEndless:
    """The first request gets an endless answer (``endless``), later ones a short one."""

    def __init__(self) -> None:
        self.requests = 0

    async def model(self, request: HTTPRequest, out: Responder) -> None:
        self.requests += 1
        await out.start(200, {"Content-Type": "text/event-stream"}, chunked=True)
        if self.requests == 1:
            while True:
                await out.chunk(token("la "))
        await out.chunk(token("Short and sweet."))
        await out.chunk(b"data: [DONE]\n\n")
        await out.end()

    async def webhook(self, request: HTTPRequest, out: Responder) -> None:
        self.requests += 1
        if self.requests == 1:
            await out.start(200, {"Content-Type": "application/json"}, chunked=True)
            await out.chunk(b'{"reply": "')
            while True:
                await out.chunk(b"z" * 65536)
        await out.send(200, b'{"reply": "Short and sweet."}')


async def answer_to(alice: Person, room_id: RoomID, bot_id: str, text: str) -> str:
    asked = await alice.say(room_id, text)

    def reply() -> str | None:
        for event in alice.bot_notices(room_id, bot_id):
            if asked in replies_to([event]):
                shown = final_text(alice.timeline[room_id], event)
                if "cut" in shown or "Short" in shown or "too large" in shown:
                    return shown
        return None

    await alice.wait_until(lambda: reply() is not None, timeout=60, what="the answer")
    shown = reply()
    assert shown is not None
    return shown


async def test_an_endless_model_answer_is_cut_with_a_note_and_the_bot_goes_on(
    synapse: SynapseServer, make_user: MakeUser, alice: Person, tmp_path: Path
) -> None:
    server = FirstEndless()
    bot = make_user("bot")
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_http, server.model)
            model = ModelSettings(
                base_url=f"http://127.0.0.1:{port}/v1",
                model="m",
                edit_interval_s=0.3,
                max_answer_chars=600,
            )
            settings = replace(
                bot_settings(synapse, bot, tmp_path / "store.sqlite3"), backend="model", model=model
            )
            async with running_bot(settings):
                room_id = await open_chat(alice, bot.user_id)
                first = await answer_to(alice, room_id, bot.user_id, "sing")
                second = await answer_to(alice, room_id, bot.user_id, "briefly?")
            nursery.cancel_scope.cancel()
    assert first == ("la " * 200).rstrip() + "\n\n[answer cut: longer than 600 characters]"
    assert second == "Short and sweet."


async def test_an_endless_webhook_body_is_a_clear_notice_and_the_bot_goes_on(
    synapse: SynapseServer, make_user: MakeUser, alice: Person, tmp_path: Path
) -> None:
    server = FirstEndless()
    bot = make_user("bot")
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_http, server.webhook)
            webhook = WebhookSettings(
                url=f"http://127.0.0.1:{port}/hook", secret=SECRET, max_response_bytes=1 << 20
            )
            settings = replace(
                bot_settings(synapse, bot, tmp_path / "store.sqlite3"),
                backend="webhook",
                webhook=webhook,
            )
            async with running_bot(settings):
                room_id = await open_chat(alice, bot.user_id)
                first = await answer_to(alice, room_id, bot.user_id, "tell me everything")
                second = await answer_to(alice, room_id, bot.user_id, "briefly?")
            nursery.cancel_scope.cancel()
    assert first == (
        "The assistant service sent a reply too large for the bot to read (over 1048576 bytes)."
    )
    assert second == "Short and sweet."
