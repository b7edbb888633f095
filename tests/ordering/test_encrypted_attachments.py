"""Attachments in an encrypted room (issue 23): the user's device (a `Peer`, matrix_crypto's
OlmMachine) sends ``m.image``/``m.file`` events whose ``file`` carries the AES-CTR key,
the IV and the SHA-256 of the ciphertext the fake content repository serves. The bot
decrypts the event, downloads the ciphertext through the authenticated media API,
checks the hash, decrypts it and hands the backend the image or the text; a tampered
download or damaged key material gets its notice (encrypted, recorded as notified), and
bad key material is refused without a download. Nothing of the content is logged.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import struct
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import unquote

import httpx
import trio
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from bot.attachments import LoadedImage, LoadedText, MediaLimits, Notices
from bot.backend_settings.model import ModelSettings
from bot.backends.context import Turn
from bot.backends.streaming import ReplyOverrides, ReplySink
from bot.chats import Chat, marker_content
from bot.config import Settings
from bot.e2ee.sending import EncryptingClient
from bot.messages import IncomingMessage
from bot.runtime import BotRuntime
from bot.store import Store
from e2ee_peer import MEGOLM, Peer
from fake_homeserver import ALICE, BASE_TS, FakeHomeserver
from ordering_harness import Logs, RunningBot, chat, seed_store, ticking, until_handled

ROOM = "!enc:hs.test"
SETTLE_S = 10.0
DOWNLOAD_PREFIX = "/_matrix/client/v1/media/download/"
MARKER = b"encrypted-attachment-marker-91d2"
LIMITS = MediaLimits(max_image_bytes=64 * 1024, max_text_bytes=16 * 1024, timeout_s=20.0)
NOTICES = Notices(LIMITS)


def png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
        + chunk(b"tEXt", b"Comment\0" + MARKER)
        + chunk(b"IDAT", zlib.compress(b"\0\xff\0\0"))
        + chunk(b"IEND", b"")
    )


def unpadded(data: bytes, *, urlsafe: bool = False) -> str:
    encoded = base64.urlsafe_b64encode(data) if urlsafe else base64.b64encode(data)
    return encoded.decode().rstrip("=")


@dataclass
class Repository:
    """The content repository: ciphertexts by media id, and every download asked for."""

    files: dict[str, bytes] = field(default_factory=dict)
    downloads: list[str] = field(default_factory=list)

    def encrypted(self, media_id: str, plain: bytes) -> dict[str, Any]:
        """Store ``plain`` encrypted as a client does; the event's ``file`` object."""
        key, iv = os.urandom(32), os.urandom(8) + b"\0" * 8
        encryptor = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
        ciphertext = encryptor.update(plain) + encryptor.finalize()
        self.files[media_id] = ciphertext
        return {
            "v": "v2",
            "url": f"mxc://hs.test/{media_id}",
            "key": {
                "kty": "oct",
                "alg": "A256CTR",
                "ext": True,
                "key_ops": ["encrypt", "decrypt"],
                "k": unpadded(key, urlsafe=True),
            },
            "iv": unpadded(iv),
            "hashes": {"sha256": unpadded(hashlib.sha256(ciphertext).digest())},
        }

    def transport(self, hs: FakeHomeserver) -> httpx.MockTransport:
        async def handle(request: httpx.Request) -> httpx.Response:
            path = request.url.raw_path.decode("ascii").partition("?")[0]
            if not path.startswith(DOWNLOAD_PREFIX):
                return await hs.handle(request)
            assert request.headers["authorization"].startswith("Bearer ")
            server, media_id = (unquote(part) for part in path[len(DOWNLOAD_PREFIX) :].split("/"))
            self.downloads.append(media_id)
            data = self.files.get(media_id) if server == "hs.test" else None
            if data is None:
                return httpx.Response(404, json={"errcode": "M_NOT_FOUND", "error": "Not found"})
            return httpx.Response(200, content=data)

        return httpx.MockTransport(handle)


class SeeingBackend:
    """A backend that takes content (like the model backend) and says what it got."""

    name = "seeing"
    attachments = "content"

    def __init__(self) -> None:
        self.got: list[LoadedImage | LoadedText | None] = []

    async def reply_streaming(
        self,
        chat: Chat,
        message: IncomingMessage,
        context: list[Turn],
        sink: ReplySink,
        *,
        overrides: ReplyOverrides | None = None,
    ) -> str:
        loaded = message.attachment.loaded if message.attachment is not None else None
        self.got.append(loaded)
        return f"got {type(loaded).__name__}"


@asynccontextmanager
async def running_bot(
    settings: Settings, hs: FakeHomeserver, repository: Repository, backend: SeeingBackend
) -> AsyncIterator[RunningBot]:
    async with (
        ticking(),
        EncryptingClient(
            settings.homeserver,
            access_token=settings.access_token,
            user_id=settings.user_id,
            transport=repository.transport(hs),
        ) as client,
    ):
        store = await Store.open(settings.store_path, settings.user_id)
        try:
            runtime = BotRuntime(settings, client, store, backend, rng=random.Random(7))
            async with trio.open_nursery() as nursery:
                await nursery.start(runtime.run)
                assert runtime._crypto is not None, "end-to-end encryption is not up"
                await trio.sleep(SETTLE_S)
                bot = RunningBot(runtime, store)
                yield bot
                await bot.stop()
        finally:
            with trio.CancelScope(shield=True):
                await store.aclose()


async def test_encrypted_attachments_are_checked_decrypted_and_refused_when_damaged(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, logs: Logs, settings: Settings
) -> None:
    settings = replace(
        settings,
        model=ModelSettings(base_url="http://127.0.0.1:9/v1", model="m", vision=True),
        max_image_bytes=LIMITS.max_image_bytes,
        max_text_file_bytes=LIMITS.max_text_bytes,
        media_timeout_s=LIMITS.timeout_s,
    )
    known = chat("c0", ROOM)
    await seed_store(settings.store_path, chats=[known], token="s0")
    hs.add_room(ROOM, marker=marker_content(known), encryption={"algorithm": MEGOLM})
    hs.clock_base_ms = BASE_TS
    alice = Peer(hs, ALICE, "ALICEDEV")
    repository, backend = Repository(), SeeingBackend()
    image = png()
    text = b"name,qty\nbolts,12\n"

    def tampered() -> dict[str, Any]:
        file = repository.encrypted("tampered", image)
        repository.files["tampered"] = b"\x00" + repository.files["tampered"][1:]
        return file

    def short_key() -> dict[str, Any]:
        file = repository.encrypted("shortkey", image)
        file["key"]["k"] = unpadded(os.urandom(31), urlsafe=True)
        return file

    sent = {
        "$image": {"msgtype": "m.image", "body": "what is it?", "filename": "x.png"},
        "$text": {"msgtype": "m.file", "body": "parts.csv", "info": {"mimetype": "text/csv"}},
        "$tampered": {"msgtype": "m.image", "body": "t.png"},
        "$shortkey": {"msgtype": "m.image", "body": "k.png"},
    }
    files = {
        "$image": repository.encrypted("image", image),
        "$text": repository.encrypted("text", text),
        "$tampered": tampered(),
        "$shortkey": short_key(),
    }

    async with running_bot(settings, hs, repository, backend) as bot:
        key = alice.room_key_for_bot(ROOM)
        events = [
            alice.message(
                ROOM, event_id, "", ts=hs.now_ms(), content={**c, "file": files[event_id]}
            )
            for event_id, c in sent.items()
        ]
        hs.queue_sync({ROOM: events}, to_device=key)
        with trio.fail_after(120):
            await until_handled(bot.store, *sent)
        outcomes = {event_id: await bot.store.handled_outcome(event_id) for event_id in sent}

    assert outcomes == {
        "$image": "replied",
        "$text": "replied",
        "$tampered": "notified",
        "$shortkey": "notified",
    }
    assert backend.got == [LoadedImage("image/png", image), LoadedText(text.decode())]
    assert backend.got[0] is not None
    assert isinstance(backend.got[0], LoadedImage)
    assert backend.got[0].data == image
    # Bad key material is refused before anything is downloaded.
    assert sorted(repository.downloads) == ["image", "tampered", "text"]
    bodies = {
        sent_event.reply_to: alice.read(sent_event).content["body"]
        for sent_event in hs.sent_in(ROOM)
        if sent_event.reply_to in sent
    }
    assert bodies == {
        "$image": "got LoadedImage",
        "$text": "got LoadedText",
        "$tampered": NOTICES.bad_hash,
        "$shortkey": NOTICES.bad_encryption,
    }
    for entry in logs:
        shown = repr(entry)
        assert MARKER.decode() not in shown
        assert "bolts" not in shown
        assert files["$image"]["key"]["k"] not in shown
    stored = b"".join(path.read_bytes() for path in settings.store_path.parent.glob("*.sqlite3*"))
    assert MARKER not in stored
    assert b"bolts,12" not in stored
