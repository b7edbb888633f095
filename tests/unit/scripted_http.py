"""A scripted HTTP/1.1 server on 127.0.0.1 for client tests.

Each server runs its own trio loop in a thread, so the bytes it streams are always
waiting on the socket: a client read that never yields would starve the tasks of the
test's own loop.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field

import trio

Handler = Callable[[trio.SocketStream, "Server"], Awaitable[None]]


@dataclass
class Server:
    """Runs ``handler`` on each accepted connection, in a trio loop of its own thread."""

    handler: Handler
    port: int = 0
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)
    _token: trio.lowlevel.TrioToken | None = None
    _scope: trio.CancelScope | None = None

    async def main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._scope = nursery.cancel_scope
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, self._on_connection, 0, host="127.0.0.1")
            )
            self.port = listeners[0].socket.getsockname()[1]
            self.ready.set()

    async def _on_connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await self.handler(stream, self)

    def stop(self) -> None:
        assert self._token is not None
        assert self._scope is not None
        self._token.run_sync_soon(self._scope.cancel)

    async def read_request(self, stream: trio.abc.Stream, buffer: bytearray) -> bytes | None:
        """The next request's head (its body, by Content-Length, read and dropped)."""
        while b"\r\n\r\n" not in buffer:
            data = await stream.receive_some(65536)
            if not data:
                return None
            buffer += data
        head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            rest += await stream.receive_some(65536)
        buffer[:] = rest[length:]
        self.requests.append(head + b"\r\n\r\n" + rest[:length])
        return head


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[Server]:
    server = Server(handler)
    thread = threading.Thread(target=trio.run, args=(server.main,), daemon=True)
    thread.start()
    with trio.fail_after(5):
        await trio.to_thread.run_sync(server.ready.wait, abandon_on_cancel=True)
    try:
        yield server
    finally:
        server.stop()
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await trio.to_thread.run_sync(thread.join, abandon_on_cancel=True)


def answer(body: bytes, *, status: int = 200, headers: tuple[bytes, ...] = ()) -> bytes:
    head = [f"HTTP/1.1 {status} X".encode(), b"Content-Length: " + str(len(body)).encode()]
    return b"\r\n".join([*head, *headers]) + b"\r\n\r\n" + body


def keep_alive(*answers: bytes) -> Handler:
    """Answer successive requests on one connection with ``answers`` in turn."""

    async def handler(stream: trio.SocketStream, server: Server) -> None:
        buffer = bytearray()
        index = 0
        while await server.read_request(stream, buffer) is not None:
            await stream.send_all(answers[min(index, len(answers) - 1)])
            index += 1

    return handler


def sends(*parts: bytes, then_forever: bytes = b"", close: bool = False) -> Handler:
    """After the request: ``parts``, then ``then_forever`` without end, then close or idle."""
    # Megabytes per call, built here (before any memory is measured): the kernel's
    # buffer stays full, so client reads find bytes waiting.
    block = then_forever * ((4 << 20) // len(then_forever)) if then_forever else b""

    async def handler(stream: trio.SocketStream, server: Server) -> None:
        await server.read_request(stream, bytearray())
        for part in parts:
            await stream.send_all(part)
        while block:
            await stream.send_all(block)
        if close:
            await stream.aclose()
        else:
            await trio.sleep_forever()

    return handler
