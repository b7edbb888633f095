"""matrix_api.transport.TrioTransport against a scripted HTTP/1.1 server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import functools
import gzip
import ssl
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field

import httpx
import pytest
import trio
import trustme

from matrix_api import LimitExceeded, MatrixClient, RetryPolicy
from matrix_api.models import RoomID, SyncToken
from matrix_api.transport import RawResponse, TrioTransport, decode_content

Handler = Callable[[trio.SocketStream, "Server"], Awaitable[None]]


@dataclass
class Server:
    """Each accepted connection runs ``handler``; counts connections and requests."""

    handler: Handler
    port: int = 0
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)

    async def read_request(self, stream: trio.SocketStream, buffer: bytearray) -> bytes | None:
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

    async def on_connection(stream: trio.SocketStream) -> None:
        server.connections += 1
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await handler(stream, server)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, on_connection, 0, host="127.0.0.1")
        )
        server.port = listeners[0].socket.getsockname()[1]
        yield server
        nursery.cancel_scope.cancel()


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


async def get(
    server: Server, transport: TrioTransport, path: str = "/x", **kwargs: object
) -> httpx.Response:
    async with httpx.AsyncClient(
        transport=transport, base_url=f"http://127.0.0.1:{server.port}"
    ) as client:
        return await client.get(path, **kwargs)  # type: ignore[arg-type]


async def test_keep_alive_serves_many_requests_on_one_connection() -> None:
    async with serving(keep_alive(answer(b'{"ok": true}'))) as server:
        transport = TrioTransport()
        async with httpx.AsyncClient(
            transport=transport, base_url=f"http://127.0.0.1:{server.port}"
        ) as client:
            for _ in range(5):
                response = await client.get("/_matrix/client/versions")
                assert response.json() == {"ok": True}
    assert server.connections == 1
    assert len(server.requests) == 5


async def test_a_chunked_body_is_reassembled() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: y\r\n\r\n"
    )
    async with serving(keep_alive(chunked, answer(b"again"))) as server:
        transport = TrioTransport()
        async with httpx.AsyncClient(
            transport=transport, base_url=f"http://127.0.0.1:{server.port}"
        ) as client:
            assert (await client.get("/a")).content == b"hello world"
            assert (await client.get("/b")).content == b"again"
    assert server.connections == 1


async def test_put_sends_the_body_with_its_length() -> None:
    async with (
        serving(keep_alive(answer(b"{}"))) as server,
        httpx.AsyncClient(
            transport=TrioTransport(), base_url=f"http://127.0.0.1:{server.port}"
        ) as client,
    ):
        await client.put("/send/%24a%2Fb", content=b'{"body": "hi"}')
    request = server.requests[0]
    assert request.startswith(b"PUT /send/%24a%2Fb HTTP/1.1\r\n")
    assert b"\r\nContent-Length: 14\r\n" in request
    assert request.endswith(b'\r\n\r\n{"body": "hi"}')


async def test_a_body_larger_than_the_socket_buffer_is_sent_whole() -> None:
    body = bytes(range(256)) * 16384  # 4 MiB: the kernel takes it in several goes
    async with (
        serving(keep_alive(answer(b"{}"))) as server,
        httpx.AsyncClient(
            transport=TrioTransport(), base_url=f"http://127.0.0.1:{server.port}"
        ) as client,
    ):
        await client.put("/big", content=body)
    assert server.requests[0].endswith(b"\r\n\r\n" + body)


async def test_a_server_that_stops_reading_is_a_write_timeout() -> None:
    async def deaf(stream: trio.SocketStream, server: Server) -> None:
        await trio.sleep_forever()

    async with (
        serving(deaf) as server,
        httpx.AsyncClient(
            transport=TrioTransport(), base_url=f"http://127.0.0.1:{server.port}"
        ) as client,
    ):
        with pytest.raises(httpx.WriteTimeout):
            await client.put(
                "/big", content=b"x" * (64 << 20), timeout=httpx.Timeout(5.0, write=0.2)
            )


async def test_a_server_closing_an_idle_connection_is_transparent() -> None:
    async def one_per_connection(stream: trio.SocketStream, server: Server) -> None:
        buffer = bytearray()
        await server.read_request(stream, buffer)
        await stream.send_all(answer(b"fine"))
        await stream.aclose()  # keep-alive timeout on the server's side

    async with serving(one_per_connection) as server:
        transport = TrioTransport()
        async with httpx.AsyncClient(
            transport=transport, base_url=f"http://127.0.0.1:{server.port}"
        ) as client:
            for _ in range(3):
                assert (await client.get("/")).content == b"fine"
                await trio.sleep(0.01)
    assert server.connections == 3


async def test_connection_close_is_honoured_and_a_body_may_run_to_eof() -> None:
    async def close_delimited(stream: trio.SocketStream, server: Server) -> None:
        await server.read_request(stream, bytearray())
        await stream.send_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
        await stream.aclose()

    async with (
        serving(close_delimited) as server,
        httpx.AsyncClient(
            transport=TrioTransport(), base_url=f"http://127.0.0.1:{server.port}"
        ) as client,
    ):
        assert (await client.get("/")).content == b"until the end"
        assert (await client.get("/")).content == b"until the end"
    assert server.connections == 2


async def test_gzip_content_encoding_is_decoded() -> None:
    body = gzip.compress(b'{"compressed": true}')
    async with serving(keep_alive(answer(body, headers=(b"Content-Encoding: gzip",)))) as server:
        response = await get(server, TrioTransport())
    assert response.json() == {"compressed": True}


async def test_no_content_and_an_interim_continue() -> None:
    no_content = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"
    async with (
        serving(keep_alive(no_content, answer(b"next"))) as server,
        httpx.AsyncClient(
            transport=TrioTransport(), base_url=f"http://127.0.0.1:{server.port}"
        ) as client,
    ):
        first = await client.get("/")
        assert first.status_code == 204
        assert first.content == b""
        assert (await client.get("/")).content == b"next"


async def test_refused_connection_is_a_connect_error() -> None:
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with httpx.AsyncClient(transport=TrioTransport()) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{port}/")


async def test_a_silent_server_is_a_read_timeout() -> None:
    async def silent(stream: trio.SocketStream, server: Server) -> None:
        await server.read_request(stream, bytearray())
        await trio.sleep_forever()

    async with serving(silent) as server:
        with pytest.raises(httpx.ReadTimeout):
            await get(server, TrioTransport(), timeout=httpx.Timeout(5.0, read=0.2))


async def test_a_reset_mid_response_is_a_transport_error() -> None:
    async def cut(stream: trio.SocketStream, server: Server) -> None:
        await server.read_request(stream, bytearray())
        await stream.send_all(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"trunc')
        await stream.aclose()

    async with serving(cut) as server:
        with pytest.raises(httpx.TransportError):
            await get(server, TrioTransport())


@pytest.mark.parametrize(
    "garbage",
    [
        b"SMTP ready\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: lots\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
async def test_a_malformed_answer_is_a_protocol_error(garbage: bytes) -> None:
    async def bad(stream: trio.SocketStream, server: Server) -> None:
        await server.read_request(stream, bytearray())
        await stream.send_all(garbage)
        await stream.aclose()

    async with serving(bad) as server:
        with pytest.raises(httpx.RemoteProtocolError):
            await get(server, TrioTransport())


async def test_the_pool_limit_queues_requests_and_times_out_the_wait() -> None:
    release = trio.Event()

    async def slow(stream: trio.SocketStream, server: Server) -> None:
        buffer = bytearray()
        while await server.read_request(stream, buffer) is not None:
            await release.wait()
            await stream.send_all(answer(b"done"))

    async with serving(slow) as server:
        transport = TrioTransport(max_connections=1)
        async with (
            httpx.AsyncClient(
                transport=transport, base_url=f"http://127.0.0.1:{server.port}"
            ) as client,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(client.get, "/first")
            await trio.sleep(0.05)
            with pytest.raises(httpx.PoolTimeout):
                await client.get("/second", timeout=httpx.Timeout(5.0, pool=0.1))
            release.set()
    assert server.connections == 1


async def test_https_with_keep_alive_and_a_verified_certificate() -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)

    async def tls(stream: trio.SocketStream, server: Server) -> None:
        wrapped = trio.SSLStream(stream, server_context, server_side=True)
        buffer = bytearray()
        while await server.read_request(wrapped, buffer) is not None:  # type: ignore[arg-type]
            await wrapped.send_all(answer(b'{"secure": true}'))

    async with serving(tls) as server:
        transport = TrioTransport(ssl_context=client_context)
        async with httpx.AsyncClient(
            transport=transport, base_url=f"https://127.0.0.1:{server.port}"
        ) as client:
            for _ in range(3):
                assert (await client.get("/")).json() == {"secure": True}
    assert server.connections == 1


async def test_an_untrusted_certificate_is_a_connect_error() -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)

    async def tls(stream: trio.SocketStream, server: Server) -> None:
        wrapped = trio.SSLStream(stream, server_context, server_side=True)
        with contextlib.suppress(trio.BrokenResourceError, ssl.SSLError):
            await wrapped.do_handshake()

    async with serving(tls) as server:
        with pytest.raises(httpx.ConnectError):
            await get_url(f"https://127.0.0.1:{server.port}/", TrioTransport())


async def get_url(url: str, transport: TrioTransport) -> httpx.Response:
    async with httpx.AsyncClient(transport=transport) as client:
        return await client.get(url)


async def test_the_matrix_client_uses_the_transport_below_httpx_models() -> None:
    """`HTTPCore` calls `TrioTransport.exchange` itself: what reaches the wire."""
    whoami = gzip.compress(b'{"user_id": "@bot:example.org", "device_id": "D"}')
    limited = answer(
        b'{"errcode": "M_LIMIT_EXCEEDED", "retry_after_ms": 9000}',
        status=429,
        headers=(b"Retry-After: 2",),
    )
    async with (
        serving(
            keep_alive(answer(whoami, headers=(b"Content-Encoding: gzip",)), limited)
        ) as server,
        MatrixClient(
            f"http://127.0.0.1:{server.port}/behind/a/prefix/",
            access_token="secret-token",
            retry_policy=RetryPolicy(max_attempts=1),
        ) as client,
    ):
        who = await client.whoami()
        with pytest.raises(LimitExceeded) as raised:
            await client.sync(since=SyncToken("s 1&x"))
    assert who.user_id == "@bot:example.org"
    assert raised.value.retry_after == 2.0  # the header wins over the body
    first, second = server.requests
    lines = first.split(b"\r\n")
    assert lines[0] == b"GET /behind/a/prefix/_matrix/client/v3/account/whoami HTTP/1.1"
    assert f"Host: 127.0.0.1:{server.port}".encode() in lines
    assert b"Authorization: Bearer secret-token" in lines
    assert b"Accept-Encoding: gzip, deflate" in lines
    assert second.startswith(
        b"GET /behind/a/prefix/_matrix/client/v3/sync?timeout=0&since=s%201%26x "
    )
    assert server.connections == 1


async def test_only_a_get_asks_for_a_compressed_answer() -> None:
    async with (
        serving(keep_alive(answer(b'{"event_id": "$e"}'))) as server,
        MatrixClient(f"http://127.0.0.1:{server.port}", access_token="t") as client,
    ):
        await client.send_event(RoomID("!r:example.org"), "m.room.message", {"body": "hi"}, "txn1")
    (put,) = server.requests
    assert put.startswith(b"PUT /_matrix/client/v3/rooms/%21r%3Aexample.org/send/")
    assert b"accept-encoding" not in put.lower()


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        (b"gzip", gzip.compress(b"plain")),
        (b"deflate", zlib.compress(b"plain")),
        (b"deflate", zlib.compress(b"plain", wbits=-zlib.MAX_WBITS)),
        (b"identity", b"plain"),
        (b"gzip, identity", gzip.compress(b"plain")),
    ],
)
def test_content_encodings_are_undone(encoding: bytes, body: bytes) -> None:
    response = RawResponse(200, [(b"Content-Encoding", encoding)], body)
    assert decode_content(response) == b"plain"


@pytest.mark.parametrize(
    ("encoding", "body"), [(b"gzip", b"not gzip at all"), (b"br", b"\x1b\x00")]
)
def test_a_body_that_does_not_match_its_encoding_is_a_decoding_error(
    encoding: bytes, body: bytes
) -> None:
    with pytest.raises(httpx.DecodingError):
        decode_content(RawResponse(200, [(b"content-encoding", encoding)], body))
