"""A lean HTTP/1.1 client on trio sockets, usable as an httpx transport.

A bot answers every message with at least one request, so the CPU a request costs
is most of what a message costs. httpx's default transport (httpcore over anyio)
and httpx's request and response models each cost more than the exchange on the
socket itself (measured against Synapse on loopback: the socket exchange about
0.19 ms of CPU, the same request through `httpx.AsyncClient` with its default
transport about 1.3 ms). So this module does only what a Matrix client needs:
HTTP/1.1 with keep-alive, a small connection pool per origin, ``Content-Length``
and chunked bodies, and TLS through `trio.SSLStream`, raising httpx's exception
types.

A plain TCP connection is driven on its socket directly: a non-blocking call
first, and one of trio's I/O waits only when the kernel has no room or no data.
trio's socket stream goes back to the scheduler after every call that succeeded
at once, which cost a bot about a tenth of its CPU per message.

It has two entrances over the same code:

* `TrioTransport.exchange`, bytes in and `RawResponse` out, which `HTTPCore` uses;
* `TrioTransport.handle_async_request`, the `httpx.AsyncBaseTransport` seam, so the
  transport also serves an `httpx.AsyncClient`.

Responses are read whole (Matrix answers are JSON documents), and their bodies are
returned as sent: a ``Content-Encoding`` is for the caller to undo
(`decode_content`).
"""

from __future__ import annotations

import contextlib
import math
import select
import socket
import ssl
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import httpx
import trio

__all__ = [
    "Origin",
    "RawResponse",
    "Timeouts",
    "TrioTransport",
    "decode_content",
    "find_header",
]

_MAX_HEAD = 64 * 1024
_CHUNK = 65536
_NO_BODY_STATUSES = frozenset({204, 304})
# A connection idle for less than this is reused without checking that the server
# kept it open: none closes one that soon, and a close on reuse is retried anyway.
_FRESH_S = 2.0

Timeouts = Mapping[str, float | None]
"""httpx's ``timeout`` request extension: ``connect``, ``read``, ``write``, ``pool``."""


class Origin(NamedTuple):
    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: httpx.URL) -> Origin:
        port = url.port or (443 if url.scheme == "https" else 80)
        return cls(url.scheme, url.host, port)

    def host_header(self) -> bytes:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return (host if self.port == default else f"{host}:{self.port}").encode("idna")


@dataclass(slots=True)
class RawResponse:
    """A response as it came off the wire, its body de-chunked but not decoded."""

    status: int
    headers: list[tuple[bytes, bytes]]
    content: bytes
    http_version: bytes = b"HTTP/1.1"

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower case), if any."""
        return find_header(self.headers, name)


def find_header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case) in ``headers``, if any."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def decode_content(response: RawResponse) -> bytes:
    """The body with its ``Content-Encoding`` (gzip or deflate) undone.

    Raises `httpx.DecodingError` for a body that does not match its encoding.
    """
    encoding = response.header(b"content-encoding")
    if encoding is None or encoding.strip().lower() in (b"", b"identity"):
        return response.content
    content = response.content
    for coding in reversed(encoding.lower().split(b",")):
        coding = coding.strip()
        try:
            if coding in (b"gzip", b"x-gzip"):
                content = zlib.decompress(content, 16 + zlib.MAX_WBITS)
            elif coding == b"deflate":
                try:
                    content = zlib.decompress(content)
                except zlib.error:  # some servers send raw deflate, without the header
                    content = zlib.decompress(content, -zlib.MAX_WBITS)
            elif coding not in (b"", b"identity"):
                raise httpx.DecodingError(f"unsupported Content-Encoding {coding!r}")
        except zlib.error as exc:
            raise httpx.DecodingError(f"body does not match Content-Encoding: {exc}") from exc
    return content


class _Connection:
    """One keep-alive connection and what was read from it but not used yet."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.received = 0
        """Bytes received during the current exchange."""
        self.idle_since = -math.inf

    def looks_closed(self) -> bool:
        """An idle keep-alive connection the server has closed (or sent junk on)."""
        if self.buffer:
            return True
        if trio.current_time() - self.idle_since < _FRESH_S:
            return False  # servers keep connections open longer; spare the syscall
        return self._readable_when_idle()

    def _readable_when_idle(self) -> bool:
        raise NotImplementedError

    def send_now(self, data: bytes | memoryview) -> int:
        """Send what the kernel takes without waiting; how many bytes that was."""
        raise NotImplementedError

    async def send_all(self, data: memoryview) -> None:
        raise NotImplementedError

    async def receive_some(self) -> bytes | bytearray:
        """The next bytes from the server; ``b""`` when it closed the connection."""
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError

    async def fill(self) -> None:
        data = await self.receive_some()
        if not data:
            raise httpx.RemoteProtocolError("server closed the connection mid-response")
        self.received += len(data)
        self.buffer += data

    async def read_until(self, marker: bytes, limit: int) -> bytes:
        start = 0
        while True:
            index = self.buffer.find(marker, start)
            if index >= 0:
                chunk = bytes(self.buffer[:index])
                del self.buffer[: index + len(marker)]
                return chunk
            if len(self.buffer) > limit:
                raise httpx.RemoteProtocolError("response head too large")
            start = max(0, len(self.buffer) - len(marker) + 1)
            await self.fill()

    async def read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            await self.fill()
        chunk = bytes(self.buffer[:size])
        del self.buffer[:size]
        return chunk

    async def read_to_eof(self) -> bytes:
        while True:
            data = await self.receive_some()
            self.received += len(data)
            if not data:
                chunk = bytes(self.buffer)
                self.buffer.clear()
                return chunk
            self.buffer += data


class _PlainConnection(_Connection):
    """HTTP over TCP, on a non-blocking socket of our own."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._socket = sock

    def _readable_when_idle(self) -> bool:
        try:
            readable, _, _ = select.select([self._socket], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def send_now(self, data: bytes | memoryview) -> int:
        try:
            return self._socket.send(data)
        except BlockingIOError:
            return 0

    async def send_all(self, data: memoryview) -> None:
        while data:
            await trio.lowlevel.wait_writable(self._socket)
            data = data[self.send_now(data) :]

    async def receive_some(self) -> bytes | bytearray:
        if self.received:
            # More of an answer already coming in: the rest is likely there.
            try:
                return self._socket.recv(_CHUNK)
            except BlockingIOError:
                pass
        while True:
            await trio.lowlevel.wait_readable(self._socket)
            try:
                return self._socket.recv(_CHUNK)
            except BlockingIOError:
                continue

    async def aclose(self) -> None:
        trio.lowlevel.notify_closing(self._socket)
        self._socket.close()
        await trio.lowlevel.checkpoint()


class _TLSConnection(_Connection):
    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        super().__init__()
        self._stream = stream

    def _readable_when_idle(self) -> bool:
        # A TLS 1.3 server may send session tickets at any time: readable is no
        # sign of closing here. A closed one is caught by the retry on reuse.
        return False

    def send_now(self, data: bytes | memoryview) -> int:
        return 0  # TLS records are written by the stream

    async def send_all(self, data: memoryview) -> None:
        await self._stream.send_all(data)

    async def receive_some(self) -> bytes | bytearray:
        return await self._stream.receive_some(_CHUNK)

    async def aclose(self) -> None:
        await self._stream.aclose()


class TrioTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 with keep-alive for one client; at most ``max_connections`` per origin.

    The owner closes it (`aclose`); an `httpx.AsyncClient` given it closes it too.
    """

    def __init__(
        self, *, max_connections: int = 16, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self._max_connections = max_connections
        self._ssl_context = ssl_context
        self._idle: dict[Origin, list[_Connection]] = {}
        self._slots: dict[Origin, trio.Semaphore] = {}

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                await _close(connection)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raw = await self.exchange(
            Origin.of(request.url),
            request.method,
            request.url.raw_path,
            request.headers.raw,
            request.content,
            request.extensions.get("timeout", {}),
        )
        return httpx.Response(
            raw.status,
            headers=raw.headers,
            # httpx undoes the Content-Encoding when the body is read.
            stream=httpx.ByteStream(raw.content),
            request=request,
            extensions={"http_version": raw.http_version},
        )

    async def exchange(
        self,
        origin: Origin,
        method: str,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes | None,
        timeouts: Timeouts,
    ) -> RawResponse:
        """Send one request and read its whole response.

        ``target`` is the encoded path and query; ``headers`` need no ``Host`` or
        ``Content-Length`` (both are added). Raises httpx's transport errors.
        """
        head = _request_head(origin, method, target, headers, body)
        if body:
            head += body
        slots = self._slots.get(origin)
        if slots is None:
            slots = self._slots[origin] = trio.Semaphore(self._max_connections)
        try:
            slots.acquire_nowait()
        except trio.WouldBlock:
            await _acquire(slots, timeouts.get("pool"))
        try:
            connection, reused = await self._checkout(origin, timeouts.get("connect"))
            try:
                try:
                    response, reusable = await _exchange(connection, method, head, timeouts)
                except httpx.RemoteProtocolError:
                    if not reused or connection.received:
                        raise
                    # The server closed an idle connection just as we reused it (a
                    # clean close, not a byte of answer): it did not take the request,
                    # so once more on a fresh connection.
                    await _close(connection)
                    connection = await self._open(origin, timeouts.get("connect"))
                    response, reusable = await _exchange(connection, method, head, timeouts)
            except BaseException:
                await _close(connection)
                raise
            if reusable:
                connection.idle_since = trio.current_time()
                self._idle.setdefault(origin, []).append(connection)
            else:
                await _close(connection)
            return response
        finally:
            slots.release()

    async def _checkout(
        self, origin: Origin, connect_timeout: float | None
    ) -> tuple[_Connection, bool]:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            if not connection.looks_closed():
                return connection, True
            await _close(connection)
        return await self._open(origin, connect_timeout), False

    async def _open(self, origin: Origin, connect_timeout: float | None) -> _Connection:
        scheme, host, port = origin
        with _deadline_scope(connect_timeout):
            return await self._connect(scheme, host, port)
        raise httpx.ConnectTimeout(f"timed out connecting to {host}:{port}")

    async def _connect(self, scheme: str, host: str, port: int) -> _Connection:
        try:
            tcp = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
        if scheme != "https":
            # trio connected it (name resolution, happy eyeballs, TCP_NODELAY); from
            # here on the socket is driven directly.
            sock = socket.socket(fileno=tcp.socket.detach())
            sock.setblocking(False)
            return _PlainConnection(sock)
        context = self._ssl_context or ssl.create_default_context()
        tls = trio.SSLStream(tcp, context, server_hostname=host, https_compatible=True)
        try:
            await tls.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError) as exc:
            await tcp.aclose()
            raise httpx.ConnectError(f"TLS with {host}:{port} failed: {exc}") from exc
        except BaseException:
            await tcp.aclose()
            raise
        return _TLSConnection(tls)


async def _acquire(slots: trio.Semaphore, seconds: float | None) -> None:
    with _deadline_scope(seconds):
        await slots.acquire()
        return
    raise httpx.PoolTimeout("timed out waiting for a connection")


def _deadline_scope(seconds: float | None) -> trio.CancelScope:
    return trio.CancelScope(deadline=math.inf if seconds is None else trio.current_time() + seconds)


async def _exchange(
    connection: _Connection, method: str, request: bytes, timeouts: Timeouts
) -> tuple[RawResponse, bool]:
    """One request on ``connection``: the response, and whether to reuse the connection."""
    connection.received = 0
    try:
        sent = connection.send_now(request)
        if sent < len(request):
            # Only a request the kernel has no room for waits, under the write timeout.
            with _deadline_scope(timeouts.get("write")):
                await connection.send_all(memoryview(request)[sent:])
                sent = len(request)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise httpx.WriteError(f"sending failed: {exc}") from exc
    if sent < len(request):
        raise httpx.WriteTimeout("timed out sending the request")
    with _deadline_scope(timeouts.get("read")):
        try:
            return await _read_response(connection, method)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise httpx.ReadError(f"reading failed: {exc}") from exc
    raise httpx.ReadTimeout("timed out waiting for the response")


def _request_head(
    origin: Origin,
    method: str,
    target: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    body: bytes | None,
) -> bytes:
    lines = [method.encode("ascii") + b" " + target + b" HTTP/1.1"]
    has_host = False
    for name, value in headers:
        lowered = name.lower()
        if lowered in (b"content-length", b"transfer-encoding"):
            continue  # the body is sent whole, with its length
        if lowered == b"host":
            has_host = True
        lines.append(name + b": " + value)
    if not has_host:
        lines.insert(1, b"Host: " + origin.host_header())
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(b"Content-Length: " + str(len(body or b"")).encode("ascii"))
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


async def _read_response(connection: _Connection, method: str) -> tuple[RawResponse, bool]:
    while True:
        head = await connection.read_until(b"\r\n\r\n", _MAX_HEAD)
        status_line, _, header_block = head.partition(b"\r\n")
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise httpx.RemoteProtocolError(f"not an HTTP/1.1 status line: {status_line[:80]!r}")
        status = int(parts[1])
        if not 100 <= status < 200:
            break  # 1xx answers (100 Continue) come before the real one
    headers = _parse_headers(header_block)
    length: bytes | None = None
    chunked = False
    keep_alive = parts[0] == b"HTTP/1.1"
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"content-length":
            length = value
        elif lowered == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif lowered == b"connection":
            keep_alive = keep_alive and value.lower() != b"close"

    if method == "HEAD" or status in _NO_BODY_STATUSES:
        content = b""
    elif chunked:
        content = await _read_chunked(connection)
    elif length is not None:
        try:
            size = int(length)
        except ValueError as exc:
            raise httpx.RemoteProtocolError("bad Content-Length") from exc
        content = await connection.read_exactly(size)
    else:
        content = await connection.read_to_eof()
        keep_alive = False
    response = RawResponse(status, headers, content, parts[0])
    return response, keep_alive and not connection.buffer


def _parse_headers(block: bytes) -> list[tuple[bytes, bytes]]:
    headers = []
    for line in block.split(b"\r\n"):
        if not line:
            continue
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise httpx.RemoteProtocolError(f"malformed header line: {line[:80]!r}")
        headers.append((name, value.strip()))
    return headers


async def _read_chunked(connection: _Connection) -> bytes:
    chunks = bytearray()
    while True:
        size_line = await connection.read_until(b"\r\n", 1024)
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError as exc:
            raise httpx.RemoteProtocolError("bad chunk size") from exc
        if size == 0:
            # Trailers, if any, end with an empty line.
            while await connection.read_until(b"\r\n", _MAX_HEAD):
                pass
            return bytes(chunks)
        chunks += await connection.read_exactly(size)
        if await connection.read_exactly(2) != b"\r\n":
            raise httpx.RemoteProtocolError("chunk not followed by CRLF")


async def _close(connection: _Connection) -> None:
    with trio.CancelScope(shield=True), contextlib.suppress(trio.BrokenResourceError, OSError):
        await connection.aclose()
