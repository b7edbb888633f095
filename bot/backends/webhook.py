"""The ``webhook`` backend: a team's own service answers, over one signed POST.

The bot POSTs a JSON document to the configured URL::

    {"chat_id": "...", "room_id": "!...", "sender": "@...", "event_id": "$...",
     "thread_id": "$..." or null, "body": "the message",
     "context": [{"role": "user", "content": "..."}, ...]}

and, for an image or a file, ``"attachment": {"msgtype": "m.image", "url":
"mxc://server/id", "name": "...", "mimetype": "...", "size": 123, "encrypted": false}``
(``body`` then describes it): the URI and metadata only, never the bytes nor an
encrypted file's key (`bot.attachments.attachment_document`).

with ``X-Surfaces-Timestamp: <Unix seconds>`` and ``X-Surfaces-Signature:
sha256=<hex>``, the HMAC-SHA256 under the shared secret of the timestamp, a ``.`` and the
raw body (check it over the bytes received, before parsing), and
``X-Surfaces-Event-Id`` (the same on every retry: a receiver can de-duplicate). Each
attempt, a retry too, is signed with the time it is sent: a receiver refuses a
timestamp more than `TOLERANCE_S` (5 minutes) from its own clock, so a captured
request cannot be replayed later; within the window, a receiver that must not answer
twice remembers the (signed) body's ``event_id`` it answered. `verify_signature` is
that check; README.md has a receiver.
Compatibility: before, the signature covered the body alone and there was no
timestamp; a receiver that checks it that way refuses every request now (README.md
says how to switch).

The answer is the reply: JSON ``{"reply": "..."}``, or plain text. A 5xx answer, a
timeout or a failed connection is retried with bounded backoff, and a 429 (or a 503) no sooner
than its ``Retry-After``; another 4xx, or an answer over a limit or in a coding the bot
does not read, is reported to the user and not retried (docs/retries.md).

    [webhook]
    url = "https://assistant.internal/matrix"   # WEBHOOK_URL
    secret = "..."                              # WEBHOOK_SECRET (at least 16 characters)
    timeout_s = 30                              # WEBHOOK_TIMEOUT_S
    max_response_bytes = 4194304                # WEBHOOK_MAX_RESPONSE_BYTES
    max_answer_chars = 100000                   # WEBHOOK_MAX_ANSWER_CHARS

At most ``max_response_bytes`` of an answer are read. A plain-text reply longer than
that, or than ``max_answer_chars``, is cut there and ends with a note saying so
(``[answer cut: ...]``); a JSON answer over the byte limit cannot be read and is
reported to the user.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx
import structlog
import trio

from matrix_api.h11_transport import ResponseTooLarge

from ..attachments import attachment_document
from ..backend_settings.webhook import WEBHOOK_ENV, WebhookSettings, webhook_settings_from_env
from ..chats import Chat
from ..messages import IncomingMessage
from .backoff import BACKEND_BACKOFF, Backoff, retry_after_from
from .base import BackendError
from .bounded_read import (
    BodyTooLarge,
    ReadLimitError,
    cut_note,
    open_body,
    read_prefix,
    with_note,
)
from .context import Turn
from .http_backend import HTTPBackend, webhook_limits
from .streaming import ReplyOverrides, ReplySink

__all__ = [
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "TOLERANCE_S",
    "WEBHOOK_ENV",
    "WebhookBackend",
    "WebhookError",
    "WebhookSettings",
    "sign",
    "verify_signature",
    "webhook_settings_from_env",
]

log = structlog.get_logger("bot.backends.webhook")

SIGNATURE_HEADER = "X-Surfaces-Signature"
TIMESTAMP_HEADER = "X-Surfaces-Timestamp"
EVENT_ID_HEADER = "X-Surfaces-Event-Id"
TOLERANCE_S = 300.0
"""How far a receiver lets a request's timestamp be from its own clock, either way (a
replay after that is refused; clocks kept by NTP are well within it)."""
_TIMESTAMP_DIGITS = 12
_EXCERPT = 300
_BODY_HEADERS = frozenset({"content-encoding", "content-length", "transfer-encoding"})
_ERROR_BODY_BYTES = 16 * 1024
"""Of an error answer only an excerpt is logged or shown: no more is read."""
# The transport's limits on an answer's head, in words (`ResponseLimits` fields).
_HEAD_LIMIT_WORDS = {
    "max_head_bytes": "its headers are too large",
    "max_header_count": "too many headers",
    "max_interim_responses": "too many interim answers",
}


def sign(secret: str, body: bytes, timestamp: str) -> str:
    """The signature header's value for ``body`` sent at ``timestamp`` (Unix seconds, in
    decimal): ``sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">``."""
    signed = timestamp.encode("ascii") + b"." + body
    digest = hmac.new(secret.encode("utf-8"), signed, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify_signature(
    secret: str,
    body: bytes,
    signature: str | None,
    timestamp: str | None,
    *,
    now: float | None = None,
    tolerance_s: float = TOLERANCE_S,
) -> bool:
    """Whether ``signature`` signs ``body`` with ``timestamp`` under ``secret``, and the
    timestamp is within ``tolerance_s`` of ``now`` (the wall clock), either way; the
    check of a receiver (constant-time). Missing or malformed headers are False."""
    if signature is None or timestamp is None:
        return False
    # Digits only, as the bot writes it: no sign, space, exponent or 10**1000.
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= _TIMESTAMP_DIGITS):
        return False
    now = time.time() if now is None else now
    if abs(now - int(timestamp)) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, body, timestamp), signature.strip())


class WebhookError(BackendError):
    """The service gave no reply; ``status`` is its HTTP status when it answered."""

    def __init__(self, message: str, *, user_message: str, status: int | None = None) -> None:
        super().__init__(message, user_message=user_message)
        self.status = status


class _Retry(Exception):
    """An attempt failed in a way worth retrying; carries the error to raise at the end."""

    def __init__(self, error: WebhookError, retry_after: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


class WebhookBackend(HTTPBackend):
    """The ``webhook`` backend. The caller owns it and closes it (``async with``)."""

    name = "webhook"
    # Images and files reach the service as mxc:// URIs with metadata (`bot.attachments`).
    attachments = "reference"

    def __init__(
        self,
        settings: WebhookSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        backoff: Backoff | None = None,
        user_agent: str = "surfaces-bot",
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """``wall_clock`` gives the Unix time each request is signed with (for tests)."""
        self.settings = settings
        self.backoff = backoff or BACKEND_BACKOFF
        self._wall_clock = wall_clock
        super().__init__(
            timeout=httpx.Timeout(settings.timeout_s),
            transport=transport,
            user_agent=user_agent,
            limits=webhook_limits(settings),
        )

    def __repr__(self) -> str:
        return f"WebhookBackend(url={self.settings.url!r})"

    async def reply_streaming(
        self,
        chat: Chat,
        message: IncomingMessage,
        context: list[Turn],
        sink: ReplySink,
        *,
        overrides: ReplyOverrides | None = None,
    ) -> str:
        """POST the message with its recent context; the service's answer is the reply.
        Typing shows while waiting. ``overrides`` are not used by this backend."""
        await sink.typing(True)
        try:
            reply = await self.ask(self.document(chat, message, context), message.event_id)
        except BackendError:
            await sink.typing(False)
            raise
        await sink.typing(False)
        return reply

    def document(self, chat: Chat, message: IncomingMessage, context: list[Turn]) -> dict[str, Any]:
        recent = context[-self.settings.context_turns :] if self.settings.context_turns else []
        document: dict[str, Any] = {
            "chat_id": chat.chat_id,
            "room_id": chat.room_id,
            "sender": message.sender,
            "event_id": message.event_id,
            # The thread's root, or null in the main timeline: a receiver that keeps
            # its own history keeps one per thread, as the bot does.
            "thread_id": message.thread_root,
            "body": message.body,
            "context": [turn.as_json() for turn in recent],
        }
        if message.attachment is not None:
            document["attachment"] = attachment_document(message.attachment)
        return document

    async def ask(self, document: Mapping[str, Any], event_id: str) -> str:
        """POST ``document`` (signed) and return the reply; raises `WebhookError`."""
        body = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        headers = {
            "Content-Type": "application/json",
            # Inflated by the transport in bounded steps, under the byte limit (http_backend.py).
            "Accept-Encoding": "gzip, deflate",
            EVENT_ID_HEADER: event_id,
        }
        started = time.monotonic()
        attempt = 0
        while True:
            # Signed at each attempt: a retry after a long Retry-After is still fresh.
            timestamp = str(int(self._wall_clock()))
            headers[TIMESTAMP_HEADER] = timestamp
            headers[SIGNATURE_HEADER] = sign(self.settings.secret, body, timestamp)
            try:
                reply = await self._attempt(body, headers)
            except _Retry as retry:
                delay = self.backoff.delay(attempt, retry_after=retry.retry_after)
                if delay is None:
                    self._log_failure(retry.error, attempt, started)
                    raise retry.error from retry.__cause__
                log.warning(
                    "webhook_retry",
                    status=retry.error.status,
                    attempt=attempt + 1,
                    delay_s=round(delay, 3),
                    error=str(retry.error),
                )
                await trio.sleep(delay)
                attempt += 1
                continue
            except WebhookError as error:
                self._log_failure(error, attempt, started)
                raise
            log.info(
                "webhook_answer",
                chars=len(reply),
                attempts=attempt + 1,
                total_s=round(time.monotonic() - started, 3),
            )
            return reply

    def _log_failure(self, error: WebhookError, attempt: int, started: float) -> None:
        log.warning(
            "webhook_failed",
            status=error.status,
            attempts=attempt + 1,
            elapsed_s=round(time.monotonic() - started, 3),
            error=str(error),
        )

    async def _attempt(self, body: bytes, headers: dict[str, str]) -> str:
        url = self.settings.url
        try:
            with trio.fail_after(self.settings.timeout_s):
                async with self._http.stream("POST", url, content=body, headers=headers) as got:
                    if got.status_code >= 300:
                        content, cut = await read_prefix(got, _ERROR_BODY_BYTES), False
                    else:
                        content, cut = await self._read_reply(got)
        except ReadLimitError as exc:
            raise WebhookError(
                f"the webhook's answer cannot be read within the limits: {exc}",
                user_message="The assistant service sent a reply too large for the bot to read "
                f"(over {self.settings.max_response_bytes} bytes)."
                if isinstance(exc, BodyTooLarge)
                else "The assistant service sent a reply the bot cannot read.",
            ) from exc
        except ResponseTooLarge as exc:
            # Refused by the transport before the body (a head, or a Content-Length, over
            # a limit): the service answered, and asking again gets the same. Not retried.
            raise WebhookError(
                f"the webhook's answer is over a limit ({exc.limit}): {exc}",
                user_message="The assistant service sent a reply too large for the bot to read "
                + (
                    f"(over {self.settings.max_response_bytes} bytes)."
                    if exc.limit == "max_body_bytes"
                    else f"({_HEAD_LIMIT_WORDS.get(exc.limit, exc.limit)})."
                ),
            ) from exc
        except httpx.DecodingError as exc:
            # Two content codings, one the bot does not read, or a broken one: an answer
            # the bot cannot read, not a failed connection. Not retried.
            raise WebhookError(
                f"the webhook's answer cannot be decoded: {exc}",
                user_message="The assistant service sent a reply the bot cannot read.",
            ) from exc
        except (trio.TooSlowError, httpx.TimeoutException) as exc:
            raise _Retry(
                WebhookError(
                    f"no answer from the webhook within {self.settings.timeout_s:g}s",
                    user_message="The assistant took too long to answer. Please try again.",
                )
            ) from exc
        except httpx.TransportError as exc:
            raise _Retry(
                WebhookError(
                    f"could not reach the webhook: {type(exc).__name__}: {exc}",
                    user_message="The assistant cannot be reached right now. "
                    "Please try again later.",
                )
            ) from exc
        # The body as read (decompressed): a response of it alone, for the readers below.
        plain = {k: v for k, v in got.headers.items() if k not in _BODY_HEADERS}
        response = httpx.Response(got.status_code, headers=plain, content=content)
        status = response.status_code
        if status == 429:
            # Busy, not refusing: ask again, no sooner than it said.
            raise _Retry(
                WebhookError(
                    f"HTTP 429 from the webhook: {response.text[:_EXCERPT]!r}",
                    status=status,
                    user_message="The assistant service is busy. Please try again in a moment.",
                ),
                retry_after=retry_after_from(response.headers),
            )
        if status >= 500:
            raise _Retry(
                WebhookError(
                    f"HTTP {status} from the webhook: {response.text[:_EXCERPT]!r}",
                    status=status,
                    user_message=f"The assistant service is having trouble (HTTP {status}). "
                    "Please try again later.",
                ),
                retry_after=retry_after_from(response.headers) if status == 503 else None,
            )
        if status >= 400:
            detail = _said(response)
            user_message = f"The assistant service refused this message (HTTP {status})."
            if detail:
                user_message += f" It said: {detail}"
            raise WebhookError(
                f"HTTP {status} from the webhook: {response.text[:_EXCERPT]!r}",
                status=status,
                user_message=user_message,
            )
        if status != 200:
            raise WebhookError(
                f"HTTP {status} from the webhook, expected 200 with the reply",
                status=status,
                user_message="The assistant service gave no reply.",
            )
        return self._within_limits(_reply_of(response), cut)

    async def _read_reply(self, response: httpx.Response) -> tuple[bytes, bool]:
        """The body within ``max_response_bytes``, and whether it was cut there: a
        plain-text reply keeps what fit; a JSON one over the limit raises `BodyTooLarge`
        (half a document does not parse)."""
        limit = self.settings.max_response_bytes
        pieces: list[bytes] = []
        async with open_body(response, limit) as reply:
            try:
                while (piece := await reply.next_chunk()) is not None:
                    pieces.append(piece)
            except BodyTooLarge:
                if not _is_text(response):
                    raise
                kept = _whole_characters(b"".join(pieces)[:limit])
                if not kept:
                    raise
                return kept, True
        return b"".join(pieces), False

    def _within_limits(self, reply: str, cut_at_bytes: bool) -> str:
        limit = self.settings.max_answer_chars
        note: str | None = None
        if len(reply) > limit:
            reply, note = reply[:limit], cut_note(f"longer than {limit} characters")
        elif cut_at_bytes:
            note = cut_note(f"the service sent more than {self.settings.max_response_bytes} bytes")
        if note is None:
            return reply
        log.warning("webhook_answer_cut", reason=note)
        return with_note(reply, note)


def _is_json(response: httpx.Response) -> bool:
    media: str = response.headers.get("content-type", "").split(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _whole_characters(data: bytes) -> bytes:
    """``data`` without a UTF-8 character the byte limit split at its end."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # the last character's first byte
            size = 2 if byte >= 0xC0 else 1
            size = 3 if byte >= 0xE0 else size
            size = 4 if byte >= 0xF0 else size
            return data[:-back] if size > back else data
    return data


def _is_text(response: httpx.Response) -> bool:
    """A plain-text reply (anything not JSON is read as text, as `_reply_of` does)."""
    return not _is_json(response)


def _said(response: httpx.Response) -> str | None:
    """What a 4xx answer says for the user: ``reply`` or ``error`` of a JSON object, or
    short plain text; None otherwise (an HTML error page is not for users)."""
    text: object = None
    if _is_json(response):
        try:
            document = response.json()
        except ValueError:
            return None
        if isinstance(document, dict):
            text = document.get("reply") or document.get("error")
    elif response.headers.get("content-type", "").startswith("text/plain"):
        text = response.text
    if not isinstance(text, str) or not text.strip():
        return None
    text = text.strip()
    return text if len(text) <= 200 else text[:199] + "…"


def _reply_of(response: httpx.Response) -> str:
    if _is_json(response):
        try:
            document = response.json()
        except ValueError as exc:
            raise WebhookError(
                f"the webhook's JSON answer does not parse: {exc}",
                status=response.status_code,
                user_message="The assistant service sent a reply the bot cannot read.",
            ) from exc
        reply = document.get("reply") if isinstance(document, dict) else None
        if not isinstance(reply, str):
            raise WebhookError(
                'the webhook\'s JSON answer has no string "reply"',
                status=response.status_code,
                user_message="The assistant service sent a reply the bot cannot read.",
            )
    else:
        reply = response.text
    if not reply.strip():
        raise WebhookError(
            "the webhook answered with an empty reply",
            status=response.status_code,
            user_message="The assistant service gave an empty reply.",
        )
    return reply.strip()
