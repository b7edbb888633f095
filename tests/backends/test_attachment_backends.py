"""What the backends do with an attachment (bot/attachments.py): the model backend sends
an image as an ``image_url`` part (a base64 ``data:`` URL) next to the caption and a text
file as text, over the real wire to the fake OpenAI server, and logs neither; the
webhook document carries the ``mxc://`` URI and metadata, never bytes."""

from __future__ import annotations

import base64
import json
import random
import threading
from dataclasses import replace
from typing import Any

import trio

from bot.attachments import LoadedImage, LoadedText, parse_attachment
from bot.backends.backoff import Backoff
from bot.backends.context import Turn
from bot.backends.model import ModelBackend, ModelSettings
from bot.backends.streaming import NullSink
from bot.backends.webhook import WebhookBackend, WebhookSettings
from bot.chats import Chat
from bot.messages import IncomingMessage, parse_incoming
from conftest import Logs
from fake_openai import API_KEY, FakeOpenAI, Script
from matrix_api.models import EventID, RoomEvent, RoomID

CHAT = Chat("c_test", RoomID("!room:example.org"), "@alice:example.org", "Test", 0)
PIXELS = b"\x89PNG\r\n\x1a\n pretend these are the checked bytes"


def incoming(content: dict[str, Any]) -> IncomingMessage:
    event = RoomEvent(
        type="m.room.message",
        event_id=EventID("$q"),
        sender="@alice:example.org",
        origin_server_ts=1,
        content=content,
    )
    message = parse_incoming(event, "@bot:example.org")
    assert message is not None
    return message


def with_loaded(message: IncomingMessage, loaded: LoadedImage | LoadedText) -> IncomingMessage:
    assert message.attachment is not None
    return replace(message, attachment=replace(message.attachment, loaded=loaded))


async def answer(server: FakeOpenAI, message: IncomingMessage, context: list[Turn]) -> str:
    settings = ModelSettings(
        base_url=server.base_url, model="test-model", api_key=API_KEY, system_prompt="Be brief."
    )
    async with ModelBackend(settings) as backend:
        with trio.fail_after(10):
            return await backend.reply_streaming(CHAT, message, context, NullSink())


async def test_an_image_is_an_image_part_after_its_caption(openai: FakeOpenAI, logs: Logs) -> None:
    message = with_loaded(
        incoming(
            {
                "msgtype": "m.image",
                "body": "what is this?",
                "filename": "cat.png",
                "url": "mxc://example.org/abc",
            }
        ),
        LoadedImage("image/png", PIXELS),
    )
    context = [Turn("user", "hi"), Turn("assistant", "hello")]
    await answer(openai, message, context)

    (seen,) = openai.requests
    messages = seen.body["messages"]
    assert messages[:3] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    assert messages[3] == {
        "role": "user",
        "content": [
            {"type": "text", "text": "[image: cat.png]\nwhat is this?"},
            {
                "type": "image_url",
                "image_url": {"url": "data:image/png;base64," + base64.b64encode(PIXELS).decode()},
            },
        ],
    }
    logged = json.dumps([dict(entry) for entry in logs], default=str)
    assert base64.b64encode(PIXELS).decode()[:16] not in logged
    request = next(entry for entry in logs if entry["event"] == "model_request")
    assert request["image_bytes"] == len(PIXELS)


async def test_a_text_file_is_text_in_the_question(openai: FakeOpenAI) -> None:
    message = with_loaded(
        incoming(
            {
                "msgtype": "m.file",
                "body": "summarise",
                "filename": "notes.md",
                "url": "mxc://example.org/abc",
                "info": {"mimetype": "text/markdown"},
            }
        ),
        LoadedText("# Notes\n- one\n- two\n"),
    )
    await answer(openai, message, [])
    last = openai.requests[0].body["messages"][-1]
    assert last == {
        "role": "user",
        "content": "[file: notes.md]\nsummarise\n\n--- notes.md ---\n# Notes\n- one\n- two\n",
    }


async def test_without_an_attachment_the_wire_format_is_unchanged(openai: FakeOpenAI) -> None:
    await answer(openai, IncomingMessage(EventID("$q"), "@alice:example.org", "plain", 1), [])
    assert openai.requests[0].body["messages"][-1] == {"role": "user", "content": "plain"}


def test_the_webhook_document_has_the_uri_and_metadata_only() -> None:
    settings = WebhookSettings(url="http://127.0.0.1:1/hook", secret="s" * 32)
    backend = WebhookBackend(settings)
    message = with_loaded(
        incoming(
            {
                "msgtype": "m.image",
                "body": "cat.png",
                "url": "mxc://example.org/abc",
                "info": {"mimetype": "image/png", "size": 1234},
            }
        ),
        LoadedImage("image/png", PIXELS),  # even if something read it: never sent
    )
    document = backend.document(CHAT, message, [])
    assert document["body"] == "[image: cat.png]"
    assert document["attachment"] == {
        "msgtype": "m.image",
        "url": "mxc://example.org/abc",
        "name": "cat.png",
        "mimetype": "image/png",
        "size": 1234,
        "encrypted": False,
    }
    encoded = json.dumps(document)
    assert base64.b64encode(PIXELS).decode()[:16] not in encoded
    assert "PNG" not in encoded


def test_a_plain_message_has_no_attachment_key() -> None:
    settings = WebhookSettings(url="http://127.0.0.1:1/hook", secret="s" * 32)
    document = WebhookBackend(settings).document(
        CHAT, IncomingMessage(EventID("$q"), "@a:b", "hi", 1), []
    )
    assert "attachment" not in document
    assert parse_attachment({"msgtype": "m.file"}).uri is None


async def test_an_image_request_is_encoded_once_and_sent_again_the_same_on_a_retry(
    openai: FakeOpenAI,
) -> None:
    openai.then(Script(status=503), Script())
    message = with_loaded(
        incoming({"msgtype": "m.image", "body": "x.png", "url": "mxc://example.org/abc"}),
        LoadedImage("image/png", PIXELS * 1000),
    )
    settings = ModelSettings(base_url=openai.base_url, model="test-model", api_key=API_KEY)
    backoff = Backoff(max_attempts=3, base_delay=0.01, max_delay=0.02, rng=random.Random(1))
    encodings = 0
    async with ModelBackend(settings, backoff=backoff) as backend:
        encode = backend._encoded_payload

        def counting(*args: Any) -> tuple[dict[str, Any], bytes]:
            nonlocal encodings
            encodings += 1
            assert threading.current_thread() is not threading.main_thread()
            return encode(*args)

        backend._encoded_payload = counting  # type: ignore[method-assign]
        with trio.fail_after(10):
            await backend.reply_streaming(CHAT, message, [], NullSink())
    first, second = openai.requests
    assert first.body == second.body
    assert encodings == 1
    part = second.body["messages"][-1]["content"][1]
    assert part["image_url"]["url"] == LoadedImage("image/png", PIXELS * 1000).data_url()
    assert second.headers["content-type"] == "application/json"
