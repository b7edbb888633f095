"""Encrypted attachments through the whole bot against a real Synapse (issue 23).

The person is matrix-js-sdk with its Rust crypto (tests/e2ee_client/driver.mjs,
js_client.py) in an encrypted direct chat with the model bot. It sends images and files
as Element does in an encrypted room: the file encrypted with AES-256-CTR in the client,
the ciphertext uploaded with the SDK's ``uploadContent``, the key, IV and SHA-256 in the
event's ``file`` (inside the megolm ciphertext). The bot downloads through the
authenticated media API, checks the hash, decrypts; the fake OpenAI server of
tests/backends records what reaches the model. Its answers are read as the js client
decrypts them.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import trio
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from structlog.testing import capture_logs

from bot.attachments import Notices, media_limits
from bot.config import Settings
from bot.invites import GREETING
from bot_harness import fake_openai_server, model_bot, running_bot
from fake_openai import FakeOpenAI, Script
from js_client import JsClient, Message, open_js_client
from matrix_api.testing.synapse import RegisteredUser, SynapseServer
from matrix_helpers import MakeUser

TIMEOUT = 60.0
"""Seconds any one wait may take (a loaded machine is slow, never this slow)."""
SCENARIO_S = 300
MARKER = b"surfaces-encrypted-attachment-marker-9f4a"


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png() -> bytes:
    """A valid 3x2 PNG (the bot checks an image's structure) with a text chunk that
    would show if its bytes were stored or logged."""
    rows = b"".join(b"\0" + b"\x00\x80\xff" * 3 for _ in range(2))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 3, 2, 8, 2, 0, 0, 0))
        + chunk(b"tEXt", b"Comment\0" + MARKER)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def vision_bot(
    synapse: SynapseServer, bot: RegisteredUser, store: Path, server: FakeOpenAI
) -> Settings:
    # Not streamed: one answer is one event.
    settings = model_bot(synapse, bot, store, server, vision=True, stream=False)
    return replace(settings, media_timeout_s=TIMEOUT)


def unpadded_b64(value: str) -> bytes:
    return base64.b64decode(value + "=" * (-len(value) % 4), altchars=b"-_")


async def ciphertext_on_server(synapse: SynapseServer, user: RegisteredUser, mxc: str) -> bytes:
    """What Synapse serves for ``mxc`` (authenticated media API, plain HTTP)."""
    server_name, media_id = mxc.removeprefix("mxc://").split("/", 1)
    path = f"/_matrix/client/v1/media/download/{quote(server_name)}/{quote(media_id)}"
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        answer = await http.get(
            f"{synapse.base_url}{path}", headers={"Authorization": f"Bearer {user.access_token}"}
        )
    answer.raise_for_status()
    return answer.content


def decrypt_as_the_spec_says(ciphertext: bytes, file: dict[str, Any]) -> bytes:
    """The spec's receiving side, written here without the bot's code: what proves the
    js client's encryption is the spec's, independently of the bot agreeing with it."""
    assert file["v"] == "v2"
    key = file["key"]
    assert (key["kty"], key["alg"], key["ext"]) == ("oct", "A256CTR", True)
    assert sorted(key["key_ops"]) == ["decrypt", "encrypt"]
    assert "=" not in key["k"]
    assert "=" not in file["iv"]
    assert "=" not in file["hashes"]["sha256"]
    iv = unpadded_b64(file["iv"])
    assert len(iv) == 16
    assert iv[8:] == bytes(8)
    assert hashlib.sha256(ciphertext).digest() == unpadded_b64(file["hashes"]["sha256"])
    decryptor = Cipher(algorithms.AES(unpadded_b64(key["k"])), modes.CTR(iv)).decryptor()
    return decryptor.update(ciphertext) + decryptor.finalize()


def assert_readable(answer: Message) -> None:
    assert answer.encrypted, "sent in the clear into an encrypted room"
    assert not answer.decryption_failure, answer.decryption_failure_reason
    assert answer.msgtype == "m.notice"


class Chat:
    """Alice (the js client) and the bot in their encrypted direct chat."""

    def __init__(self, alice: JsClient, room_id: str, bot_id: str, server: FakeOpenAI) -> None:
        self.alice = alice
        self.room_id = room_id
        self.bot_id = bot_id
        self.server = server

    async def send(
        self, data: bytes, *, tamper: bool = False, **event: Any
    ) -> tuple[str, dict[str, Any], Message]:
        """Sends ``data`` as an encrypted attachment; its event id, its ``file`` and the
        bot's answer to it (decrypted)."""
        event_id, file = await self.alice.send_encrypted_attachment(
            self.room_id, data, tamper=tamper, timeout=TIMEOUT, **event
        )
        answer = await self.alice.wait_for_message(
            self.room_id, sender=self.bot_id, in_reply_to=event_id, timeout=TIMEOUT
        )
        assert_readable(answer)
        return event_id, file, answer


def image_parts(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        part
        for message in messages
        if isinstance(message["content"], list)
        for part in message["content"]
        if part.get("type") == "image_url"
    ]


async def test_encrypted_attachments_from_matrix_js_sdk(
    synapse: SynapseServer, make_user: MakeUser, tmp_path: Path
) -> None:
    alice_user, bot = make_user("alice"), make_user("bot")
    store = tmp_path / "store.sqlite3"
    image = png()
    notes = "Einkaufsliste: Äpfel, Birnen ☕\nline two\n" + MARKER.decode() + "\n"
    with trio.fail_after(SCENARIO_S), capture_logs() as logs:
        async with (
            fake_openai_server() as server,
            running_bot(settings := vision_bot(synapse, bot, store, server)),
            open_js_client("alice") as alice,
        ):
            notices = Notices(media_limits(settings))
            await alice.login(synapse.base_url, alice_user.user_id, alice_user.password)
            room_id = await alice.create_encrypted_dm(bot.user_id)
            greeting = await alice.wait_for_message(room_id, sender=bot.user_id, timeout=TIMEOUT)
            assert greeting.body == GREETING
            chat = Chat(alice, room_id, bot.user_id, server)

            # 1. An encrypted PNG reaches the model as an image part of exactly its bytes.
            server.then(Script(answer="Three blue pixels on two rows."))
            image_event, image_file, answer = await chat.send(
                image,
                msgtype="m.image",
                body="what is this?",
                filename="pixels.png",
                mimetype="image/png",
            )
            assert answer.body == "Three blue pixels on two rows."
            (seen,) = server.requests
            last = seen.body["messages"][-1]
            assert last["role"] == "user"
            assert last["content"][0] == {
                "type": "text",
                "text": "[image: pixels.png]\nwhat is this?",
            }
            (part,) = image_parts([last])
            url = part["image_url"]["url"]
            assert url.startswith("data:image/png;base64,")
            assert (
                base64.b64decode(url.removeprefix("data:image/png;base64,"), validate=True) == image
            )
            # What the server holds is ciphertext; the spec's decryption, not the bot's,
            # gives the PNG back.
            held = await ciphertext_on_server(synapse, alice_user, image_file["url"])
            assert MARKER not in held
            assert held != image
            assert decrypt_as_the_spec_says(held, image_file) == image

            # 2. A ciphertext that does not match its hash: refused with the notice,
            # nothing reaches the model.
            tampered_event, tampered_file, notice = await chat.send(
                image,
                tamper=True,
                msgtype="m.image",
                body="and this?",
                filename="tampered.png",
                mimetype="image/png",
            )
            assert notice.body == notices.bad_hash
            assert len(server.requests) == 1
            held = await ciphertext_on_server(synapse, alice_user, tampered_file["url"])
            assert hashlib.sha256(held).digest() != unpadded_b64(tampered_file["hashes"]["sha256"])

            # 3. An encrypted text file (UTF-8, not ASCII) reaches the model as text.
            server.then(Script(answer="A shopping list."))
            text_event, _, answer = await chat.send(
                notes.encode(), body="notes.txt", mimetype="text/plain"
            )
            assert answer.body == "A shopping list."
            assert len(server.requests) == 2
            messages = server.requests[-1].body["messages"]
            assert messages[-1] == {
                "role": "user",
                "content": f"[file: notes.txt]\n\n--- notes.txt ---\n{notes}",
            }
            # The image went to the model once, for its own answer: the conversation
            # keeps what was sent, not the picture.
            assert image_parts(messages) == []
            assert {"role": "user", "content": "[image: pixels.png]\nwhat is this?"} in messages

            # Each got exactly one answer, and the person's events went encrypted.
            listing = await alice.messages(room_id)
            sent = {m.event_id: m for m in listing}
            for event_id in (image_event, tampered_event, text_event):
                assert sent[event_id].encrypted
                assert "file" in sent[event_id].content
                assert "url" not in sent[event_id].content
                replies = [
                    m
                    for m in listing
                    if m.sender == bot.user_id
                    and (m.wire_relates_to or {}).get("m.in_reply_to", {}).get("event_id")
                    == event_id
                ]
                assert len(replies) == 1, (event_id, [m.body for m in replies])

    refusals = [entry["reason"] for entry in logs if entry["event"] == "attachment_refused"]
    assert refusals == ["encrypted attachment: the content does not match its SHA-256 hash"]
    # Neither the files nor their keys are in a log line or the store.
    logged = repr(logs)
    stored = b"".join(path.read_bytes() for path in tmp_path.glob("store.sqlite3*"))
    for secret in (image_file["key"]["k"], tampered_file["key"]["k"], MARKER.decode()):
        assert secret not in logged
        assert secret.encode() not in stored
    assert base64.b64encode(image)[:40] not in stored
