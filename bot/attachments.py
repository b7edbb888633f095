"""Images and files people send: what the bot reads, within which limits.

`parse_attachment` reads an ``m.image``/``m.file``/``m.audio``/``m.video`` content into
an `Attachment` (pure, never raises: a problem is kept as ``problem``). What happens
next depends on the backend (its ``attachments`` class attribute):

- ``"reference"`` (webhook): the backend gets the ``mxc://`` URI and the metadata
  (`attachment_document`), never the bytes; nothing is downloaded.
- ``"content"`` (model): `read_for_backend` downloads through the homeserver's
  authenticated media API, within a size and a time limit, decrypts an encrypted
  room's file (after checking its SHA-256), and keeps an image (PNG, JPEG, GIF, WebP,
  checked by its bytes, for a vision-capable model only) or a UTF-8 text file.
- anything else (echo): a notice.

Whatever cannot be read becomes `AttachmentRefused`, whose ``notice`` tells the user
in one sentence what the bot reads and whose ``reason`` goes to the log and the
ledger (never content, never a URI). The bytes live only in the `Attachment` handed
to the backend for this one answer: never in the store, never in a log line.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
import unicodedata
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, Protocol

import trio
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from matrix_api import MatrixAPIError, ResponseLimitExceeded
from matrix_api.endpoints.media import InvalidMxcUri, MxcUri, parse_mxc

if TYPE_CHECKING:  # bot.messages imports this module
    from .chats import Chat
    from .config import Settings
    from .messages import IncomingMessage

__all__ = [
    "ATTACHMENT_MSGTYPES",
    "IMAGE_TYPES",
    "Attachment",
    "AttachmentRefused",
    "EncryptedFile",
    "LoadedImage",
    "LoadedText",
    "MediaLimits",
    "MediaSource",
    "Notices",
    "attachment_document",
    "decrypt_attachment",
    "describe",
    "has_vision",
    "media_limits",
    "parse_attachment",
    "read_attachment",
    "read_encrypted_file",
    "read_for_backend",
    "sniff_image",
]

ATTACHMENT_MSGTYPES = frozenset({"m.image", "m.file", "m.audio", "m.video"})
Kind = Literal["image", "text", "other"]

_MiB = 1024 * 1024
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
# What an event may declare for an image that is read (its bytes decide which it is).
_DECLARED_IMAGE_TYPES = frozenset({*IMAGE_TYPES, "image/jpg", "image/pjpeg"})
# Besides text/*: what clients send for text files that are not text/ types.
_TEXT_APPLICATION_TYPES = frozenset(
    {
        "application/json",
        "application/ld+json",
        "application/x-ndjson",
        "application/xml",
        "application/javascript",
        "application/x-javascript",
        "application/typescript",
        "application/x-sh",
        "application/x-shellscript",
        "application/x-python",
        "application/x-python-code",
        "application/x-yaml",
        "application/yaml",
        "application/toml",
        "application/sql",
        "application/x-httpd-php",
        "application/csv",
    }
)
# When the type says nothing (none, or application/octet-stream), the name decides.
_UNTYPED = frozenset({"", "application/octet-stream", "binary/octet-stream"})
TEXT_EXTENSIONS = frozenset(
    {
        "txt", "text", "md", "markdown", "rst", "csv", "tsv", "json", "jsonl", "ndjson",
        "yaml", "yml", "toml", "ini", "cfg", "conf", "log", "xml", "html", "htm", "css",
        "py", "pyi", "js", "mjs", "cjs", "jsx", "tsx", "c", "h", "cc", "cpp", "hpp",
        "cs", "rs", "go", "java", "kt", "kts", "swift", "rb", "php", "pl", "lua", "r",
        "scala", "sh", "bash", "zsh", "fish", "ps1", "sql", "diff", "patch", "tex",
        "hs", "ml", "ex", "exs", "erl", "clj", "dart", "vue", "svelte", "nix", "proto",
        "graphql", "dockerfile", "makefile", "gradle", "cmake", "env", "properties",
    }
)  # fmt: skip
MAX_NAME_CHARS = 200


class AttachmentRefused(Exception):
    """The attachment is not read. ``notice`` is for the user (one short sentence);
    ``reason`` is for the log and the ledger (no content, no URI)."""

    def __init__(self, reason: str, notice: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.notice = notice


@dataclass(frozen=True, slots=True)
class EncryptedFile:
    """An encrypted room's attachment key material (``content.file``), checked."""

    key: bytes = field(repr=False)
    iv: bytes = field(repr=False)
    sha256: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class LoadedImage:
    mimetype: str
    """What the bytes are (sniffed), not what the event said."""
    data: bytes = field(repr=False)

    def data_url(self) -> str:
        return f"data:{self.mimetype};base64,{base64.b64encode(self.data).decode('ascii')}"


@dataclass(frozen=True, slots=True)
class LoadedText:
    text: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Attachment:
    """One message's attachment as its event describes it (no claim trusted), and,
    once `read_attachment` ran, its content (``loaded``)."""

    msgtype: str
    kind: Kind
    name: str
    caption: str
    mimetype: str | None
    size: int | None
    """The size the event claims: only ever used to refuse early, never to read."""
    uri: MxcUri | None
    encrypted: EncryptedFile | None = None
    problem: str | None = None
    """Why it cannot be downloaded at all (a bad URI, bad key material), or None."""
    loaded: LoadedImage | LoadedText | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class MediaLimits:
    max_image_bytes: int = 10 * _MiB
    max_text_bytes: int = 1 * _MiB
    timeout_s: float = 30.0

    def limit_for(self, kind: Kind) -> int:
        return self.max_image_bytes if kind == "image" else self.max_text_bytes


class MediaSource(Protocol):
    """Where the bytes come from: `matrix_api.MatrixClient.download_media`."""

    async def download_media(self, uri: MxcUri, *, max_bytes: int, timeout_s: float) -> bytes: ...


# -- reading the event ---------------------------------------------------------------------


def _clean_name(value: str) -> str:
    """A file name fit to show and to put in a prompt: no control or format
    characters, no path, bounded."""
    kept = "".join(c for c in value[: 4 * MAX_NAME_CHARS] if unicodedata.category(c)[0] != "C")
    kept = kept.replace("/", "_").replace("\\", "_").strip()
    return kept[:MAX_NAME_CHARS] or "attachment"


def _extension(name: str) -> str:
    base = name.rsplit("/", 1)[-1].lower()
    stem, dot, ext = base.rpartition(".")
    if dot and stem:
        return ext
    return base  # Makefile, Dockerfile


def _media_type(mimetype: str | None) -> str:
    """The declared media type without parameters; ``""`` for none."""
    return (mimetype or "").split(";", 1)[0].strip().lower()


def _kind(msgtype: str, mimetype: str | None, name: str) -> Kind:
    declared = _media_type(mimetype)
    if msgtype == "m.image" or declared.startswith("image/"):
        return "image"
    if msgtype != "m.file":
        return "other"  # audio, video
    if declared.startswith("text/") or declared in _TEXT_APPLICATION_TYPES:
        return "text"
    if declared in _UNTYPED and _extension(name) in TEXT_EXTENSIONS:
        return "text"
    return "other"


def _unpadded_b64(value: object, what: str, length: int) -> bytes:
    """Base64 (either alphabet, padded or not) decoding to exactly ``length`` bytes."""
    if not isinstance(value, str) or len(value) > 4 * length:
        raise ValueError(f"{what} is not a base64 string")
    text = value.replace("-", "+").replace("_", "/").rstrip("=")
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not valid base64") from None
    if len(raw) != length:
        raise ValueError(f"{what} is {len(raw)} bytes, not {length}")
    return raw


def read_encrypted_file(file: object) -> tuple[MxcUri, EncryptedFile]:
    """The URI and key material of an ``EncryptedFile`` object (``content.file``).

    Raises `ValueError` (saying what is wrong, never a key) or `InvalidMxcUri`.
    """
    if not isinstance(file, dict):
        raise ValueError("file is not an object")
    if file.get("v") != "v2":
        raise ValueError("file.v is not v2")
    uri = parse_mxc(file.get("url"))
    key = file.get("key")
    if not isinstance(key, dict):
        raise ValueError("file.key is not an object")
    if key.get("kty") != "oct" or key.get("alg") != "A256CTR":
        raise ValueError("file.key is not an A256CTR octet key")
    ops = key.get("key_ops")
    if not isinstance(ops, list) or "decrypt" not in ops:
        raise ValueError("file.key.key_ops does not allow decrypt")
    hashes = file.get("hashes")
    if not isinstance(hashes, dict):
        raise ValueError("file.hashes is not an object")
    material = EncryptedFile(
        key=_unpadded_b64(key.get("k"), "file.key.k", 32),
        iv=_unpadded_b64(file.get("iv"), "file.iv", 16),
        sha256=_unpadded_b64(hashes.get("sha256"), "file.hashes.sha256", 32),
    )
    return uri, material


def parse_attachment(content: Mapping[str, Any]) -> Attachment:
    """The attachment of an ``m.room.message`` whose msgtype is in `ATTACHMENT_MSGTYPES`.

    Never raises: any JSON type anywhere is possible, and a problem is kept in
    ``problem`` for a specific notice. ``body`` is the caption when ``filename`` is
    there and differs from it (spec 1.10), otherwise the file's name.
    """
    msgtype = content.get("msgtype")
    msgtype = msgtype if isinstance(msgtype, str) else "m.file"
    body = content.get("body")
    body = body if isinstance(body, str) else ""
    filename = content.get("filename")
    if isinstance(filename, str) and filename:
        name, caption = filename, (body if body != filename else "")
    else:
        name, caption = body, ""
    info = content.get("info")
    info = info if isinstance(info, dict) else {}
    mimetype = info.get("mimetype")
    mimetype = mimetype.strip().lower()[:255] if isinstance(mimetype, str) else None
    size = info.get("size")
    size = size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None
    name = _clean_name(name)
    kind = _kind(msgtype, mimetype, name)
    uri: MxcUri | None = None
    encrypted: EncryptedFile | None = None
    problem: str | None = None
    try:
        if "file" in content:
            uri, encrypted = read_encrypted_file(content["file"])
        else:
            uri = parse_mxc(content.get("url"))
    except InvalidMxcUri as exc:
        problem = f"bad media URI: {exc}"
    except ValueError as exc:
        problem = f"bad encryption details: {exc}"
    return Attachment(
        msgtype=msgtype,
        kind=kind,
        name=name,
        caption=caption,
        mimetype=mimetype,
        size=size,
        uri=uri,
        encrypted=encrypted,
        problem=problem,
    )


def describe(attachment: Attachment) -> str:
    """The message's text as a conversation keeps it: what was sent, and the caption
    (never the content: a stored or rebuilt conversation holds no file)."""
    what = "image" if attachment.kind == "image" else "file"
    head = f"[{what}: {attachment.name}]"
    return f"{head}\n{attachment.caption}" if attachment.caption else head


def attachment_document(attachment: Attachment) -> dict[str, Any]:
    """What the webhook gets: the ``mxc://`` URI and the metadata, never the bytes
    (nor an encrypted file's key: the URI alone gives nothing readable then)."""
    return {
        "msgtype": attachment.msgtype,
        "url": str(attachment.uri) if attachment.uri is not None else None,
        "name": attachment.name,
        "mimetype": attachment.mimetype,
        "size": attachment.size,
        "encrypted": attachment.encrypted is not None,
    }


def has_vision(
    vision: bool, vision_models: frozenset[str], default_model: str, chosen: object
) -> bool:
    """Whether the model a chat uses reads images: its own choice (``!model``) when it
    made one and it is named in ``vision_models``, else the configured model when
    ``vision`` is on."""
    if isinstance(chosen, str) and chosen and chosen != default_model:
        return chosen in vision_models
    return vision or default_model in vision_models


# -- the bytes ------------------------------------------------------------------------


def decrypt_attachment(ciphertext: bytes, material: EncryptedFile) -> bytes:
    """AES-256-CTR decryption of ``ciphertext`` after checking its SHA-256; raises
    `ValueError` when the hash does not match (nothing is decrypted then)."""
    digest = hashlib.sha256(ciphertext).digest()
    if not hmac.compare_digest(digest, material.sha256):
        raise ValueError("the content does not match its SHA-256 hash")
    decryptor = Cipher(algorithms.AES(material.key), modes.CTR(material.iv)).decryptor()
    return decryptor.update(ciphertext) + decryptor.finalize()


def _png_ok(data: bytes) -> bool:
    # Signature, then an IHDR chunk of 13 bytes with a matching CRC and a size.
    if len(data) < 33 or data[12:16] != b"IHDR" or data[8:12] != b"\x00\x00\x00\x0d":
        return False
    (crc,) = struct.unpack(">I", data[29:33])
    width, height = struct.unpack(">II", data[16:24])
    # The IEND chunk ends the image (a truncated upload has none); a few tools append
    # bytes after it, which decoders ignore.
    return (
        zlib.crc32(data[12:29]) == crc
        and width > 0
        and height > 0
        and data.rfind(b"\x00\x00\x00\x00IEND\xae\x42\x60\x82") > 33
    )


# Start-of-frame markers (C4 DHT, C8 JPG, CC DAC are not frames).
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_ok(data: bytes) -> bool:
    """The header segments are whole up to the first scan, a frame with a size comes
    before it, and an end-of-image marker after it (cameras may append bytes after
    that, which decoders ignore)."""
    at, end, frame = 2, len(data), False
    while at + 4 <= end:
        if data[at] != 0xFF:
            return False
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD9:
            if marker == 0xD9:  # the end before any scan
                return False
            at += 2
            continue
        (length,) = struct.unpack(">H", data[at + 2 : at + 4])
        if length < 2 or at + 2 + length > end:
            return False
        if marker in _JPEG_FRAMES:
            if length < 8:
                return False
            height, width = struct.unpack(">HH", data[at + 5 : at + 9])
            frame = width > 0 and height > 0
        if marker == 0xDA:  # start of scan: entropy-coded data until EOI
            return frame and data.find(b"\xff\xd9", at + 2 + length) != -1
        at += 2 + length
    return False


def _gif_ok(data: bytes) -> bool:
    width, height = struct.unpack("<HH", data[6:10]) if len(data) >= 13 else (0, 0)
    return width > 0 and height > 0 and data.rstrip(b"\x00").endswith(b"\x3b")


def _webp_ok(data: bytes) -> bool:
    (length,) = struct.unpack("<I", data[4:8])
    return length + 8 == len(data) and data[12:15] == b"VP8"


def sniff_image(data: bytes) -> str | None:
    """The image type of ``data`` when it is a whole PNG, JPEG, GIF or WebP file (by
    its signature and its structure's ends), else None: a truncated or damaged image
    is refused here rather than by the model."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png" if _png_ok(data) else None
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg" if _jpeg_ok(data) else None
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif" if _gif_ok(data) else None
    if len(data) >= 16 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp" if _webp_ok(data) else None
    return None


def _as_text(data: bytes) -> str | None:
    """``data`` as text when it is UTF-8 (a BOM dropped) without NUL bytes."""
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def size_words(limit: int) -> str:
    if limit >= _MiB:
        return f"{limit / _MiB:.3g} MB"
    return f"{limit / 1024:.3g} KB"


class Notices:
    """The sentences a user gets, with the configured limits in them."""

    def __init__(self, limits: MediaLimits) -> None:
        image = size_words(limits.max_image_bytes)
        text = size_words(limits.max_text_bytes)
        self.text_files = f"text files (plain text, Markdown, source code, JSON, CSV) up to {text}"
        self.what_i_read = (
            f"I can read images (PNG, JPEG, GIF or WebP, with a vision model) up to {image} "
            f"and {self.text_files}."
        )
        self.no_vision = (
            f"This chat's model cannot see images. I can read {self.text_files}; "
            "images need a vision model."
        )
        self.too_large = f"That file is too large for me. {self.what_i_read}"
        self.no_attachments = "This bot's backend does not read images or files."
        self.broken_image = (
            "I could not read that image: it is damaged or not a PNG, JPEG, GIF or WebP image."
        )
        self.not_text = "I could not read that file: it is not UTF-8 text."
        self.download_failed = (
            "I could not download that attachment from the homeserver. Please try again."
        )
        self.too_slow = "Downloading that attachment took too long. Please try again."
        self.bad_encryption = (
            "I could not decrypt that attachment: its encryption details are missing or damaged."
        )
        self.bad_hash = "I could not decrypt that attachment: its content does not match its hash."


async def read_attachment(
    source: MediaSource, attachment: Attachment, limits: MediaLimits, *, vision: bool
) -> Attachment:
    """``attachment`` with ``loaded`` set: the checked image or text.

    Refuses (`AttachmentRefused`) before any download what the bot does not read (a
    kind other than image or text, an image without ``vision``), what the event says
    is too large, and what cannot be downloaded (a bad URI or key material); then
    whatever breaks a limit while downloading (``limits``: the size of the bytes as
    they arrive, whatever the event or the server claim; the time of the whole), a
    hash that does not match, an image that is not one, text that is not UTF-8.
    """
    notices = Notices(limits)
    kind = attachment.kind
    if kind == "other":
        raise AttachmentRefused(
            f"unsupported attachment ({attachment.msgtype})", notices.what_i_read
        )
    if kind == "image" and not vision:
        raise AttachmentRefused("image for a model without vision", notices.no_vision)
    declared = _media_type(attachment.mimetype)
    if kind == "image" and declared and declared not in _DECLARED_IMAGE_TYPES:
        # SVG, HEIC, TIFF, BMP...: not downloaded (an absent type is left to the bytes).
        raise AttachmentRefused("image type not read", notices.what_i_read)
    if attachment.problem is not None or attachment.uri is None:
        reason = attachment.problem or "no media URI"
        text = notices.bad_encryption if "encryption" in reason else notices.download_failed
        raise AttachmentRefused(reason, text)
    limit = limits.limit_for(kind)
    if attachment.size is not None and attachment.size > limit:
        raise AttachmentRefused(f"{kind} over {limit} bytes (as declared)", notices.too_large)
    data = await _download(source, attachment.uri, limit, limits.timeout_s, notices)
    if attachment.encrypted is not None:
        try:
            # Hashing and decrypting 10 MiB take about 10 ms: off the trio thread.
            data = await trio.to_thread.run_sync(decrypt_attachment, data, attachment.encrypted)
        except ValueError as exc:
            raise AttachmentRefused(f"encrypted attachment: {exc}", notices.bad_hash) from None
    if kind == "image":
        sniffed = sniff_image(data)
        if sniffed is None:
            raise AttachmentRefused(
                "not a whole PNG, JPEG, GIF or WebP image", notices.broken_image
            )
        return replace(attachment, loaded=LoadedImage(sniffed, data))
    decoded = _as_text(data)
    if decoded is None:
        raise AttachmentRefused("text file that is not UTF-8", notices.not_text)
    return replace(attachment, loaded=LoadedText(decoded))


async def _download(
    source: MediaSource, uri: MxcUri, limit: int, timeout_s: float, notices: Notices
) -> bytes:
    # The client's own limits bound one answer; this bounds its retries as well.
    with trio.move_on_after(timeout_s) as scope:
        try:
            data = await source.download_media(uri, max_bytes=limit, timeout_s=timeout_s)
        except ResponseLimitExceeded as exc:
            if exc.limit in ("max_body_bytes", "max_decoded_bytes"):
                raise AttachmentRefused(f"download over {limit} bytes", notices.too_large) from None
            raise AttachmentRefused(f"download too slow ({exc.limit})", notices.too_slow) from None
        except MatrixAPIError as exc:
            # errcode or transport class only: a message could quote the server.
            what = getattr(exc, "errcode", None) or type(exc).__name__
            text = notices.too_large if what == "M_TOO_LARGE" else notices.download_failed
            raise AttachmentRefused(f"download failed: {what}", text) from None
    if scope.cancelled_caught:
        raise AttachmentRefused("download too slow", notices.too_slow)
    if len(data) > limit:  # the client's limit has room for an error answer
        raise AttachmentRefused(f"download over {limit} bytes", notices.too_large)
    return data


def media_limits(settings: Settings) -> MediaLimits:
    return MediaLimits(
        max_image_bytes=settings.max_image_bytes,
        max_text_bytes=settings.max_text_file_bytes,
        timeout_s=settings.media_timeout_s,
    )


async def read_for_backend(
    source: MediaSource,
    backend: object,
    settings: Settings,
    chat: Chat,
    message: IncomingMessage,
) -> IncomingMessage:
    """``message`` as ``backend`` takes it (see the module docstring): unchanged for a
    backend that takes references or when there is no attachment, with the content
    read for one that takes content. Raises `AttachmentRefused`."""
    attachment = message.attachment
    if attachment is None:
        return message
    mode = getattr(backend, "attachments", None)
    if mode == "reference":
        return message
    limits = media_limits(settings)
    if mode != "content":
        raise AttachmentRefused("backend reads no attachments", Notices(limits).no_attachments)
    model = settings.model
    vision = model is not None and has_vision(
        model.vision, model.vision_models, model.model, chat.settings.get("model")
    )
    loaded = await read_attachment(source, attachment, limits, vision=vision)
    return replace(message, attachment=loaded)
