"""The streaming seam: backends that answer with a conversation and show the reply growing.

`bot.backends.base.Backend` answers one message. A `StreamingBackend` also takes the
chat's earlier turns and a `ReplySink` it tells about progress: ``typing(True)`` while
it waits for the answer, ``partial(text_so_far)`` as the answer grows. The sink decides
what that looks like in the room (see `bot.replies.reply_sink.MatrixReplySink`); a
backend never talks to Matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..chats import Chat
from ..messages import IncomingMessage
from .context import Turn

__all__ = ["NullSink", "ReplyOverrides", "ReplySink", "StreamingBackend", "Turn"]


class ReplySink(Protocol):
    """Where a backend reports a reply in progress. Its methods must not block for long
    (a slow room must not stall the stream) and must not raise for a failed display."""

    async def partial(self, text: str) -> None:
        """The whole answer so far (not a delta); called often, in order."""
        ...

    async def typing(self, on: bool) -> None:
        """Whether the backend is waiting for its answer (a typing notice in the room)."""
        ...


class NullSink:
    """A sink that shows nothing: for callers that only want the final answer."""

    async def partial(self, text: str) -> None:
        return None

    async def typing(self, on: bool) -> None:
        return None


@dataclass(frozen=True, slots=True)
class ReplyOverrides:
    """A chat's own choices (``!model``, ``!system``); None keeps the configured value."""

    model: str | None = None
    system_prompt: str | None = None


@runtime_checkable
class StreamingBackend(Protocol):
    name: str

    async def reply_streaming(
        self,
        chat: Chat,
        message: IncomingMessage,
        context: list[Turn],
        sink: ReplySink,
        *,
        overrides: ReplyOverrides | None = None,
    ) -> str:
        """The whole answer to ``message``; raises `BackendError` when there is none.

        ``context`` is the chat's conversation before ``message``, oldest first, without
        a system prompt and without ``message`` itself (the backend adds both and trims
        to its budget). Partial text already given to ``sink`` is not a promise: only
        the returned string is the answer.
        """
        ...
