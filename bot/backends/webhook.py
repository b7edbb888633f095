"""The ``webhook`` backend: a team's own service answers, over one signed POST.

The bot POSTs a JSON document to the configured URL::

    {"chat_id": "...", "room_id": "!...", "sender": "@...", "event_id": "$...",
     "body": "the message", "context": [{"role": "user", "content": "..."}, ...]}

with ``X-Surfaces-Signature: sha256=<hex>``, the HMAC-SHA256 of the raw body under the
shared secret (check it over the bytes received, before parsing), and
``X-Surfaces-Event-Id`` (the same on every retry: a receiver can de-duplicate). The
answer is the reply: JSON ``{"reply": "..."}``, or plain text. A 5xx answer, a timeout
or a failed connection is retried with bounded backoff, and a 429 (or a 503) no sooner
than its ``Retry-After``; another 4xx is reported to the user and not retried.

    [webhook]
    url = "https://assistant.internal/matrix"   # WEBHOOK_URL
    secret = "..."                              # WEBHOOK_SECRET (at least 16 characters)
    timeout_s = 30                              # WEBHOOK_TIMEOUT_S
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

import httpx
import structlog
import trio

from ..chats import Chat
from ..messages import IncomingMessage
from .backoff import Backoff, retry_after_from
from .base import BackendError
from .context import Turn
from .http_backend import HTTPBackend
from .streaming import ReplyOverrides, ReplySink
from .webhook_settings import WEBHOOK_ENV, WebhookSettings, webhook_settings_from_env

__all__ = [
    "SIGNATURE_HEADER",
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
EVENT_ID_HEADER = "X-Surfaces-Event-Id"
_EXCERPT = 300


def sign(secret: str, body: bytes) -> str:
    """The signature header's value for ``body``: ``sha256=<hex HMAC-SHA256>``."""
    digest = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify_signature(secret: str, body: bytes, header: str | None) -> bool:
    """Whether ``header`` signs ``body`` under ``secret`` (constant-time; for receivers)."""
    return header is not None and hmac.compare_digest(sign(secret, body), header.strip())


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

    def __init__(
        self,
        settings: WebhookSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        backoff: Backoff | None = None,
        user_agent: str = "surfaces-bot",
    ) -> None:
        self.settings = settings
        self.backoff = backoff or Backoff()
        super().__init__(
            timeout=httpx.Timeout(settings.timeout_s), transport=transport, user_agent=user_agent
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
        return {
            "chat_id": chat.chat_id,
            "room_id": chat.room_id,
            "sender": message.sender,
            "event_id": message.event_id,
            "body": message.body,
            "context": [turn.as_json() for turn in recent],
        }

    async def ask(self, document: Mapping[str, Any], event_id: str) -> str:
        """POST ``document`` (signed) and return the reply; raises `WebhookError`."""
        body = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self.settings.secret, body),
            EVENT_ID_HEADER: event_id,
        }
        started = time.monotonic()
        attempt = 0
        while True:
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
                response = await self._http.post(url, content=body, headers=headers)
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
        return _reply_of(response)


def _is_json(response: httpx.Response) -> bool:
    media: str = response.headers.get("content-type", "").split(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


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
