"""HTTP/1.1 on trio with h11 doing the framing, inside hard limits: an httpx transport.

`H11Transport` is an `httpx.AsyncBaseTransport`: hand it to `httpx.AsyncClient`
(``transport=``) and every request of that client goes through it. It keeps a small
keep-alive pool per origin, drives plain TCP sockets directly with non-blocking
calls, and does TLS through `trio.SSLStream` with one `ssl.SSLContext` per
transport, built once; but it parses and writes no HTTP itself: h11 serialises the
request (and refuses a header name or value holding CR, LF or NUL before a byte is
sent), parses the response head, frames the body (one valid ``Content-Length``, or
chunked, or to the end of the connection) and decides whether the connection may
carry another request.

What it adds on top of h11, per response (`ResponseLimits`, per transport, or per
request through the ``LIMITS_EXTENSION`` request extension):

* limits on the head's size, the number of header lines, the number of interim
  (1xx) heads, the body's bytes on the wire and its bytes once decoded;
* a deadline for the whole exchange (connect, send, head and body) and one for each
  wait for bytes (httpx's ``read`` timeout, or `ResponseLimits.read_timeout_s` when
  the request sets none);
* stricter framing than h11 alone: a ``Content-Length`` together with
  ``Transfer-Encoding`` is refused instead of letting chunked win, and a
  ``Content-Length`` above the body limit fails before the body is read;
* reuse only of a connection that is idle and silent: bytes left over after a
  response, or a socket readable while idle (closed, or stray bytes), and the
  connection is closed instead of answering the next request with them.

Each violation raises a `ResponseLimitError` that is also the httpx exception a
caller already handles (`ResponseTooLarge` is an `httpx.RemoteProtocolError`,
`ResponseTooSlow` an `httpx.ReadTimeout`, `DecodedTooLarge` an
`httpx.DecodingError`), with ``limit`` naming the `ResponseLimits` field. Protocol
errors from h11 become `httpx.RemoteProtocolError` (the server's) or
`httpx.LocalProtocolError` (the request's); socket failures `httpx.ConnectError`,
`httpx.WriteError`, `httpx.ReadError` and their timeouts; a TLS failure keeps the
ssl module's reason in its message.

Every wait for bytes is a trio checkpoint, and so is every read that found bytes
already there, and every step of inflating: a server that streams without end, or
a tiny body that inflates to a huge one, costs its own request a bounded amount of
memory and time and never starves the other tasks.

Content-Encoding: httpx decodes a body in the client (``Response.aiter_bytes``,
``httpx._decoders``), in one ``decompress`` call per chunk with no output bound,
stacking one decoder per coding (``gzip, gzip``) and passing unknown codings through
as if they were identity. No size cap can be put on that from a transport. So this
transport decodes itself: one content coding (``gzip``/``x-gzip`` or ``deflate``,
with or without its zlib header; ``identity`` entries ignored), inflated in steps of
at most 64 KiB under `ResponseLimits.max_decoded_bytes`; it then drops
``Content-Encoding`` and ``Content-Length`` from the response's headers so that httpx
has nothing left to decode. Two codings, or one it does not know, are an
`httpx.DecodingError` before the body is read. A compressed body cut short, or with
bytes after its end, is an `httpx.DecodingError` too.

What it does not do: HTTP/2, proxies, ``Expect: 100-continue`` (interim heads are
read and skipped), upgrades, cookies or redirects (the client's business: httpx does
not follow redirects unless asked, and a 3xx is returned as a response like any
other). A request body is read whole before sending. A response body is streamed to
the caller as it arrives, so its connection and pool slot are held until the
response is read or closed (``httpx.AsyncClient`` does both unless ``stream=True``).
h11 itself bounds an unfinished head (and a chunk header or trailer) by its
``max_incomplete_event_size``, set from the transport's own limits: a request-level
``max_head_bytes`` above the transport's is capped there (a plain
`httpx.RemoteProtocolError`).

Over TLS, the idle check sees only the socket: a stray TLS record that arrived in
the same read as the answer waits inside the `trio.SSLStream`, out of sight, and
would be read as the next answer (on plain TCP h11 sees it and the connection is
dropped).

It is the transport of every `MatrixClient` (`matrix_api.http`) and of the
backends' HTTP clients, unless a caller passes another.
"""

from __future__ import annotations

import contextlib
import math
import select
import socket
import ssl
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import NamedTuple

import h11
import httpx
import trio

__all__ = [
    "LIMITS_EXTENSION",
    "DecodedTooLarge",
    "H11Transport",
    "ResponseLimitError",
    "ResponseLimits",
    "ResponseTooLarge",
    "ResponseTooSlow",
]

LIMITS_EXTENSION = "response_limits"
"""Request extension key: a `ResponseLimits` for that request instead of the transport's."""

_RECEIVE_SIZE = 65536
_INFLATE_STEP = 65536
_MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ResponseLimits:
    """What one response may cost; every field is a hard limit, checked as bytes arrive."""

    max_head_bytes: int = 64 * 1024
    """The status line and headers of one head (interim heads count separately)."""
    max_header_count: int = 100
    """Header lines in one head."""
    max_interim_responses: int = 8
    """1xx heads (``100 Continue``) before the real one."""
    max_body_bytes: int = 64 * _MiB
    """Body bytes as sent (after de-chunking, before decoding). A /sync can be large."""
    max_decoded_bytes: int = 64 * _MiB
    """Body bytes once its ``Content-Encoding`` is undone."""
    total_timeout_s: float = 300.0
    """Seconds from taking a pool slot to the body's last byte (connect, send, read)."""
    read_timeout_s: float = 60.0
    """Longest wait for the next bytes when the request's httpx ``read`` timeout is None."""

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if not value > 0 or (isinstance(value, float) and math.isinf(value)):
                raise ValueError(f"ResponseLimits.{field.name} must be positive and finite")


class ResponseLimitError(Exception):
    """A response broke one of its `ResponseLimits`; ``limit`` names the field."""

    limit: str


class ResponseTooLarge(ResponseLimitError, httpx.RemoteProtocolError):
    """A head, a header count, the interim heads or a body over its limit."""

    def __init__(self, message: str, *, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


class ResponseTooSlow(ResponseLimitError, httpx.ReadTimeout):
    """No bytes within the read timeout, or the whole response not within its total."""

    def __init__(self, message: str, *, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


class DecodedTooLarge(ResponseLimitError, httpx.DecodingError):
    """A compressed body that inflates past `ResponseLimits.max_decoded_bytes`."""

    def __init__(self, message: str, *, limit: str = "max_decoded_bytes") -> None:
        super().__init__(message)
        self.limit = limit


class _Origin(NamedTuple):
    scheme: str
    host: str
    port: int


class _ClosedBeforeAnswer(Exception):
    """Sending failed, or the server closed the connection cleanly before a byte of
    answer: on a reused connection, the server closing it as it was taken (it did not
    act on the request); on a new one, ``error`` is what to raise."""

    def __init__(self, error: httpx.TransportError) -> None:
        super().__init__(str(error))
        self.error = error


class _PlainIO:
    """A TCP connection on a non-blocking socket of our own."""

    def __init__(self, sock: socket.socket) -> None:
        self._socket = sock
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)

    def readable_now(self) -> bool:
        return bool(self._poll.poll(0))

    def send_now(self, data: bytes | memoryview) -> int:
        """Send what the kernel takes without waiting; how many bytes that was."""
        try:
            return self._socket.send(data)
        except BlockingIOError:
            return 0

    async def send_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            await trio.lowlevel.wait_writable(self._socket)
            view = view[self.send_now(view) :]

    async def receive(self, *, eager: bool) -> bytes:
        if eager:
            # More of an answer already coming in: the rest is likely there. Bytes
            # found without waiting still pass through the scheduler, so a server
            # that streams without end cannot starve the other tasks.
            try:
                data = self._socket.recv(_RECEIVE_SIZE)
            except BlockingIOError:
                pass
            else:
                await trio.lowlevel.checkpoint()
                return data
        while True:
            await trio.lowlevel.wait_readable(self._socket)
            try:
                return self._socket.recv(_RECEIVE_SIZE)
            except BlockingIOError:
                continue

    async def aclose(self) -> None:
        trio.lowlevel.notify_closing(self._socket)
        self._socket.close()
        await trio.lowlevel.checkpoint()


class _TLSIO:
    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self._stream = stream
        self._poll = select.poll()
        self._poll.register(stream.transport_stream.socket.fileno(), select.POLLIN)

    def readable_now(self) -> bool:
        # Session tickets arrive with the first answer, so bytes on an idle TLS
        # connection are a close_notify, a close or stray bytes: drop it either way
        # (at worst a rare key update costs one handshake).
        return bool(self._poll.poll(0))

    def send_now(self, data: bytes | memoryview) -> int:
        return 0  # TLS records are written by the stream

    async def send_all(self, data: bytes | memoryview) -> None:
        await self._stream.send_all(data)

    async def receive(self, *, eager: bool) -> bytes:
        # Always a schedule point: trio's SSLStream yields even when it had bytes.
        return bytes(await self._stream.receive_some(_RECEIVE_SIZE))

    async def aclose(self) -> None:
        await self._stream.aclose()


_IO = _PlainIO | _TLSIO
_Next = h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]
_IO_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


class _Connection:
    """One keep-alive connection: its socket and its h11 state machine."""

    def __init__(self, io: _IO, max_incomplete_event_size: int) -> None:
        self.io = io
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_incomplete_event_size)
        self.received = 0
        """Bytes received during the current exchange."""
        self.checkpointed = False
        """A checkpoint passed since the last body piece went to the caller."""

    async def receive(self, read_s: float, total_deadline: float) -> None:
        """Feed h11 the next bytes (``b""`` at the end), within both deadlines."""
        read_deadline = trio.current_time() + read_s
        with trio.CancelScope(deadline=min(read_deadline, total_deadline)):
            try:
                data = await self.io.receive(eager=self.received > 0)
            except _IO_ERRORS as exc:
                # A reset after the request went out: the server may have acted on
                # it, so this is not retried here.
                raise httpx.ReadError(f"reading failed: {_reason(exc)}") from exc
            if not data and not self.received:
                raise _ClosedBeforeAnswer(
                    httpx.RemoteProtocolError("the server closed the connection without answering")
                )
            self.received += len(data)
            self.checkpointed = True  # each receive path above is a schedule point
            self.h11.receive_data(data)
            return
        if total_deadline <= read_deadline:
            raise ResponseTooSlow(
                "the response took longer than its total time (ResponseLimits.total_timeout_s)",
                limit="total_timeout_s",
            )
        raise ResponseTooSlow(f"no bytes from the server within {read_s} s", limit="read_timeout_s")

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True), contextlib.suppress(*_IO_ERRORS):
            await self.io.aclose()


class _Pool:
    def __init__(self, max_connections: int) -> None:
        self.slots = trio.Semaphore(max_connections)
        self.idle: list[_Connection] = []

    async def acquire(self, seconds: float | None) -> None:
        try:
            self.slots.acquire_nowait()
        except trio.WouldBlock:
            with trio.move_on_after(math.inf if seconds is None else seconds):
                await self.slots.acquire()
                return
            raise httpx.PoolTimeout("timed out waiting for a connection") from None


class H11Transport(httpx.AsyncBaseTransport):
    """HTTP/1.1 with keep-alive, at most ``max_connections`` per origin, within ``limits``.

    The owner closes it (`aclose`); an `httpx.AsyncClient` given it closes it too.
    ``ssl_context`` (else `ssl.create_default_context`, built once) serves every TLS
    connection.
    """

    def __init__(
        self,
        *,
        limits: ResponseLimits | None = None,
        max_connections: int = 16,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._limits = limits or ResponseLimits()
        self._max_connections = max_connections
        self._ssl_context = ssl_context
        self._pools: dict[_Origin, _Pool] = {}
        # h11's own bound on an unfinished event: ours (`max_head_bytes`) is checked
        # first, since a head grows by at most one read between checks.
        self._max_incomplete = self._limits.max_head_bytes + _RECEIVE_SIZE

    @property
    def limits(self) -> ResponseLimits:
        return self._limits

    def _context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    async def aclose(self) -> None:
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            idle, pool.idle = pool.idle, []
            for connection in idle:
                await connection.aclose()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        limits = request.extensions.get(LIMITS_EXTENSION) or self._limits
        if not isinstance(limits, ResponseLimits):
            raise TypeError(f"the {LIMITS_EXTENSION!r} extension must be a ResponseLimits")
        timeouts: Mapping[str, float | None] = request.extensions.get("timeout", {})
        read = timeouts.get("read")
        read_s = limits.read_timeout_s if read is None else read
        try:
            # Validates method, target and every header before anything is sent.
            head = h11.Request(
                method=request.method,
                target=request.url.raw_path,
                headers=request.headers.raw,
            )
        except h11.LocalProtocolError as exc:
            raise _refused(exc) from exc
        body = await request.aread()
        url = request.url
        origin = _Origin(url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        pool = self._pools.get(origin)
        if pool is None:
            pool = self._pools[origin] = _Pool(self._max_connections)
        await pool.acquire(timeouts.get("pool"))
        try:
            total_deadline = trio.current_time() + limits.total_timeout_s
            connection, response = await self._send(
                pool, origin, head, body, timeouts, read_s, total_deadline, limits
            )
        except BaseException:
            pool.slots.release()
            raise
        try:
            headers, inflater = _decoding(response, limits)
        except BaseException:
            await connection.aclose()
            pool.slots.release()
            raise
        stream = _ResponseStream(pool, connection, inflater, limits, read_s, total_deadline)
        whole = await stream.whole_if_buffered()
        return httpx.Response(
            response.status_code,
            headers=headers,
            stream=stream if whole is None else httpx.ByteStream(whole),
            request=request,
            extensions={
                "http_version": b"HTTP/" + response.http_version,
                "reason_phrase": response.reason,
            },
        )

    async def _send(
        self,
        pool: _Pool,
        origin: _Origin,
        head: h11.Request,
        body: bytes,
        timeouts: Mapping[str, float | None],
        read_s: float,
        total_deadline: float,
        limits: ResponseLimits,
    ) -> tuple[_Connection, h11.Response]:
        """Send the request on a pooled or new connection; the response head."""
        connection: _Connection | None = None
        while pool.idle:
            candidate = pool.idle.pop()
            if candidate.io.readable_now():
                await candidate.aclose()  # closed by the server, or bytes nobody asked for
            else:
                connection = candidate
                break
        reused = connection is not None
        while True:
            if connection is None:
                connection = await self._open(origin, timeouts.get("connect"), total_deadline)
            try:
                await _send_request(connection, head, body, timeouts.get("write"), total_deadline)
                return connection, await _read_head(connection, limits, read_s, total_deadline)
            except _ClosedBeforeAnswer as exc:
                await connection.aclose()
                if not reused:
                    raise exc.error from exc.__cause__
                # The server closed an idle connection just as it was reused (a clean
                # close, not a byte of answer): it did not take the request, so once
                # more on a fresh connection.
                connection, reused = None, False
            except BaseException:
                await connection.aclose()
                raise

    async def _open(
        self, origin: _Origin, connect_s: float | None, total_deadline: float
    ) -> _Connection:
        scheme, host, port = origin
        deadline = total_deadline
        if connect_s is not None:
            deadline = min(deadline, trio.current_time() + connect_s)
        with trio.move_on_at(deadline):
            return await self._connect(scheme, host, port)
        raise httpx.ConnectTimeout(f"timed out connecting to {host}:{port}")

    async def _connect(self, scheme: str, host: str, port: int) -> _Connection:
        try:
            tcp = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
        if scheme != "https":
            # trio connected it (resolution, happy eyeballs, TCP_NODELAY); from here
            # the socket is driven directly.
            sock = socket.socket(fileno=tcp.socket.detach())
            sock.setblocking(False)
            return _Connection(_PlainIO(sock), self._max_incomplete)
        tls = trio.SSLStream(tcp, self._context(), server_hostname=host, https_compatible=True)
        try:
            await tls.do_handshake()
        except (*_IO_ERRORS, ssl.SSLError) as exc:
            await tcp.aclose()
            raise httpx.ConnectError(f"TLS with {host}:{port} failed: {_reason(exc)}") from exc
        except BaseException:
            await tcp.aclose()
            raise
        return _Connection(_TLSIO(tls), self._max_incomplete)


def _refused(exc: h11.LocalProtocolError) -> httpx.LocalProtocolError:
    """h11's reason without the value it quotes: a refused header may be the token."""
    reason = str(exc).split(" b'", 1)[0].split(' b"', 1)[0]
    return httpx.LocalProtocolError(f"request refused: {reason}")


def _reason(exc: BaseException) -> str:
    """A message that says something: trio's BrokenResourceError keeps it in its cause."""
    while not str(exc) and exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _send_request(
    connection: _Connection,
    head: h11.Request,
    body: bytes,
    write_s: float | None,
    total_deadline: float,
) -> None:
    machine = connection.h11
    connection.received = 0
    try:
        data = machine.send(head) or b""
        if body:
            data += machine.send(h11.Data(data=body)) or b""
        data += machine.send(h11.EndOfMessage()) or b""
    except h11.LocalProtocolError as exc:
        raise _refused(exc) from exc
    try:
        # Most requests fit in the kernel's buffer at once: no wait, no cancel scope.
        sent = connection.io.send_now(data)
        if sent == len(data):
            return
        deadline = total_deadline
        if write_s is not None:
            deadline = min(deadline, trio.current_time() + write_s)
        with trio.move_on_at(deadline):
            await connection.io.send_all(memoryview(data)[sent:])
            return
    except _IO_ERRORS as exc:
        raise _ClosedBeforeAnswer(httpx.WriteError(f"sending failed: {_reason(exc)}")) from exc
    raise httpx.WriteTimeout("timed out sending the request")


async def _read_head(
    connection: _Connection, limits: ResponseLimits, read_s: float, total_deadline: float
) -> h11.Response:
    machine = connection.h11
    interim = 0
    try:
        while True:
            event = machine.next_event()
            if event is h11.NEED_DATA:
                if len(machine.trailing_data[0]) > limits.max_head_bytes:
                    raise ResponseTooLarge(
                        f"response head over {limits.max_head_bytes} bytes",
                        limit="max_head_bytes",
                    )
                await connection.receive(read_s, total_deadline)
            elif isinstance(event, h11.InformationalResponse):
                interim += 1
                if interim > limits.max_interim_responses:
                    raise ResponseTooLarge(
                        f"more than {limits.max_interim_responses} interim (1xx) heads",
                        limit="max_interim_responses",
                    )
                _check_head(event, limits)
            elif isinstance(event, h11.Response):
                _check_head(event, limits)
                return event
            else:
                raise httpx.RemoteProtocolError("the server closed the connection mid-response")
    except h11.RemoteProtocolError as exc:
        raise httpx.RemoteProtocolError(f"malformed response: {exc}") from exc


def _check_head(event: h11.Response | h11.InformationalResponse, limits: ResponseLimits) -> None:
    headers = event.headers
    if len(headers) > limits.max_header_count:
        raise ResponseTooLarge(
            f"more than {limits.max_header_count} header lines", limit="max_header_count"
        )
    # h11 has checked each value (one Content-Length, digits only; only chunked).
    length: bytes | None = None
    chunked = False
    for name, value in headers:
        if name == b"content-length":
            length = value
        elif name == b"transfer-encoding":
            chunked = True
    if length is not None and chunked:
        # h11 lets chunked win (RFC 9112 6.3); a server sending both is either broken
        # or smuggling, and its connection must not carry another request.
        raise httpx.RemoteProtocolError("response has both Content-Length and Transfer-Encoding")
    if length is not None and int(length) > limits.max_body_bytes:
        raise ResponseTooLarge(
            f"Content-Length {int(length)} over the body limit of {limits.max_body_bytes}",
            limit="max_body_bytes",
        )


def _decoding(
    response: h11.Response, limits: ResponseLimits
) -> tuple[list[tuple[bytes, bytes]], _Inflater | None]:
    """The headers to hand httpx, and the inflater for the body's content coding."""
    headers = response.headers.raw_items()
    codings = [
        coding.strip()
        for name, value in response.headers
        if name == b"content-encoding"
        for coding in value.lower().split(b",")
        if coding.strip() not in (b"", b"identity")
    ]
    if not codings:
        return headers, None
    if len(codings) > 1:
        raise httpx.DecodingError(f"more than one Content-Encoding: {b', '.join(codings)!r}")
    (coding,) = codings
    if coding not in (b"gzip", b"x-gzip", b"deflate"):
        raise httpx.DecodingError(f"unsupported Content-Encoding {coding!r}")
    # Decoded here under a cap; httpx must not decode it again (nor trust the length).
    kept = [
        (name, value)
        for name, value in headers
        if name.lower() not in (b"content-encoding", b"content-length")
    ]
    return kept, _Inflater(coding, limits.max_decoded_bytes)


class _Inflater:
    """One gzip or deflate body, inflated in bounded steps under a total cap."""

    def __init__(self, coding: bytes, cap: int) -> None:
        self._cap = cap
        self._out = 0
        self._raw_fallback = coding == b"deflate"  # some servers send raw deflate
        self._zlib = zlib.decompressobj(
            16 + zlib.MAX_WBITS if coding != b"deflate" else zlib.MAX_WBITS
        )
        self._fed = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The inflated pieces of ``data``, each at most 64 KiB."""
        if not data:
            return
        if self._zlib.eof:
            raise httpx.DecodingError("data after the end of the compressed body")
        first = not self._fed
        self._fed = True
        try:
            piece = self._zlib.decompress(data, _INFLATE_STEP)
        except zlib.error as exc:
            if not (first and self._raw_fallback):
                raise httpx.DecodingError(f"body does not match its encoding: {exc}") from exc
            self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
            piece = self._inflate(data)
        while True:
            self._out += len(piece)
            if self._out > self._cap:
                raise DecodedTooLarge(f"body inflates past {self._cap} bytes")
            if piece:
                yield piece
            if not self._zlib.unconsumed_tail and len(piece) < _INFLATE_STEP:
                break
            piece = self._inflate(self._zlib.unconsumed_tail)
        if self._zlib.eof and self._zlib.unused_data:
            raise httpx.DecodingError("data after the end of the compressed body")

    def _inflate(self, data: bytes) -> bytes:
        try:
            return self._zlib.decompress(data, _INFLATE_STEP)
        except zlib.error as exc:
            raise httpx.DecodingError(f"body does not match its encoding: {exc}") from exc

    def finish(self) -> None:
        if self._fed and not self._zlib.eof:
            raise httpx.DecodingError("compressed body cut short")


async def _pause(connection: _Connection) -> None:
    """A checkpoint before each body piece, unless a read just made one.

    One read holds many pieces at times (tiny chunks, or a body that inflates a
    lot), and a caller reading the body whole never yields between them.
    """
    if connection.checkpointed:
        connection.checkpointed = False
    else:
        await trio.lowlevel.checkpoint()


class _ResponseStream(httpx.AsyncByteStream):
    """A response body read as the caller iterates; gives the connection back at its end."""

    def __init__(
        self,
        pool: _Pool,
        connection: _Connection,
        inflater: _Inflater | None,
        limits: ResponseLimits,
        read_s: float,
        total_deadline: float,
    ) -> None:
        self._pool = pool
        self._connection: _Connection | None = connection
        self._inflater = inflater
        self._limits = limits
        self._read_s = read_s
        self._total_deadline = total_deadline
        self._body_bytes = 0
        self._prefix: bytes | None = None
        self._pending: _Next | None = None

    async def whole_if_buffered(self) -> bytes | None:
        """The body, when it is plain and already read whole with the head (most
        answers): the connection goes back at once, and httpx gets bytes, not a stream.
        Else None, and nothing is lost: the stream starts where this stopped."""
        connection = self._connection
        if connection is None or self._inflater is not None:
            return None
        machine = connection.h11
        try:
            event = machine.next_event()
            if isinstance(event, h11.EndOfMessage):
                await self._release(connection)
                return b""
            if not isinstance(event, h11.Data):
                self._pending = event
                return None
            data = self._count(event)
            following = machine.next_event()
        except h11.RemoteProtocolError as exc:
            await self.aclose()
            raise httpx.RemoteProtocolError(f"malformed response body: {exc}") from exc
        except BaseException:
            await self.aclose()
            raise
        if isinstance(following, h11.EndOfMessage):
            await self._release(connection)
            return data
        self._prefix, self._pending = data, following
        return None

    def _count(self, event: h11.Data) -> bytes:
        data = bytes(event.data)
        self._body_bytes += len(data)
        if self._body_bytes > self._limits.max_body_bytes:
            raise ResponseTooLarge(
                f"body over {self._limits.max_body_bytes} bytes", limit="max_body_bytes"
            )
        return data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        connection = self._connection
        if connection is None:
            raise httpx.StreamClosed()
        try:
            async with contextlib.aclosing(self._body(connection)) as body:
                async for piece in body:
                    yield piece
        except h11.RemoteProtocolError as exc:
            await self.aclose()
            raise httpx.RemoteProtocolError(f"malformed response body: {exc}") from exc
        except GeneratorExit:
            raise  # abandoned mid-way: the owner's aclose() closes the connection
        except BaseException:
            await self.aclose()
            raise

    async def _body(self, connection: _Connection) -> AsyncGenerator[bytes, None]:
        machine = connection.h11
        inflater = self._inflater
        if self._prefix is not None:
            prefix, self._prefix = self._prefix, None
            await _pause(connection)
            yield prefix
        while True:
            if self._pending is None:
                event = machine.next_event()
            else:
                event, self._pending = self._pending, None
            if event is h11.NEED_DATA:
                await connection.receive(self._read_s, self._total_deadline)
            elif isinstance(event, h11.Data):
                data = self._count(event)
                if inflater is None:
                    await _pause(connection)
                    yield data
                    continue
                for piece in inflater.feed(data):
                    await _pause(connection)
                    yield piece
            elif isinstance(event, h11.EndOfMessage):
                if inflater is not None:
                    inflater.finish()
                await self._release(connection)
                return
            else:
                raise httpx.RemoteProtocolError("the server closed the connection mid-response")

    async def _release(self, connection: _Connection) -> None:
        """Back to the pool if h11 says it can carry another request and nothing is left."""
        self._connection = None
        machine = connection.h11
        try:
            if machine.our_state is h11.DONE and machine.their_state is h11.DONE:
                machine.start_next_cycle()
                leftover, closed = machine.trailing_data
                if not leftover and not closed:
                    self._pool.idle.append(connection)
                    return
            await connection.aclose()  # h11 says close, or bytes came after the answer
        finally:
            self._pool.slots.release()

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                await connection.aclose()  # a body not read to its end
            finally:
                self._pool.slots.release()
