"""Reading a backend's HTTP answer within limits: its bytes, and one line of a stream.

A model server or a webhook is outside the bot's control: it may send an endless body,
an endless line, a ``Content-Length`` far beyond what the bot will read, or a small
compressed body that inflates to gigabytes. The transport under the backends
(`matrix_api.h11_transport.H11Transport`, see `bot.backends.http_backend`) refuses a
head or a declared length over its limits, inflates gzip and deflate itself in bounded
steps under a cap, and stops a body at its byte limit. This module adds what is the
backends' own business:

* `open_body` reads one streamed `httpx.Response` a piece at a time and stops with
  `BodyTooLarge` once more than ``max_bytes`` came, whichever layer notices first (the
  backends give the transport the same number), so that an answer with some text already can
  be cut with a note (`cut_note`, `with_note`) instead of failing. It also bounds a
  body an in-memory transport (a test's ``httpx.MockTransport``) holds whole, and
  refuses a body still compressed (a transport that inflates without a cap).
* `LineSplitter` cuts bytes into lines (``\\r\\n``, ``\\n`` or ``\\r``, as server-sent
  events end them) and stops with `LineTooLong` instead of buffering a line without
  end (httpx's ``aiter_lines``, and httpx-sse on it, buffer a line until it ends).

Leaving `open_body` early (a limit, an error, a cancellation) stops the body at once:
the transport's body stream is ended by a cancellation raised at its innermost read
(the connection is then closed, not reused), so no async generator is left to the
garbage collector.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import trio

from matrix_api.h11_transport import DecodedTooLarge, ResponseTooLarge

__all__ = [
    "PIECE_BYTES",
    "BodyTooLarge",
    "BoundedBody",
    "LineSplitter",
    "LineTooLong",
    "ReadLimitError",
    "UnreadableEncoding",
    "cut_note",
    "fence_after",
    "open_body",
    "read_prefix",
    "with_note",
]

PIECE_BYTES = 64 * 1024
"""The most one step of an in-memory body hands over; also what the transport reads
(and inflates) at once."""

_EOL = re.compile(rb"\r\n|\r|\n")


def cut_note(why: str) -> str:
    """The note that ends an answer cut at a limit: ``[answer cut: <why>]``."""
    return f"[answer cut: {why}]"


# Markdown's fence rule (shared with `bot.replies.markdown.split_message`): a fence
# opens or closes a code block: up to 3 spaces, then ``` or ~~~ (3 or more).
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")


def fence_after(text: str, open_fence: tuple[str, str] | None) -> tuple[str, str] | None:
    """The code fence still open at the end of ``text`` (marker, info), given the one
    open at its start."""
    for line in text.split("\n"):
        match = _FENCE.match(line)
        if match is None:
            continue
        marker, rest = match.group(1), match.group(2)
        if open_fence is None:
            if marker[0] == "`" and "`" in rest:
                continue  # not a fence: an info string may not contain backticks
            open_fence = (marker, rest.strip())
        elif (
            marker[0] == open_fence[0][0] and len(marker) >= len(open_fence[0]) and not rest.strip()
        ):
            open_fence = None
    return open_fence


def with_note(text: str, note: str) -> str:
    """``text`` (cut short) followed by ``note`` in a paragraph of its own: a code block
    the cut left open is closed first, so the note is not shown as code."""
    text = text.rstrip()
    fence = fence_after(text, None)
    if fence is not None:
        text += f"\n{fence[0]}"
    return f"{text}\n\n{note}"


class ReadLimitError(Exception):
    """An answer cannot be read within the limits; the message says which and how."""

    def __init__(self, message: str, *, limit: int) -> None:
        super().__init__(message)
        self.limit = limit


class BodyTooLarge(ReadLimitError):
    """More than ``limit`` bytes came (or ``declared`` says they would)."""

    def __init__(self, limit: int, *, declared: int | None = None) -> None:
        what = (
            f"the answer declares {declared} bytes, more than the {limit} the bot reads"
            if declared is not None
            else f"the answer is longer than the {limit} bytes the bot reads"
        )
        super().__init__(what, limit=limit)
        self.declared = declared


class LineTooLong(ReadLimitError):
    """One line (or one event) of a stream is longer than ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"a line of the answer is longer than {limit} bytes", limit=limit)


class UnreadableEncoding(ReadLimitError):
    """The answer is still compressed: its transport did not inflate it under a cap."""

    def __init__(self, encoding: str) -> None:
        super().__init__(f"the answer is encoded as {encoding!r}", limit=0)


class LineSplitter:
    """Bytes in, lines out (without their ending); sans-IO.

    A line ends at ``\\r\\n``, ``\\n`` or ``\\r`` (a ``\\r\\n`` split across two feeds
    counts once). A line longer than ``max_line_bytes`` raises `LineTooLong` as soon
    as that many bytes of it are held, not when it ends.
    """

    def __init__(self, max_line_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        self._held = bytearray()
        self._after_cr = False

    def feed(self, data: bytes) -> list[bytes]:
        """The lines ``data`` completes, in order."""
        if self._after_cr and data.startswith(b"\n"):
            data = data[1:]
        self._after_cr = data.endswith(b"\r")
        lines: list[bytes] = []
        start = 0
        for end in _EOL.finditer(data):
            piece = data[start : end.start()]
            if self._held:
                self._held += piece
                line = bytes(self._held)
                self._held.clear()
            else:
                line = piece
            if len(line) > self.max_line_bytes:
                raise LineTooLong(self.max_line_bytes)
            lines.append(line)
            start = end.end()
        if len(self._held) + len(data) - start > self.max_line_bytes:
            raise LineTooLong(self.max_line_bytes)
        self._held += data[start:]
        return lines

    def flush(self) -> bytes | None:
        """The last line, when the bytes ended without a line ending."""
        if not self._held:
            return None
        line = bytes(self._held)
        self._held.clear()
        return line


def _undecoded(headers: httpx.Headers) -> str | None:
    """The content codings a response still declares (its transport did not undo them)."""
    codings = [
        value.strip().lower()
        for value in headers.get("content-encoding", "").split(",")
        if value.strip() and value.strip().lower() != "identity"
    ]
    return ", ".join(codings)[:40] if codings else None


class BoundedBody:
    """One response body, read a piece at a time within ``max_bytes``; see `open_body`.

    ``bytes_read`` counts what was handed out; past ``max_bytes`` it raises
    `BodyTooLarge`, and so does the transport's own body limit when it is hit first.
    """

    def __init__(self, response: httpx.Response, max_bytes: int) -> None:
        self.response = response
        self.max_bytes = max_bytes
        self.bytes_read = 0
        # A response built in memory (a test's mock transport) was read and decoded
        # already: it is handed out as it is, in pieces, within the same limit.
        self._loaded = response.content if response.is_stream_consumed else None
        if self._loaded is None and (coding := _undecoded(response.headers)) is not None:
            # H11Transport inflates under its cap and drops the header; compressed
            # bytes here came through a transport that inflates without one.
            raise UnreadableEncoding(coding)
        self._raw: AsyncIterator[bytes] | None = None
        self._ended = False
        self._settled = False

    async def next_chunk(self) -> bytes | None:
        """The next piece of the body (at most what the transport read at once, or
        `PIECE_BYTES` of an in-memory body), or None at its end. Raises `BodyTooLarge`,
        and httpx's transport and decoding errors."""
        while not self._ended:
            if self._loaded is not None:
                piece = self._loaded[self.bytes_read : self.bytes_read + PIECE_BYTES]
                if not piece:
                    self._ended = self._settled = True
                    break
            else:
                if self._raw is None:
                    self._raw = self.response.aiter_raw()
                try:
                    piece = await self._raw.__anext__()
                except StopAsyncIteration:
                    self._ended = self._settled = True
                    break
                except (ResponseTooLarge, DecodedTooLarge) as exc:
                    # The transport's limit on the body, as sent or inflated, came
                    # first: the backends set it to ``max_bytes``, so it is the same
                    # limit, and the same error.
                    raise BodyTooLarge(self.max_bytes) from exc
                if not piece:
                    continue
            self.bytes_read += len(piece)
            if self.bytes_read > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)
            return piece
        return None

    async def read_all(self) -> bytes:
        """The whole body; raises `BodyTooLarge` past ``max_bytes``."""
        pieces: list[bytes] = []
        while (piece := await self.next_chunk()) is not None:
            pieces.append(piece)
        return b"".join(pieces)

    async def settle(self, drain_s: float = 0.0) -> None:
        """Stop reading: read and drop the rest for at most ``drain_s`` (a server that
        ends its answer at once lets the connection be reused), then cut it off.

        The cut is a cancellation raised at httpx's innermost read: it ends all of httpx's
        nested generators cleanly. Without a drain it is shielded (it takes no time, and
        runs even while the caller is being cancelled); a drain is not.
        """
        if self._settled or self._raw is None:
            self._settled = True
            return
        self._settled = True
        drained = 0
        deadline = trio.current_time() + drain_s
        with trio.CancelScope(deadline=deadline, shield=drain_s <= 0) as cut:
            try:
                # Bytes already buffered come out without a checkpoint; the reads after
                # them raise the cancellation. Only an in-memory body that never
                # checkpoints could outlast the spare reads: the collector gets it then.
                spare = 1024
                while spare:
                    drained += len(await self._raw.__anext__())
                    if drained > self.max_bytes:
                        cut.cancel()
                        spare -= 1
            except StopAsyncIteration:
                pass
            except httpx.HTTPError:
                pass  # the rest was broken anyway: nothing more to read


@asynccontextmanager
async def open_body(response: httpx.Response, max_bytes: int) -> AsyncIterator[BoundedBody]:
    """A `BoundedBody` of ``response`` (opened with ``client.stream``) for the block.

    Raises `UnreadableEncoding` at once when the body is still compressed (see
    `BoundedBody`). Leaving the block stops reading the body at once (call
    `BoundedBody.settle` with a drain time first to let the server finish cleanly).
    A declared ``Content-Length`` is not looked at: the transport refuses one over its
    own limit before the body (`ResponseTooLarge`), and the count here stops the rest.
    """
    body = BoundedBody(response, max_bytes)
    try:
        yield body
    finally:
        await body.settle()


async def read_prefix(response: httpx.Response, limit: int) -> bytes:
    """At most ``limit`` bytes from the start of the body (for an error's excerpt); the
    rest is not read. Raises httpx's transport errors and `UnreadableEncoding`."""
    pieces: list[bytes] = []
    taken = 0
    try:
        async with open_body(response, limit + PIECE_BYTES) as body:
            while taken < limit and (piece := await body.next_chunk()) is not None:
                pieces.append(piece)
                taken += len(piece)
    except BodyTooLarge:
        pass  # the body's own limit is below the excerpt's: what came before it
    return b"".join(pieces)[:limit]
