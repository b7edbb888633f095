"""Images and files (bot/attachments.py) with hostile inputs: wrong types, non-mxc and
http URLs, path traversal, huge and lying sizes, broken images, non-UTF-8 text, wrong
hashes and bad key material. The download is a fake `MediaSource` here (the limits of
the real one are tests/unit/test_media_endpoints.py)."""

from __future__ import annotations

import base64
import hashlib
import os
import struct
import zlib
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.attachments import (
    IMAGE_TYPES,
    Attachment,
    AttachmentRefused,
    LoadedImage,
    LoadedText,
    MediaLimits,
    Notices,
    attachment_document,
    decrypt_attachment,
    describe,
    has_vision,
    parse_attachment,
    read_attachment,
    read_encrypted_file,
    read_for_backend,
    sniff_image,
)
from bot.backend_settings.model import ModelSettings
from bot.backend_settings.reading import SettingsError
from bot.chats import Chat
from bot.config import ConfigError, Settings, load_settings
from bot.messages import IncomingMessage
from matrix_api import NetworkError, NotFound, ResponseLimitExceeded
from matrix_api.endpoints.media import MxcUri
from matrix_api.errors import MatrixError
from matrix_api.models import EventID, RoomID

KiB = 1024
LIMITS = MediaLimits(max_image_bytes=64 * KiB, max_text_bytes=8 * KiB, timeout_s=5.0)
NOTICES = Notices(LIMITS)
URI = "mxc://example.org/abc"


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int = 2, height: int = 2) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = b"".join(b"\0" + b"\xff\0\0" * width for _ in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def jpeg(width: int = 1, height: int = 1, *, tail: bytes = b"") -> bytes:
    """SOI, APP0, a baseline frame of one component, a scan, EOI (and ``tail``)."""

    def segment(marker: int, body: bytes) -> bytes:
        return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body

    return (
        b"\xff\xd8"
        + segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
        + segment(0xC0, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")
        + segment(0xDA, b"\x01\x01\x00\x00\x3f\x00")
        + b"\x12\x34\xff\x00\x56"
        + b"\xff\xd9"
        + tail
    )


JPEG = jpeg()
GIF = (
    b"GIF89a\x01\x00\x01\x00\x00\x00\x00"
    + b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
_VP8 = b"VP8L\x05\x00\x00\x00/\x00\x00\x00\x00\x00"
WEBP = b"RIFF" + struct.pack("<I", 4 + len(_VP8)) + b"WEBP" + _VP8


@dataclass
class FakeMedia:
    """A `MediaSource`: answers ``data`` (or raises ``error``), records each call."""

    data: bytes = b""
    error: Exception | None = None
    delay: float = 0.0
    calls: list[tuple[MxcUri, int, float]] = field(default_factory=list)

    async def download_media(self, uri: MxcUri, *, max_bytes: int, timeout_s: float) -> bytes:
        self.calls.append((uri, max_bytes, timeout_s))
        if self.delay:
            await trio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return self.data


def image(**extra: Any) -> Attachment:
    content = {"msgtype": "m.image", "body": "cat.png", "url": URI, **extra}
    return parse_attachment(content)


def text_file(
    name: str = "notes.txt", mimetype: str | None = "text/plain", **extra: Any
) -> Attachment:
    info = {"mimetype": mimetype} if mimetype is not None else {}
    return parse_attachment({"msgtype": "m.file", "body": name, "url": URI, "info": info, **extra})


async def read(source: FakeMedia, attachment: Attachment, *, vision: bool = True) -> Attachment:
    with trio.fail_after(10):
        return await read_attachment(source, attachment, LIMITS, vision=vision)


async def refused(
    source: FakeMedia, attachment: Attachment, *, vision: bool = True
) -> AttachmentRefused:
    with pytest.raises(AttachmentRefused) as raised:
        await read(source, attachment, vision=vision)
    return raised.value


# -- reading the event ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        {"msgtype": "m.image"},
        {"msgtype": "m.image", "body": 42, "url": 42, "info": "big"},
        {"msgtype": "m.image", "body": None, "url": None, "info": None, "filename": 7},
        {"msgtype": "m.image", "body": ["x"], "url": ["mxc://a/b"], "info": []},
        {"msgtype": "m.image", "url": URI, "info": {"size": "10", "mimetype": 5}},
        {"msgtype": "m.image", "url": URI, "info": {"size": True, "mimetype": None}},
        {"msgtype": "m.image", "url": URI, "info": {"size": -1}},
        {"msgtype": "m.image", "url": URI, "info": {"size": 1.5}},
        {"msgtype": "m.file", "url": URI, "file": "x"},
        {"msgtype": "m.file", "file": None},
        {"msgtype": 5, "url": URI},
    ],
)
def test_any_json_anywhere_is_read_without_raising(content: dict[str, Any]) -> None:
    attachment = parse_attachment(content)
    assert attachment.size is None or attachment.size >= 0
    assert isinstance(attachment.name, str)
    assert attachment.name
    assert attachment.mimetype is None or isinstance(attachment.mimetype, str)


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example/cat.png",
        "http://127.0.0.1:8008/_matrix/client/v3/account/whoami",
        "mxc://example.org/../../_matrix/client/v3/account/whoami",
        "mxc://example.org/a/b",
        "mxc://example.org/a%2F..",
        "mxc://evil.example@example.org/x",
        "//example.org/x",
        None,
        42,
    ],
)
async def test_a_url_that_is_not_a_strict_mxc_uri_is_never_downloaded(url: object) -> None:
    attachment = image(url=url)
    assert attachment.uri is None
    assert attachment.problem is not None
    source = FakeMedia(png())
    error = await refused(source, attachment)
    assert source.calls == []
    assert error.notice == NOTICES.download_failed
    assert str(url) not in error.reason or url is None


def test_caption_and_name_follow_the_spec() -> None:
    with_caption = parse_attachment(
        {"msgtype": "m.image", "body": "what is this?", "filename": "c.png", "url": URI}
    )
    assert (with_caption.name, with_caption.caption) == ("c.png", "what is this?")
    assert describe(with_caption) == "[image: c.png]\nwhat is this?"
    same = parse_attachment(
        {"msgtype": "m.image", "body": "c.png", "filename": "c.png", "url": URI}
    )
    assert (same.name, same.caption) == ("c.png", "")
    assert describe(same) == "[image: c.png]"


def test_a_name_is_cleaned_of_paths_and_control_characters() -> None:
    hostile = "../../etc/passwd\u202e\n\x00" + "a" * 1000
    attachment = text_file(name=hostile)
    assert "/" not in attachment.name
    assert "\n" not in attachment.name
    assert "\u202e" not in attachment.name
    assert "\x00" not in attachment.name
    assert len(attachment.name) <= 200


@pytest.mark.parametrize(
    ("name", "mimetype", "kind"),
    [
        ("notes.txt", "text/plain", "text"),
        ("README.md", "text/markdown", "text"),
        ("data.csv", "text/csv", "text"),
        ("data.json", "application/json", "text"),
        ("main.py", "text/x-python", "text"),
        ("main.py", "application/octet-stream", "text"),
        ("lib.rs", None, "text"),
        ("Makefile", None, "text"),
        ("report.pdf", "application/pdf", "other"),
        ("archive.zip", "application/zip", "other"),
        ("evil.txt", "application/x-msdownload", "other"),
        ("binary", "application/octet-stream", "other"),
        ("photo.jpg", "image/jpeg", "image"),
    ],
)
def test_text_is_decided_by_type_and_name(name: str, mimetype: str | None, kind: str) -> None:
    assert text_file(name=name, mimetype=mimetype).kind == kind


def test_audio_and_video_are_other() -> None:
    for msgtype in ("m.audio", "m.video"):
        assert parse_attachment({"msgtype": msgtype, "body": "a.txt", "url": URI}).kind == "other"


def test_the_webhook_document_has_the_uri_and_metadata_never_the_key() -> None:
    key, iv = os.urandom(32), os.urandom(16)
    attachment = parse_attachment(
        {
            "msgtype": "m.file",
            "body": "a.txt",
            "info": {"mimetype": "text/plain", "size": 12},
            "file": encrypted_file(b"ciphertext", key, iv),
        }
    )
    document = attachment_document(attachment)
    assert document == {
        "msgtype": "m.file",
        "url": URI,
        "name": "a.txt",
        "mimetype": "text/plain",
        "size": 12,
        "encrypted": True,
    }
    assert _b64(key) not in repr(document)
    assert _b64(key) not in repr(attachment)


# -- limits and checks -----------------------------------------------------------------------


async def test_an_image_goes_to_a_vision_model_as_what_its_bytes_are() -> None:
    source = FakeMedia(png())
    # The event says JPEG: the bytes decide.
    read_back = await read(source, image(info={"mimetype": "image/jpeg", "size": 10}))
    assert isinstance(read_back.loaded, LoadedImage)
    assert read_back.loaded.mimetype == "image/png"
    assert read_back.loaded.data_url().startswith("data:image/png;base64,iVBORw0KGgo")
    assert source.calls == [(MxcUri("example.org", "abc"), LIMITS.max_image_bytes, 5.0)]
    assert "data" not in repr(read_back)
    assert "iVBOR" not in repr(read_back.loaded)


@pytest.mark.parametrize(
    ("data", "mimetype"),
    [
        (png(), "image/png"),
        (png() + b"appended", "image/png"),
        (JPEG, "image/jpeg"),
        (jpeg(tail=b"\0" * 100 + b"a camera's appended video"), "image/jpeg"),
        (GIF, "image/gif"),
        (WEBP, "image/webp"),
    ],
)
def test_the_four_image_types_are_recognised(data: bytes, mimetype: str) -> None:
    assert sniff_image(data) == mimetype


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not an image at all",
        png()[:40],  # truncated upload
        png()[:-1],
        png()[:16] + b"\0" * 17 + png()[33:],  # IHDR broken (its CRC)
        png(width=0),
        JPEG[:-2],  # truncated: no end of image
        JPEG[:30],  # truncated in its headers
        jpeg(width=0),
        b"\xff\xd8\xff\xd9",
        b"\xff\xd8\xff\xe0\xff\xff" + b"\0" * 10,  # a segment longer than the file
        GIF[:-1],
        b"GIF89a\x00\x00\x00\x00" + b"\0" * 10 + b";",
        WEBP[:-1],
        b"RIFF\xff\xff\xff\xffWEBPVP8L" + b"\0" * 20,
        b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
        b"BM" + b"\0" * 100,  # BMP: not on the list
    ],
)
async def test_a_broken_or_unlisted_image_is_refused_with_its_notice(data: bytes) -> None:
    assert sniff_image(data) is None
    error = await refused(FakeMedia(data), image(info={"mimetype": "image/png"}))
    assert error.notice == NOTICES.broken_image


@pytest.mark.parametrize(
    "mimetype", ["image/svg+xml", "image/heic", "image/tiff", "image/bmp", "image/x-icon"]
)
async def test_an_image_type_not_on_the_list_is_refused_before_downloading(mimetype: str) -> None:
    source = FakeMedia(png())
    error = await refused(source, image(info={"mimetype": mimetype}))
    assert error.notice == NOTICES.what_i_read
    assert source.calls == []


@pytest.mark.parametrize("mimetype", [None, "", "image/jpg", "IMAGE/PNG; charset=x"])
async def test_a_missing_or_loose_image_type_is_left_to_the_bytes(mimetype: str | None) -> None:
    info = {} if mimetype is None else {"mimetype": mimetype}
    read_back = await read(FakeMedia(png()), image(info=info))
    assert isinstance(read_back.loaded, LoadedImage)


async def test_an_image_without_a_vision_model_is_refused_before_downloading() -> None:
    source = FakeMedia(png())
    error = await refused(source, image(), vision=False)
    assert error.notice == NOTICES.no_vision
    assert "text files" in error.notice
    assert "8 KB" in error.notice
    assert source.calls == []


async def test_a_declared_size_over_the_limit_is_refused_before_downloading() -> None:
    source = FakeMedia(png())
    error = await refused(source, image(info={"size": 10**15}))
    assert error.notice == NOTICES.too_large
    assert "64 KB" in error.notice
    assert "8 KB" in error.notice
    assert source.calls == []


@pytest.mark.parametrize("limit", ["max_body_bytes", "max_decoded_bytes"])
async def test_a_lying_small_size_is_caught_while_downloading(limit: str) -> None:
    source = FakeMedia(error=ResponseLimitExceeded("too big", limit=limit))
    error = await refused(source, image(info={"size": 10}))
    assert error.notice == NOTICES.too_large
    assert len(source.calls) == 1


async def test_bytes_over_the_limit_are_refused_whatever_the_source_did() -> None:
    source = FakeMedia(png() + b"\0" * LIMITS.max_image_bytes)
    assert (await refused(source, image(info={"size": 10}))).notice == NOTICES.too_large


async def test_a_download_that_never_ends_is_stopped_at_the_time_limit(
    autojump_clock: trio.abc.Clock,
) -> None:
    source = FakeMedia(png(), delay=3600)
    started = trio.current_time()
    error = await refused(source, image())
    assert error.notice == NOTICES.too_slow
    assert trio.current_time() - started == pytest.approx(LIMITS.timeout_s)


@pytest.mark.parametrize(
    ("error", "notice"),
    [
        (NotFound(404, "M_NOT_FOUND", "no such media"), "download_failed"),
        (MatrixError.from_response(502, {"errcode": "M_TOO_LARGE", "error": "x"}), "too_large"),
        (NetworkError("reset", maybe_processed=True), "download_failed"),
        (ResponseLimitExceeded("slow", limit="total_timeout_s"), "too_slow"),
    ],
)
async def test_a_failed_download_is_a_specific_notice(error: Exception, notice: str) -> None:
    refusal = await refused(FakeMedia(error=error), image())
    assert refusal.notice == getattr(NOTICES, notice)
    assert "no such media" not in refusal.reason


async def test_a_text_file_becomes_text() -> None:
    body = "# Title\nünïcode ✓\n".encode()
    read_back = await read(FakeMedia(b"\xef\xbb\xbf" + body), text_file("a.md", "text/markdown"))
    assert isinstance(read_back.loaded, LoadedText)
    assert read_back.loaded.text == body.decode()


@pytest.mark.parametrize(
    "data",
    [b"\xff\xfe\x00h\x00i", b"caf\xe9", b"ok\x00binary", b"\xc3", b"\xed\xa0\x80"],
    ids=["utf16", "latin1", "nul", "cut-sequence", "surrogate"],
)
async def test_a_text_file_that_is_not_utf8_is_refused(data: bytes) -> None:
    assert (await refused(FakeMedia(data), text_file())).notice == NOTICES.not_text


async def test_a_text_file_over_its_own_limit_is_refused() -> None:
    source = FakeMedia(b"a" * (LIMITS.max_text_bytes + 1))
    assert (await refused(source, text_file())).notice == NOTICES.too_large
    assert source.calls[0][1] == LIMITS.max_text_bytes


async def test_anything_else_gets_what_the_bot_reads() -> None:
    source = FakeMedia(b"%PDF-1.7")
    error = await refused(source, text_file("report.pdf", "application/pdf"))
    assert error.notice == NOTICES.what_i_read
    assert "64 KB" in error.notice
    assert "8 KB" in error.notice
    assert source.calls == []


# -- encrypted attachments -----------------------------------------------------------------


def _b64(data: bytes, *, urlsafe: bool = False) -> str:
    encoded = base64.urlsafe_b64encode(data) if urlsafe else base64.b64encode(data)
    return encoded.decode().rstrip("=")


def encrypt(plain: bytes, key: bytes, iv: bytes) -> bytes:
    encryptor = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    return encryptor.update(plain) + encryptor.finalize()


def encrypted_file(ciphertext: bytes, key: bytes, iv: bytes, /, **changes: Any) -> dict[str, Any]:
    file: dict[str, Any] = {
        "v": "v2",
        "url": URI,
        "key": {
            "kty": "oct",
            "alg": "A256CTR",
            "ext": True,
            "key_ops": ["encrypt", "decrypt"],
            "k": _b64(key, urlsafe=True),
        },
        "iv": _b64(iv),
        "hashes": {"sha256": _b64(hashlib.sha256(ciphertext).digest())},
    }
    file.update(changes)
    return file


def encrypted_image(file: dict[str, Any]) -> Attachment:
    return parse_attachment({"msgtype": "m.image", "body": "secret.png", "file": file})


async def test_an_encrypted_image_is_checked_then_decrypted() -> None:
    key, iv = os.urandom(32), os.urandom(8) + b"\0" * 8
    ciphertext = encrypt(png(), key, iv)
    attachment = encrypted_image(encrypted_file(ciphertext, key, iv))
    assert attachment.problem is None
    read_back = await read(FakeMedia(ciphertext), attachment)
    assert isinstance(read_back.loaded, LoadedImage)
    assert read_back.loaded.data == png()


# Known answers of another implementation: the v2 decryption vectors of
# matrix-org/browser-encrypt-attachment (test/decrypt.Spec.js), which Element's
# attachments follow: (ciphertext, key k, iv, sha256, plaintext), base64 as there.
_FF_KEY = "_" * 42 + "8"
VECTORS = [
    ("", "A" * 43, "A" * 22, "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU", ""),
    (
        "5xJZTt5cQicm+9f4",
        _FF_KEY,
        "//////////8AAAAAAAAAAA",
        "YzF08lARDdOCzJpzuSwsjTNlQc4pHxpdHcXiD/wpK6k",
        "SGVsbG8sIFdvcmxk",
    ),
    (
        "zhtFStAeFx0s+9L/sSQO+WQMtldqYEHqTxMduJrCIpnkyer09kxJJuA4K+adQE4w+7jZe/vR9kIcqj9rOhDR8Q",
        _FF_KEY,
        "//////////8AAAAAAAAAAA",
        "IOq7/dHHB+mfHfxlRY5XMeCWEwTPmlf4cJcgrkf6fVU",
        "YWxwaGFudW1lcmljYWxseWFscGhhbnVtZXJpY2FsbHlhbHBoYW51bWVyaWNhbGx5YWxwaGFudW1lcmljYWxseQ",
    ),
]


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


@pytest.mark.parametrize(("ciphertext", "k", "iv", "sha256", "plain"), VECTORS)
def test_the_known_answers_of_another_implementation(
    ciphertext: str, k: str, iv: str, sha256: str, plain: str
) -> None:
    file = {
        "v": "v2",
        "url": URI,
        "key": {"kty": "oct", "alg": "A256CTR", "key_ops": ["encrypt", "decrypt"], "k": k},
        "iv": iv,
        "hashes": {"sha256": sha256},
    }
    uri, material = read_encrypted_file(file)
    assert str(uri) == URI
    assert decrypt_attachment(_unb64(ciphertext), material) == _unb64(plain)


async def test_an_encrypted_file_whose_hash_does_not_match_is_refused() -> None:
    key, iv = os.urandom(32), os.urandom(16)
    ciphertext = encrypt(b"hello", key, iv)
    attachment = parse_attachment(
        {
            "msgtype": "m.file",
            "body": "a.txt",
            "info": {"mimetype": "text/plain"},
            "file": encrypted_file(ciphertext, key, iv),
        }
    )
    tampered = bytes([ciphertext[0] ^ 1]) + ciphertext[1:]
    error = await refused(FakeMedia(tampered), attachment)
    assert error.notice == NOTICES.bad_hash
    assert attachment.encrypted is not None
    with pytest.raises(ValueError, match="hash"):
        decrypt_attachment(tampered, attachment.encrypted)


KEY, IV = os.urandom(32), os.urandom(16)


@pytest.mark.parametrize(
    "changes",
    [
        {"v": "v1"},
        {"v": None},
        {"url": "https://evil.example/x"},
        {"url": "mxc://example.org/../x"},
        {"key": None},
        {"key": "k"},
        {"key": {"kty": "oct", "alg": "A128CTR", "key_ops": ["decrypt"], "k": _b64(KEY)}},
        {"key": {"kty": "RSA", "alg": "A256CTR", "key_ops": ["decrypt"], "k": _b64(KEY)}},
        {"key": {"kty": "oct", "alg": "A256CTR", "key_ops": ["encrypt"], "k": _b64(KEY)}},
        {"key": {"kty": "oct", "alg": "A256CTR", "key_ops": "decrypt", "k": _b64(KEY)}},
        {"key": {"kty": "oct", "alg": "A256CTR", "key_ops": ["decrypt"], "k": _b64(KEY[:31])}},
        {"key": {"kty": "oct", "alg": "A256CTR", "key_ops": ["decrypt"], "k": _b64(KEY + b"x")}},
        {"key": {"kty": "oct", "alg": "A256CTR", "key_ops": ["decrypt"], "k": "!!not base64!!"}},
        {"key": {"kty": "oct", "alg": "A256CTR", "key_ops": ["decrypt"], "k": 42}},
        {"key": {"kty": "oct", "alg": "A256CTR", "key_ops": ["decrypt"], "k": "A" * 100_000}},
        {"iv": _b64(IV[:8])},
        {"iv": None},
        {"iv": "*" * 22},
        {"hashes": {}},
        {"hashes": None},
        {"hashes": {"sha256": _b64(b"short")}},
        {"hashes": {"sha512": _b64(os.urandom(64))}},
    ],
)
async def test_malformed_key_material_is_a_clear_refusal(changes: dict[str, Any]) -> None:
    attachment = encrypted_image(encrypted_file(b"x", KEY, IV, **changes))
    assert attachment.problem is not None
    assert _b64(KEY) not in attachment.problem
    source = FakeMedia(b"x")
    error = await refused(source, attachment)
    assert source.calls == []
    url_problem = "url" in changes
    assert error.notice == (NOTICES.download_failed if url_problem else NOTICES.bad_encryption)


# -- who gets what -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vision", "models", "chosen", "expected"),
    [
        (True, frozenset(), None, True),
        (False, frozenset(), None, False),
        (True, frozenset(), "other", False),  # the chat chose a model not known to see
        (False, frozenset({"llava"}), "llava", True),
        (True, frozenset({"llava"}), "text-only", False),
        (False, frozenset({"base"}), None, True),
        (True, frozenset(), "base", True),  # the configured model, named
        (True, frozenset(), 42, True),
    ],
)
def test_vision_follows_the_chats_model(
    vision: bool, models: frozenset[str], chosen: object, expected: bool
) -> None:
    assert has_vision(vision, models, "base", chosen) is expected


class Backend:
    def __init__(self, attachments: str | None) -> None:
        if attachments is not None:
            self.attachments = attachments


def bot_settings(**model: Any) -> Settings:
    values = {"base_url": "http://127.0.0.1:1/v1", "model": "base", **model}
    return Settings(
        homeserver="http://hs",
        user_id="@bot:hs",
        max_image_bytes=LIMITS.max_image_bytes,
        max_text_file_bytes=LIMITS.max_text_bytes,
        media_timeout_s=LIMITS.timeout_s,
        model=ModelSettings.from_mapping(values),
    )


def incoming(attachment: Attachment | None) -> IncomingMessage:
    return IncomingMessage(EventID("$e"), "@alice:hs", "[image: cat.png]", 1, attachment)


CHAT = Chat("c", RoomID("!r:hs"), "@alice:hs", "T", 0)


async def test_a_reference_backend_gets_the_message_and_nothing_is_downloaded() -> None:
    source = FakeMedia(png())
    message = incoming(image())
    assert (
        await read_for_backend(source, Backend("reference"), bot_settings(), CHAT, message)
        is message
    )
    assert source.calls == []


async def test_a_backend_that_reads_no_attachments_refuses_them() -> None:
    with pytest.raises(AttachmentRefused) as raised:
        await read_for_backend(
            FakeMedia(png()), Backend(None), bot_settings(), CHAT, incoming(image())
        )
    assert raised.value.notice == NOTICES.no_attachments


async def test_a_content_backend_gets_the_image_when_the_chats_model_sees() -> None:
    source = FakeMedia(png())
    chat = replace(CHAT, settings={"model": "llava"})
    vision = bot_settings(vision=False, vision_models="llava, other")
    message = await read_for_backend(source, Backend("content"), vision, chat, incoming(image()))
    assert message.attachment is not None
    assert isinstance(message.attachment.loaded, LoadedImage)
    with pytest.raises(AttachmentRefused) as raised:
        await read_for_backend(source, Backend("content"), vision, CHAT, incoming(image()))
    assert raised.value.notice == NOTICES.no_vision


async def test_a_message_without_an_attachment_passes_unchanged() -> None:
    message = incoming(None)
    assert (
        await read_for_backend(FakeMedia(), Backend(None), bot_settings(), CHAT, message) is message
    )


# -- settings --------------------------------------------------------------------------------

BASE_ENV = {
    "MATRIX_HOMESERVER": "https://matrix.example.org",
    "MATRIX_USER_ID": "@bot:example.org",
    "MATRIX_ACCESS_TOKEN": "syt_token",
    "BOT_BACKEND": "model",
    "MODEL_BASE_URL": "http://127.0.0.1:8080/v1",
    "MODEL_NAME": "base",
}


def test_the_defaults_are_10_mb_images_1_mb_text_and_no_vision() -> None:
    loaded = load_settings(None, BASE_ENV)
    assert (loaded.max_image_bytes, loaded.max_text_file_bytes) == (10 * 1024 * KiB, 1024 * KiB)
    assert loaded.media_timeout_s == 30.0
    assert loaded.model is not None
    assert loaded.model.vision is False
    assert loaded.model.vision_models == frozenset()


def test_the_media_settings_are_read_from_the_environment() -> None:
    loaded = load_settings(
        None,
        {
            **BASE_ENV,
            "BOT_MAX_IMAGE_BYTES": "2048",
            "BOT_MAX_TEXT_FILE_BYTES": "4096",
            "BOT_MEDIA_TIMEOUT_S": "2.5",
            "MODEL_VISION": "true",
            "MODEL_VISION_MODELS": " llava , gpt-4o,,",
        },
    )
    assert (loaded.max_image_bytes, loaded.max_text_file_bytes) == (2048, 4096)
    assert loaded.media_timeout_s == 2.5
    assert loaded.model is not None
    assert loaded.model.vision is True
    assert loaded.model.vision_models == frozenset({"llava", "gpt-4o"})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BOT_MAX_IMAGE_BYTES", "ten"),
        ("BOT_MAX_IMAGE_BYTES", "0"),
        ("BOT_MAX_IMAGE_BYTES", "-5"),
        ("BOT_MAX_IMAGE_BYTES", str(10**12)),
        ("BOT_MAX_TEXT_FILE_BYTES", "1.5"),
        ("BOT_MEDIA_TIMEOUT_S", "0"),
        ("BOT_MEDIA_TIMEOUT_S", "inf"),
        ("MODEL_VISION", "maybe"),
    ],
)
def test_a_bad_media_setting_is_named(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(None, {**BASE_ENV, name: value})
    assert any(name in problem for problem in raised.value.problems)


def test_vision_models_must_be_names() -> None:
    values = {"base_url": "http://127.0.0.1:1/v1", "model": "base"}
    for bad in (["two words"], [1, 2], {"a": 1}, 7):
        with pytest.raises(SettingsError, match="MODEL_VISION_MODELS"):
            ModelSettings.from_mapping({**values, "vision_models": bad})
    assert ModelSettings.from_mapping({**values, "vision_models": ["a", "b"]}).vision_models == {
        "a",
        "b",
    }


# -- anything at all -------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
_fields = st.sampled_from(["msgtype", "body", "filename", "url", "info", "file"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_fields, _json), st.sampled_from(["m.image", "m.file", "m.video"]))
def test_parse_attachment_never_raises(content: dict[str, Any], msgtype: str) -> None:
    attachment = parse_attachment({**content, "msgtype": msgtype})
    assert (attachment.uri is None) == (attachment.problem is not None)
    assert describe(attachment).startswith("[")


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"RIFF\0\0\0\0WEBP"]),
    st.binary(max_size=200),
)
def test_sniff_image_never_raises(signature: bytes, tail: bytes) -> None:
    assert sniff_image(signature + tail) in (None, *IMAGE_TYPES)
