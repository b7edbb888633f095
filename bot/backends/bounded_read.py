"""Reading a backend's HTTP answer within limits: its bytes, and one line of a stream.

A model server or a webhook is outside the bot's control: it may send an endless body,
an endless line, a ``Content-Length`` far beyond what the bot will read, or a small
compressed body that inflates to gigabytes. `open_body` reads one streamed
`httpx.Response` a piece at a time (at most `PIECE_BYTES` at once, decompression
included) and stops with a `ReadLimitError` once more than ``max_bytes`` came, so the
bot never holds more than the limit plus one piece. `LineSplitter` cuts bytes into
lines (``\\r\\n``, ``\\n`` or ``\\r``, as server-sent events end them) and stops with
`LineTooLong` instead of buffering a line without end.

Why not httpx's own ``aiter_bytes``/``aiter_lines`` (or httpx-sse, built on them): they
buffer a line until it ends and inflate a whole network read at once, with no limit.

Leaving `open_body` early (a limit, an error, a cancellation) stops the body at once:
httpx's nested async generators are run to their end by a cancellation raised at their
innermost read (the connection is then closed, not reused), so none is left to the
garbage collector.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import trio

__all__ = [
    "PIECE_BYTES",
    "BodyTooLarge",
    "BoundedBody",
    "LineSplitter",
    "LineTooLong",
    "ReadLimitError",
    "UnreadableEncoding",
    "cut_note",
    "open_body",
    "read_prefix",
    "with_note",
]

PIECE_BYTES = 64 * 1024
"""The most one step hands over (decompressed); also what httpcore reads at once."""

_EOL = re.compile(rb"\r\n|\r|\n")


def cut_note(why: str) -> str:
    """The note that ends an answer cut at a limit: ``[answer cut: <why>]``."""
    return f"[answer cut: {why}]"


def with_note(text: str, note: str) -> str:
    """``text`` (cut short) followed by ``note`` in a paragraph of its own: a code block
    the cut left open is closed first, so the note is not shown as code."""
    # markdown's own fence rule, so that the note lands where the renderer sees it.
    from .markdown import _fence_after

    text = text.rstrip()
    fence = _fence_after(text, None)
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
    """The answer is compressed in a way the bot does not read (it asks for gzip or none)."""

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


class _Inflater:
    """gzip or deflate, at most `PIECE_BYTES` of output per step (no bomb inflates)."""

    def __init__(self, encoding: str) -> None:
        self._deflate = encoding == "deflate"
        wbits = zlib.MAX_WBITS if self._deflate else zlib.MAX_WBITS | 16
        self._z = zlib.decompressobj(wbits)
        self._first = True
        self._tail = b""
        self._flushed = False

    @property
    def has_more(self) -> bool:
        return bool(self._tail)

    def feed(self, data: bytes) -> bytes:
        """Inflate ``data`` (or, given b"", what is left of the previous input)."""
        data = data or self._tail
        try:
            out = self._z.decompress(data, PIECE_BYTES)
        except zlib.error as exc:
            if self._deflate and self._first:
                # "deflate" is zlib-wrapped by the RFC, raw by some servers (as in httpx).
                self._first = False
                self._z = zlib.decompressobj(-zlib.MAX_WBITS)
                return self.feed(data)
            raise httpx.DecodingError(f"the compressed answer is broken: {exc}") from exc
        self._first = False
        self._tail = self._z.unconsumed_tail
        return out

    def flush(self) -> bytes:
        if self._flushed:
            return b""
        self._flushed = True
        try:
            # All input is consumed (the tail was inflated first): what is left is at
            # most one window of output.
            return self._z.flush()
        except zlib.error as exc:  # pragma: no cover - zlib raises in decompress first
            raise httpx.DecodingError(f"the compressed answer is broken: {exc}") from exc


def _inflater_for(headers: httpx.Headers) -> _Inflater | None:
    codings = [
        value.strip().lower()
        for value in headers.get("content-encoding", "").split(",")
        if value.strip() and value.strip().lower() != "identity"
    ]
    if not codings:
        return None
    if len(codings) == 1 and codings[0] in ("gzip", "x-gzip", "deflate"):
        return _Inflater(codings[0])
    raise UnreadableEncoding(", ".join(codings)[:40])


class BoundedBody:
    """One response body, read a piece at a time within ``max_bytes``; see `open_body`.

    ``bytes_read`` counts what was handed out (after decompression), ``raw_bytes`` what
    came over the connection; either past ``max_bytes`` raises `BodyTooLarge`.
    """

    def __init__(
        self, response: httpx.Response, max_bytes: int, *, trust_length: bool = True
    ) -> None:
        self.response = response
        self.max_bytes = max_bytes
        self.bytes_read = 0
        self.raw_bytes = 0
        # A response built in memory (a test's mock transport) was read and decoded
        # already: it is handed out as it is, in pieces, within the same limit.
        self._loaded = response.content if response.is_stream_consumed else None
        self._inflater = None if self._loaded is not None else _inflater_for(response.headers)
        declared = _content_length(response.headers)
        if (
            trust_length
            and self._inflater is None
            and declared is not None
            and declared > max_bytes
        ):
            raise BodyTooLarge(max_bytes, declared=declared)
        self._raw: AsyncIterator[bytes] | None = None
        self._ended = False
        self._settled = False

    async def next_chunk(self) -> bytes | None:
        """The next piece of the body (at most `PIECE_BYTES` when compressed), or None
        at its end. Raises `BodyTooLarge`, and httpx's transport and decoding errors."""
        while True:
            if self._inflater is not None and self._inflater.has_more:
                piece = self._inflater.feed(b"")
            elif self._ended:
                piece = self._inflater.flush() if self._inflater is not None else b""
                if not piece:
                    return None
            elif self._loaded is not None:
                piece = self._loaded[self.bytes_read : self.bytes_read + PIECE_BYTES]
                if not piece:
                    self._ended = self._settled = True
                    return None
            else:
                if self._raw is None:
                    self._raw = self.response.aiter_raw()
                try:
                    raw = await self._raw.__anext__()
                except StopAsyncIteration:
                    self._ended = self._settled = True
                    continue
                self.raw_bytes += len(raw)
                if self.raw_bytes > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
                piece = self._inflater.feed(raw) if self._inflater is not None else raw
            if piece:
                self.bytes_read += len(piece)
                if self.bytes_read > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
                return piece

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


def _content_length(headers: httpx.Headers) -> int | None:
    value = headers.get("content-length")
    if value is None:
        return None
    try:
        return int(value.split(",")[0].strip())
    except ValueError:
        return None


@asynccontextmanager
async def open_body(
    response: httpx.Response, max_bytes: int, *, trust_length: bool = True
) -> AsyncIterator[BoundedBody]:
    """A `BoundedBody` of ``response`` (opened with ``client.stream``) for the block.

    Raises `BodyTooLarge` at once when ``Content-Length`` is over ``max_bytes``, and
    `UnreadableEncoding` for a compression other than gzip or deflate (``trust_length``
    False: the declared length is not checked, only what comes). Leaving the block
    stops reading the body at once (call `BoundedBody.settle` with a drain time first
    to let the server finish cleanly).
    """
    body = BoundedBody(response, max_bytes, trust_length=trust_length)
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
        async with open_body(response, limit + PIECE_BYTES, trust_length=False) as body:
            while taken < limit and (piece := await body.next_chunk()) is not None:
                pieces.append(piece)
                taken += len(piece)
    except BodyTooLarge:
        pass  # one piece bigger than a network read (an in-memory transport): no excerpt
    return b"".join(pieces)[:limit]
