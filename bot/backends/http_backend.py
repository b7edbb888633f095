"""What the backends that talk HTTP share: one client over the project's HTTP/1.1
transport within limits, owned and closed, and the plain `Backend.reply` as a
streaming reply nobody watches.

The client's transport is `matrix_api.h11_transport.H11Transport` (h11 does the
framing), with `ResponseLimits` that suit the backend (`model_limits`,
`webhook_limits`): a response whose head, interim heads, body or inflated body
outgrows them, or that comes too slowly, fails with a typed error instead of costing
the bot memory or a stuck task. A test hands in its own transport
(``httpx.MockTransport``) and that one is used as it is.

What the transport raises: while the body is read, `bounded_read` turns an over-limit
body into its `BodyTooLarge` (so an answer with some text is cut with a note); before
the body (``client.stream(...)`` itself) the backend maps `ResponseTooLarge`,
`httpx.DecodingError` and `ResponseTooSlow` (an `httpx.ReadTimeout`) to its error.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

import httpx

from matrix_api.h11_transport import H11Transport, ResponseLimits

from ..backend_settings.model import ModelSettings
from ..backend_settings.timeouts import MODEL_ANSWER_CEILING_S
from ..backend_settings.webhook import WebhookSettings
from ..chats import Chat
from ..messages import IncomingMessage
from .context import Turn
from .streaming import NullSink, ReplyOverrides, ReplySink

__all__ = ["MODEL_ANSWER_CEILING_S", "HTTPBackend", "model_limits", "webhook_limits"]


def model_limits(settings: ModelSettings) -> ResponseLimits:
    """The model's answers: a body (or a whole stream) of ``max_response_bytes`` as sent
    and once inflated; silent for ``request_timeout_s`` at most at a time (a model that
    thinks before its first token, or a slow token stream); minutes in all."""
    return ResponseLimits(
        max_body_bytes=settings.max_response_bytes,
        max_decoded_bytes=settings.max_response_bytes,
        total_timeout_s=MODEL_ANSWER_CEILING_S,
        read_timeout_s=settings.request_timeout_s,
    )


def webhook_limits(settings: WebhookSettings) -> ResponseLimits:
    """The webhook's replies: ``max_response_bytes`` as sent and once inflated, all of
    it within ``timeout_s`` (the backend's own deadline for one attempt).

    A reply that declares a ``Content-Length`` over the limit is refused before it is
    read, plain text included (one sent chunked is cut with a note where the limit
    falls: `bounded_read`).
    """
    return ResponseLimits(
        max_body_bytes=settings.max_response_bytes,
        max_decoded_bytes=settings.max_response_bytes,
        total_timeout_s=settings.timeout_s,
        read_timeout_s=settings.timeout_s,
    )


class HTTPBackend:
    """Owns one `httpx.AsyncClient`; the caller closes it (``async with`` or `aclose`).

    Without a ``transport``, the client's is an `H11Transport` within ``limits`` (the
    subclass passes `model_limits` or `webhook_limits`; None: the transport's
    defaults). Subclasses implement ``reply_streaming`` (the `StreamingBackend`
    protocol).
    """

    def __init__(
        self,
        *,
        timeout: httpx.Timeout,
        transport: httpx.AsyncBaseTransport | None,
        user_agent: str,
        limits: ResponseLimits | None = None,
    ) -> None:
        if transport is None:
            transport = H11Transport(limits=limits)
        self._http = httpx.AsyncClient(
            transport=transport,
            timeout=timeout,
            headers={"User-Agent": user_agent},
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def reply(self, chat: Chat, message: IncomingMessage) -> str:
        """`Backend.reply`: the answer without context or progress."""
        return await self.reply_streaming(chat, message, [], NullSink())

    async def reply_streaming(
        self,
        chat: Chat,
        message: IncomingMessage,
        context: list[Turn],
        sink: ReplySink,
        *,
        overrides: ReplyOverrides | None = None,
    ) -> str:
        raise NotImplementedError
