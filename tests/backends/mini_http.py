"""A tiny HTTP/1.1 server on loopback, in trio: one request per connection.

Enough of the protocol for the backends' tests: a request head and a ``Content-Length``
body in; a whole response, or a chunked one written piece by piece (and abandoned
mid-way on demand) out. Every response says ``Connection: close``.

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, handler)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

__all__ = ["HTTPRequest", "Responder", "serve_http"]

_REASONS = {
    200: "OK",
    202: "Accepted",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}
_MAX_HEAD = 64 * 1024


@dataclass(frozen=True)
class HTTPRequest:
    method: str
    path: str
    headers: dict[str, str]
    """Names in lower case."""
    body: bytes


class Responder:
    """Writes one response to the connection."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._chunked = False

    async def start(
        self, status: int, headers: dict[str, str] | None = None, *, chunked: bool = False
    ) -> None:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        if chunked:
            lines.append("Transfer-Encoding: chunked")
        lines.append("Connection: close")
        self._chunked = chunked
        await self._stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    async def chunk(self, data: bytes) -> None:
        if data:
            await self._stream.send_all(b"%x\r\n%s\r\n" % (len(data), data))

    async def raw(self, data: bytes) -> None:
        """Bytes as they are, no chunk framing (a body after a ``Content-Length``)."""
        await self._stream.send_all(data)

    async def end(self) -> None:
        if self._chunked:
            await self._stream.send_all(b"0\r\n\r\n")

    async def send(
        self,
        status: int,
        body: bytes = b"",
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        all_headers = {"Content-Type": content_type, "Content-Length": str(len(body))}
        all_headers.update(headers or {})
        await self.start(status, all_headers)
        await self._stream.send_all(body)


Handler = Callable[[HTTPRequest, Responder], Awaitable[None]]


async def _read_request(stream: trio.SocketStream) -> HTTPRequest | None:
    data = b""
    while b"\r\n\r\n" not in data:
        more = await stream.receive_some(65536)
        if not more or len(data) > _MAX_HEAD:
            return None
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    method, path, _version = request_line.split(" ", 2)
    headers: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        more = await stream.receive_some(65536)
        if not more:
            return None
        body += more
    return HTTPRequest(method, path, headers, body[:length])


async def serve_http(
    handler: Handler,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handler`` on 127.0.0.1 at a free port, given to ``task_status``."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def connection(stream: trio.SocketStream) -> None:
        try:
            async with stream:
                request = await _read_request(stream)
                if request is not None:
                    await handler(request, Responder(stream))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away (a timeout on its side): nothing to answer

    task_status.started(port)
    await trio.serve_listeners(connection, listeners)
