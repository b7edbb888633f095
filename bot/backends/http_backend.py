"""What the backends that talk HTTP share: one client, owned and closed, and the
plain `Backend.reply` as a streaming reply nobody watches."""

from __future__ import annotations

from types import TracebackType
from typing import Self

import httpx

from ..chats import Chat
from ..messages import IncomingMessage
from .context import Turn
from .streaming import NullSink, ReplyOverrides, ReplySink

__all__ = ["HTTPBackend"]


class HTTPBackend:
    """Owns one `httpx.AsyncClient`; the caller closes it (``async with`` or `aclose`).

    Subclasses implement ``reply_streaming`` (the `StreamingBackend` protocol).
    """

    def __init__(
        self,
        *,
        timeout: httpx.Timeout,
        transport: httpx.AsyncBaseTransport | None,
        user_agent: str,
    ) -> None:
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
