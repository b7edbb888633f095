"""Images and files through the whole bot against a real Synapse (issue 23).

A person uploads to Synapse's content repository (``POST /_matrix/media/v3/upload``,
plain HTTP as any client does) and sends ``m.image``/``m.file`` events; the bot
downloads through the authenticated media API and the fake OpenAI server of
tests/backends receives the image as an ``image_url`` part and the text file as text.
A 20 MB image whose event claims 1 KB is stopped at the image limit while downloading
and answered with the notice; nothing of an image is left in the store.
"""

from __future__ import annotations

import base64
import json
import struct
import zlib
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from structlog.testing import capture_logs

from bot.attachments import MediaLimits, Notices
from bot.backends.model import ModelSettings
from bot.backends.webhook import WebhookSettings
from bot.config import Settings
from bot_harness import (
    Person,
    bot_settings,
    fake_openai_server,
    open_chat,
    replies_to,
    running_bot,
)
from conftest import MakeUser
from fake_openai import API_KEY, FakeOpenAI
from matrix_api import new_txn_id
from matrix_api.models import RoomEvent, RoomID
from matrix_api.testing.synapse import RegisteredUser, SynapseServer
from mini_http import HTTPRequest, Responder, serve_http

MiB = 1024 * 1024
MARKER = b"surfaces-attachment-marker-5c1e"
LIMITS = MediaLimits(max_image_bytes=10 * MiB, max_text_bytes=1 * MiB, timeout_s=60.0)
NOTICES = Notices(LIMITS)


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png() -> bytes:
    """A 4x4 red PNG with a text chunk that would show if the bytes were stored."""
    rows = b"".join(b"\0" + b"\xff\0\0" * 4 for _ in range(4))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0))
        + chunk(b"tEXt", b"Comment\0" + MARKER)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
async def model_server() -> AsyncIterator[FakeOpenAI]:
    async with fake_openai_server("test-model", "text-model") as server:
        server.answer = "A small red square."
        yield server


def vision_bot(
    synapse: SynapseServer, bot: RegisteredUser, store: Path, server: FakeOpenAI
) -> Settings:
    model = ModelSettings(
        base_url=server.base_url, model="test-model", api_key=API_KEY, stream=False, vision=True
    )
    return replace(
        bot_settings(synapse, bot, store),
        backend="model",
        model=model,
        max_image_bytes=LIMITS.max_image_bytes,
        max_text_file_bytes=LIMITS.max_text_bytes,
        media_timeout_s=LIMITS.timeout_s,
    )


async def upload(synapse: SynapseServer, person: Person, data: bytes, kind: str, name: str) -> str:
    """What a client does before sending an attachment: the content repository's upload."""
    async with httpx.AsyncClient(timeout=120) as http:
        answer = await http.post(
            f"{synapse.base_url}/_matrix/media/v3/upload",
            params={"filename": name},
            content=data,
            headers={
                "Authorization": f"Bearer {person.user.access_token}",
                "Content-Type": kind,
            },
        )
    answer.raise_for_status()
    uri = answer.json()["content_uri"]
    assert isinstance(uri, str)
    assert uri.startswith("mxc://")
    return uri


async def send(person: Person, room_id: RoomID, content: dict[str, Any]) -> str:
    return await person.client.send_event(room_id, "m.room.message", content, new_txn_id())


async def answer_to(person: Person, room_id: RoomID, bot_id: str, event_id: str) -> RoomEvent:
    def found() -> RoomEvent | None:
        for notice in person.bot_notices(room_id, bot_id):
            if event_id in replies_to([notice]):
                return notice
        return None

    await person.wait_until(lambda: found() is not None, timeout=90, what="the bot's answer")
    notice = found()
    assert notice is not None
    return notice


async def test_an_image_reaches_the_model_as_an_image_part_and_a_20_mb_one_gets_the_notice(
    synapse: SynapseServer,
    make_user: MakeUser,
    alice: Person,
    model_server: FakeOpenAI,
    tmp_path: Path,
) -> None:
    bot = make_user("bot")
    store = tmp_path / "store.sqlite3"
    image = png()
    with capture_logs() as logs:
        await converse(synapse, alice, bot, store, model_server, image)
    refusals = [entry["reason"] for entry in logs if entry["event"] == "attachment_refused"]
    assert refusals == [
        f"download over {LIMITS.max_image_bytes} bytes",  # read until the limit, then stopped
        f"text over {LIMITS.max_text_bytes} bytes (as declared)",  # never downloaded
    ]
    logged = repr(logs)
    assert base64.b64encode(image)[:40].decode() not in logged
    assert MARKER.decode() not in logged

    # The conversation keeps what was sent, never the image.
    stored = b"".join(path.read_bytes() for path in tmp_path.glob("store.sqlite3*"))
    assert b"[image: square.png]" in stored
    assert MARKER not in stored
    assert base64.b64encode(image)[:40] not in stored


async def converse(
    synapse: SynapseServer,
    alice: Person,
    bot: RegisteredUser,
    store: Path,
    model_server: FakeOpenAI,
    image: bytes,
) -> None:
    async with running_bot(vision_bot(synapse, bot, store, model_server)):
        room_id = await open_chat(alice, bot.user_id)

        uri = await upload(synapse, alice, image, "image/png", "square.png")
        asked = await send(
            alice,
            room_id,
            {
                "msgtype": "m.image",
                "body": "what colour is this?",
                "filename": "square.png",
                "url": uri,
                "info": {"mimetype": "image/png", "size": len(image), "w": 4, "h": 4},
            },
        )
        reply = await answer_to(alice, room_id, bot.user_id, asked)
        assert reply.content["body"] == "A small red square."
        (seen,) = model_server.requests
        assert seen.body["messages"][-1] == {
            "role": "user",
            "content": [
                {"type": "text", "text": "[image: square.png]\nwhat colour is this?"},
                {
                    "type": "image_url",
                    "image_url": {
                        "url": "data:image/png;base64," + base64.b64encode(image).decode()
                    },
                },
            ],
        }

        source = b"def answer() -> int:\n    return 42\n"
        uri = await upload(synapse, alice, source, "text/x-python", "answer.py")
        asked = await send(
            alice,
            room_id,
            {"msgtype": "m.file", "body": "answer.py", "url": uri, "info": {"size": len(source)}},
        )
        await answer_to(alice, room_id, bot.user_id, asked)
        assert model_server.requests[-1].body["messages"][-1] == {
            "role": "user",
            "content": "[file: answer.py]\n\n--- answer.py ---\n" + source.decode(),
        }

        # 20 MB whose event claims 1 KB: stopped at the 10 MB image limit while reading.
        big = image + b"\0" * (20 * MiB)
        uri = await upload(synapse, alice, big, "image/png", "huge.png")
        asked = await send(
            alice,
            room_id,
            {
                "msgtype": "m.image",
                "body": "huge.png",
                "url": uri,
                "info": {"mimetype": "image/png", "size": 1024},
            },
        )
        notice = await answer_to(alice, room_id, bot.user_id, asked)
        assert notice.content["body"] == NOTICES.too_large
        assert "10 MB" in notice.content["body"]
        # The same 20 MB as a text file whose event says so: refused without a download.
        asked = await send(
            alice,
            room_id,
            {
                "msgtype": "m.file",
                "body": "huge.txt",
                "url": uri,
                "info": {"mimetype": "text/plain", "size": len(big)},
            },
        )
        notice = await answer_to(alice, room_id, bot.user_id, asked)
        assert notice.content["body"] == NOTICES.too_large
        assert len(model_server.requests) == 2  # neither went to the model


async def test_a_chat_whose_model_does_not_see_is_told_so(
    synapse: SynapseServer,
    make_user: MakeUser,
    alice: Person,
    model_server: FakeOpenAI,
    tmp_path: Path,
) -> None:
    bot = make_user("bot")
    async with running_bot(vision_bot(synapse, bot, tmp_path / "s.sqlite3", model_server)):
        room_id = await open_chat(alice, bot.user_id)
        switched = await alice.say(room_id, "!model text-model")
        await answer_to(alice, room_id, bot.user_id, switched)
        uri = await upload(synapse, alice, png(), "image/png", "square.png")
        asked = await send(alice, room_id, {"msgtype": "m.image", "body": "x.png", "url": uri})
        notice = await answer_to(alice, room_id, bot.user_id, asked)
    assert notice.content["body"] == NOTICES.no_vision
    assert model_server.requests == []


async def test_the_webhook_gets_the_mxc_uri_and_metadata(
    synapse: SynapseServer, make_user: MakeUser, alice: Person, tmp_path: Path
) -> None:
    received: list[dict[str, Any]] = []

    async def receiver(request: HTTPRequest, out: Responder) -> None:
        document = json.loads(request.body)
        received.append(document)
        await out.send(200, b'{"reply": "noted"}', content_type="application/json")

    bot = make_user("bot")
    image = png()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, receiver)
        webhook = WebhookSettings(url=f"http://127.0.0.1:{port}/hook", secret="s" * 32)
        settings = replace(
            bot_settings(synapse, bot, tmp_path / "store.sqlite3"),
            backend="webhook",
            webhook=webhook,
        )
        async with running_bot(settings):
            room_id = await open_chat(alice, bot.user_id)
            uri = await upload(synapse, alice, image, "image/png", "square.png")
            asked = await send(
                alice,
                room_id,
                {
                    "msgtype": "m.image",
                    "body": "square.png",
                    "url": uri,
                    "info": {"mimetype": "image/png", "size": len(image)},
                },
            )
            reply = await answer_to(alice, room_id, bot.user_id, asked)
        nursery.cancel_scope.cancel()
    assert reply.content["body"] == "noted"
    (document,) = received
    assert document["body"] == "[image: square.png]"
    assert document["attachment"] == {
        "msgtype": "m.image",
        "url": uri,
        "name": "square.png",
        "mimetype": "image/png",
        "size": len(image),
        "encrypted": False,
    }
