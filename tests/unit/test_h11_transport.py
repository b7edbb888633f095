"""matrix_api.h11_transport.H11Transport against hostile HTTP servers on 127.0.0.1.

Each server runs its own trio loop in a thread, so the bytes it streams are always
waiting on the socket: a client read that never yields would starve the counter task
that runs next to every hostile request (`ticking`). Requests go through
`httpx.AsyncClient(transport=H11Transport(...))`, as `MatrixClient`'s do.
"""

from __future__ import annotations

import gzip
import ssl
import tracemalloc
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import aclosing, asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from typing import cast

import httpx
import pytest
import trio
import trio.testing
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from matrix_api import MatrixClient, ResponseLimitExceeded, RetryPolicy
from matrix_api.h11_transport import (
    LIMITS_EXTENSION,
    DecodedTooLarge,
    H11Transport,
    ResponseLimits,
    ResponseTooLarge,
    ResponseTooSlow,
)
from scripted_http import Server, answer, keep_alive, sends, serving

MiB = 1024 * 1024
# Small limits, so that a hostile case fails in well under a second.
SMALL = ResponseLimits(
    max_body_bytes=MiB, max_decoded_bytes=MiB, total_timeout_s=3.0, read_timeout_s=1.0
)


def client(server: Server, transport: H11Transport, scheme: str = "http") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=transport, base_url=f"{scheme}://127.0.0.1:{server.port}")


@dataclass
class Ticker:
    ticks: int = 0

    async def run(self) -> None:
        while True:
            await trio.lowlevel.checkpoint()
            self.ticks += 1


@asynccontextmanager
async def ticking() -> AsyncIterator[Ticker]:
    """Another task that counts how often it gets to run meanwhile."""
    ticker = Ticker()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker.run)
        yield ticker
        nursery.cancel_scope.cancel()


@contextmanager
def peak_memory() -> Iterator[list[int]]:
    """The peak of Python allocations inside the block (every thread), in bytes."""
    result: list[int] = []
    tracemalloc.start()
    try:
        yield result
    finally:
        result.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()


# Happy paths


async def test_keep_alive_serves_many_requests_on_one_connection() -> None:
    async with (
        serving(keep_alive(answer(b'{"ok": true}'))) as server,
        client(server, H11Transport()) as http,
    ):
        for _ in range(5):
            response = await http.get("/_matrix/client/versions")
            assert response.json() == {"ok": True}
            assert response.extensions["http_version"] == b"HTTP/1.1"
    assert server.connections == 1
    assert len(server.requests) == 5
    assert server.requests[0].startswith(b"GET /_matrix/client/versions HTTP/1.1\r\n")


async def test_a_chunked_body_is_reassembled_and_the_connection_reused() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: y\r\n\r\n"
    )
    async with (
        serving(keep_alive(chunked, answer(b"again"))) as server,
        client(server, H11Transport()) as http,
    ):
        assert (await http.get("/a")).content == b"hello world"
        assert (await http.get("/b")).content == b"again"
    assert server.connections == 1


async def test_put_sends_the_body_with_its_length() -> None:
    async with (
        serving(keep_alive(answer(b"{}"))) as server,
        client(server, H11Transport()) as http,
    ):
        await http.put("/send/%24a%2Fb", content=b'{"body": "hi"}')
    request = server.requests[0]
    assert request.startswith(b"PUT /send/%24a%2Fb HTTP/1.1\r\n")
    assert b"\r\ncontent-length: 14\r\n" in request.lower()
    assert request.endswith(b'\r\n\r\n{"body": "hi"}')


async def test_a_body_larger_than_the_socket_buffer_is_sent_whole() -> None:
    body = bytes(range(256)) * 16384  # 4 MiB: the kernel takes it in several goes
    async with (
        serving(keep_alive(answer(b"{}"))) as server,
        client(server, H11Transport()) as http,
    ):
        with trio.fail_after(5):
            await http.put("/big", content=body)
    assert server.requests[0].endswith(b"\r\n\r\n" + body)


async def test_a_server_that_stops_reading_is_a_write_timeout() -> None:
    async def deaf(stream: trio.SocketStream, server: Server) -> None:
        await trio.sleep_forever()

    async with serving(deaf) as server, client(server, H11Transport()) as http:
        with trio.fail_after(5), pytest.raises(httpx.WriteTimeout):
            await http.put("/big", content=b"x" * (64 * MiB), timeout=httpx.Timeout(5.0, write=0.2))


async def test_a_body_to_the_end_of_the_connection_and_an_interim_head() -> None:
    async def handler(stream: trio.SocketStream, server: Server) -> None:
        await server.read_request(stream, bytearray())
        await stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\nuntil the end")
        await stream.aclose()

    async with serving(handler) as server, client(server, H11Transport()) as http:
        assert (await http.get("/")).content == b"until the end"
        assert (await http.get("/")).content == b"until the end"
    assert server.connections == 2  # h11: no length, so no reuse


async def test_a_server_closing_idle_connections_is_transparent() -> None:
    async def one_per_connection(stream: trio.SocketStream, server: Server) -> None:
        await server.read_request(stream, bytearray())
        await stream.send_all(answer(b"fine"))
        await stream.aclose()  # the server's keep-alive timeout

    async with serving(one_per_connection) as server, client(server, H11Transport()) as http:
        for _ in range(3):
            assert (await http.get("/")).content == b"fine"
            await trio.sleep(0.05)
    assert server.connections == 3


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        (b"gzip", gzip.compress(b'{"compressed": true}')),
        (b"x-gzip", gzip.compress(b'{"compressed": true}')),
        (b"deflate", zlib.compress(b'{"compressed": true}')),
        (b"deflate", zlib.compress(b'{"compressed": true}', wbits=-zlib.MAX_WBITS)),
        (b"identity, gzip", gzip.compress(b'{"compressed": true}')),
    ],
)
async def test_one_content_coding_is_undone_here_and_not_again(
    encoding: bytes, body: bytes
) -> None:
    encoded = answer(body, headers=(b"Content-Encoding: " + encoding,))
    async with serving(keep_alive(encoded)) as server, client(server, H11Transport()) as http:
        response = await http.get("/")
        assert response.json() == {"compressed": True}
        assert "content-encoding" not in response.headers
        assert (await http.get("/")).json() == {"compressed": True}
    assert server.connections == 1


async def test_https_with_keep_alive_and_one_context() -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)

    async def tls(stream: trio.SocketStream, server: Server) -> None:
        wrapped = trio.SSLStream(stream, server_context, server_side=True)
        buffer = bytearray()
        while await server.read_request(wrapped, buffer) is not None:
            await wrapped.send_all(answer(b'{"secure": true}'))

    async with serving(tls) as server:
        transport = H11Transport(ssl_context=client_context)
        async with client(server, transport, "https") as http:
            for _ in range(3):
                assert (await http.get("/")).json() == {"secure": True}
                await trio.sleep(0.02)  # session tickets come and go while idle
    assert server.connections == 1


async def test_an_untrusted_certificate_is_a_connect_error_with_its_reason() -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)

    async def tls(stream: trio.SocketStream, server: Server) -> None:
        wrapped = trio.SSLStream(stream, server_context, server_side=True)
        with suppress(trio.BrokenResourceError, ssl.SSLError):
            await wrapped.do_handshake()

    async with serving(tls) as server, client(server, H11Transport(), "https") as http:
        with trio.fail_after(5), pytest.raises(httpx.ConnectError) as raised:
            await http.get("/")
    assert "certificate verify failed" in str(raised.value).lower()


# The request side


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Evil": "a\r\nInjected: yes"},
        {"X-Evil": "a\nInjected: yes"},
        {"X-Evil\r\nInjected": "yes"},
        {"X-Nul": "a\x00b"},
    ],
)
async def test_a_request_header_with_crlf_is_refused_and_nothing_is_sent(
    headers: dict[str, str],
) -> None:
    async with (
        serving(keep_alive(answer(b"{}"))) as server,
        client(server, H11Transport()) as http,
    ):
        with trio.fail_after(2), pytest.raises(httpx.LocalProtocolError):
            await http.get("/", headers=headers)
        await trio.sleep(0.05)
    assert server.connections == 0
    assert server.requests == []


# Hostile servers: malformed framing


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1_0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunkedx\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"SMTP ready\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n Folded: header\r\n\r\n",
    ],
)
async def test_malformed_framing_is_a_protocol_error(head: bytes) -> None:
    async with serving(sends(head, b"0\r\n\r\nhello")) as server:
        async with client(server, H11Transport(limits=SMALL)) as http:
            with trio.fail_after(2), pytest.raises(httpx.RemoteProtocolError):
                await http.get("/")
            # A second request is not answered by the first one's leftovers.
            with trio.fail_after(2), pytest.raises(httpx.RemoteProtocolError):
                await http.get("/")
        assert server.connections == 2


async def test_a_content_length_of_ten_gigabytes_fails_before_the_body() -> None:
    async with (
        serving(
            sends(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000000\r\n\r\n", then_forever=b"x")
        ) as server,
        client(server, H11Transport(limits=SMALL)) as http,
    ):
        with peak_memory() as peak, trio.fail_after(2), pytest.raises(ResponseTooLarge) as raised:
            await http.get("/")
    assert raised.value.limit == "max_body_bytes"
    assert isinstance(raised.value, httpx.RemoteProtocolError)
    assert peak[0] < 4 * MiB


@pytest.mark.parametrize(
    ("head", "forever"),
    [
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"4000\r\n" + b"x" * 0x4000 + b"\r\n",
        ),
        (b"HTTP/1.1 200 OK\r\n\r\n", b"y" * 4096),  # no length: until the server closes
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1048577\r\n\r\n", b""),  # one byte over
    ],
    ids=["endless-chunked", "endless-to-eof", "length-over-limit"],
)
async def test_an_endless_body_stops_at_the_body_limit(head: bytes, forever: bytes) -> None:
    limits = SMALL if forever else ResponseLimits(max_body_bytes=MiB)
    async with (
        serving(sends(head, then_forever=forever)) as server,
        client(server, H11Transport(limits=limits)) as http,
        ticking() as ticker,
    ):
        with peak_memory() as peak, trio.fail_after(5), pytest.raises(ResponseTooLarge) as raised:
            await http.get("/")
    assert raised.value.limit == "max_body_bytes"
    if forever:
        assert ticker.ticks >= 10  # the reads yielded while bytes kept coming
        # httpx keeps what was read (up to the limit); nothing grows past it.
        assert peak[0] < 8 * MiB


@pytest.mark.parametrize("encoding", [b"identity", b"gzip"])
async def test_every_piece_of_a_body_is_a_checkpoint_even_with_bytes_waiting(
    encoding: bytes,
) -> None:
    """A read that finds bytes already there, and each step of inflating, still yields.

    Without that, a server that keeps bytes waiting (or a body that inflates a lot
    from one read) runs the reading task without a pause and starves every other.
    """
    body = bytes(range(256)) * 16384  # 4 MiB
    if encoding == b"gzip":
        body = gzip.compress(b"\0" * (32 * MiB))  # one read inflates in many steps
    head = b"HTTP/1.1 200 OK\r\nContent-Encoding: " + encoding + b"\r\n\r\n"
    limits = ResponseLimits(max_body_bytes=64 * MiB, max_decoded_bytes=64 * MiB)
    # The transport itself: httpx's own stream wrappers warn when left unfinished.
    async with serving(sends(head, body, close=True)) as server, H11Transport(limits=limits) as t:
        url = f"http://127.0.0.1:{server.port}/"
        response = await t.handle_async_request(httpx.Request("GET", url))
        await trio.sleep(0.2)  # the kernel's receive buffer fills meanwhile
        stream = cast("httpx.AsyncByteStream", response.stream)
        async with aclosing(cast("AsyncGenerator[bytes, None]", stream.__aiter__())) as pieces:
            await pieces.__anext__()  # may come from the read that found the head
            for _ in range(16):
                with trio.fail_after(2), trio.testing.assert_checkpoints():
                    await pieces.__anext__()
        await response.aclose()


async def test_endless_interim_heads_stop_at_their_limit() -> None:
    limits = ResponseLimits(max_interim_responses=20000, total_timeout_s=5.0)
    async with (
        serving(sends(then_forever=b"HTTP/1.1 100 Continue\r\n\r\n")) as server,
        client(server, H11Transport(limits=limits)) as http,
        ticking() as ticker,
    ):
        with trio.fail_after(10), pytest.raises(ResponseTooLarge) as raised:
            await http.get("/")
    assert raised.value.limit == "max_interim_responses"
    assert ticker.ticks >= 10


async def test_endless_interim_heads_default_limit() -> None:
    async with (
        serving(sends(then_forever=b"HTTP/1.1 100 Continue\r\n\r\n")) as server,
        client(server, H11Transport()) as http,
    ):
        with trio.fail_after(2), pytest.raises(ResponseTooLarge) as raised:
            await http.get("/")
    assert raised.value.limit == "max_interim_responses"


async def test_a_huge_head_stops_at_the_head_limit() -> None:
    limits = ResponseLimits(max_head_bytes=MiB, max_header_count=10**9)
    async with (
        serving(
            sends(b"HTTP/1.1 200 OK\r\n", then_forever=b"X-Filler: " + b"f" * 50 + b"\r\n")
        ) as server,
        client(server, H11Transport(limits=limits)) as http,
        ticking() as ticker,
    ):
        with peak_memory() as peak, trio.fail_after(5), pytest.raises(ResponseTooLarge) as raised:
            await http.get("/")
    assert raised.value.limit == "max_head_bytes"
    assert ticker.ticks >= 10
    assert peak[0] < 8 * MiB


async def test_a_head_without_end_of_line_stops_at_the_head_limit() -> None:
    async with (
        serving(sends(b"HTTP/1.1 200 OK\r\nX-Long: ", then_forever=b"z")) as server,
        client(server, H11Transport()) as http,
    ):
        with trio.fail_after(5), pytest.raises(ResponseTooLarge) as raised:
            await http.get("/")
    assert raised.value.limit == "max_head_bytes"


async def test_too_many_header_lines() -> None:
    head = b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 101 + b"Content-Length: 0\r\n\r\n"
    async with serving(sends(head)) as server, client(server, H11Transport()) as http:
        with trio.fail_after(2), pytest.raises(ResponseTooLarge) as raised:
            await http.get("/")
    assert raised.value.limit == "max_header_count"


# Hostile servers: time


async def test_a_slow_drip_stops_at_the_total_time() -> None:
    async def drip(stream: trio.SocketStream, server: Server) -> None:
        await server.read_request(stream, bytearray())
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        while True:
            await stream.send_all(b".")
            await trio.sleep(0.01)

    limits = ResponseLimits(total_timeout_s=0.5, read_timeout_s=1.0)
    async with (
        serving(drip) as server,
        client(server, H11Transport(limits=limits)) as http,
        ticking() as ticker,
    ):
        with trio.fail_after(3), pytest.raises(ResponseTooSlow) as raised:
            await http.get("/", timeout=httpx.Timeout(5.0, read=None))
    assert raised.value.limit == "total_timeout_s"
    assert isinstance(raised.value, httpx.ReadTimeout)
    assert ticker.ticks >= 10


async def test_silence_mid_body_is_a_read_timeout_per_read() -> None:
    async with (
        serving(sends(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")) as server,
        client(server, H11Transport()) as http,
    ):
        with trio.fail_after(3), pytest.raises(httpx.ReadTimeout) as raised:
            await http.get("/", timeout=httpx.Timeout(5.0, read=0.2))
    assert isinstance(raised.value, ResponseTooSlow)
    assert raised.value.limit == "read_timeout_s"


async def test_a_cut_body_is_a_protocol_error() -> None:
    cut = b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"trunc'
    async with serving(sends(cut, close=True)) as server, client(server, H11Transport()) as http:
        with trio.fail_after(2), pytest.raises(httpx.RemoteProtocolError):
            await http.get("/")


# Hostile servers: reuse


async def test_stale_bytes_in_the_same_packet_are_not_the_next_answer() -> None:
    async def handler(stream: trio.SocketStream, server: Server) -> None:
        buffer = bytearray()
        first = server.connections == 1
        while await server.read_request(stream, buffer) is not None:
            late = answer(b'"stale"') if first else b""
            await stream.send_all(answer(b'"fresh"') + late)

    async with serving(handler) as server, client(server, H11Transport()) as http:
        assert (await http.get("/1")).json() == "fresh"
        assert (await http.get("/2")).json() == "fresh"
    assert server.connections == 2


async def test_stale_bytes_that_come_later_are_not_the_next_answer() -> None:
    async def handler(stream: trio.SocketStream, server: Server) -> None:
        buffer = bytearray()
        first = server.connections == 1
        while await server.read_request(stream, buffer) is not None:
            await stream.send_all(answer(b'"fresh"'))
            if first:
                await trio.sleep(0.02)
                await stream.send_all(answer(b'"stale"'))

    async with serving(handler) as server, client(server, H11Transport()) as http:
        assert (await http.get("/1")).json() == "fresh"
        await trio.sleep(0.2)
        assert (await http.get("/2")).json() == "fresh"
    assert server.connections == 2


async def test_a_redirect_is_returned_not_followed() -> None:
    redirect = answer(b"{}", status=302, headers=(b"Location: http://127.0.0.1:1/elsewhere",))
    async with serving(keep_alive(redirect)) as server, client(server, H11Transport()) as http:
        response = await http.get("/")
        assert response.status_code == 302
        with pytest.raises(httpx.HTTPStatusError):
            response.raise_for_status()
    assert len(server.requests) == 1


# Hostile servers: content codings


async def test_a_gzip_bomb_stops_at_the_decoded_limit() -> None:
    bomb = gzip.compress(b"\0" * (64 * MiB), compresslevel=9)  # ~64 KiB on the wire
    async with (
        serving(keep_alive(answer(bomb, headers=(b"Content-Encoding: gzip",)))) as server,
        client(server, H11Transport(limits=SMALL)) as http,
        ticking() as ticker,
    ):
        with peak_memory() as peak, trio.fail_after(5), pytest.raises(DecodedTooLarge) as raised:
            await http.get("/")
    assert raised.value.limit == "max_decoded_bytes"
    assert isinstance(raised.value, httpx.DecodingError)
    assert ticker.ticks >= 10  # inflating yields between steps
    assert peak[0] < 8 * MiB


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        (b"gzip, gzip", gzip.compress(gzip.compress(b"{}"))),
        (b"br", b"\x1b\x00"),
        (b"gzip", b"not gzip at all"),
        (b"gzip", gzip.compress(b"{}")[:-4]),  # cut short
        (b"gzip", gzip.compress(b"{}") + gzip.compress(b"{}")),  # bytes after its end
    ],
)
async def test_a_body_that_cannot_be_decoded_is_a_decoding_error(
    encoding: bytes, body: bytes
) -> None:
    encoded = answer(body, headers=(b"Content-Encoding: " + encoding,))
    async with serving(keep_alive(encoded)) as server, client(server, H11Transport()) as http:
        with trio.fail_after(2), pytest.raises(httpx.DecodingError):
            await http.get("/")


# Limits per request, and how matrix_api sees these errors


async def test_limits_per_request_through_the_extension() -> None:
    async with (
        serving(keep_alive(answer(b"x" * 100))) as server,
        client(server, H11Transport()) as http,
    ):
        with pytest.raises(ResponseTooLarge):
            await http.get("/", extensions={LIMITS_EXTENSION: ResponseLimits(max_body_bytes=99)})
        assert len((await http.get("/")).content) == 100


def test_limits_must_be_positive_and_finite() -> None:
    for bad in ({"max_body_bytes": 0}, {"total_timeout_s": -1.0}, {"read_timeout_s": 1e999}):
        with pytest.raises(ValueError, match="positive"):
            ResponseLimits(**bad)


async def test_matrix_api_treats_a_limit_as_a_failed_request() -> None:
    endless = sends(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", then_forever=b"1\r\nx\r\n"
    )
    async with (
        serving(endless) as server,
        MatrixClient(
            f"http://127.0.0.1:{server.port}",
            access_token="t",
            transport=H11Transport(limits=ResponseLimits(max_body_bytes=4096)),
            retry_policy=RetryPolicy(max_attempts=1),
        ) as matrix,
    ):
        with trio.fail_after(5), pytest.raises(ResponseLimitExceeded) as raised:
            await matrix.whoami()
    assert raised.value.limit == "max_body_bytes"
    assert raised.value.maybe_processed
    assert "answer refused (max_body_bytes): body over 4096 bytes" in str(raised.value)


# Any byte stream at all


_PIECES = [
    b"HTTP/1.1 200 OK\r\n",
    b"HTTP/1.0 204 No Content\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"Content-Length: 5\r\n",
    b"Content-Length: 99999999999\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Content-Encoding: gzip\r\n",
    b"Content-Encoding: deflate\r\n",
    b"Connection: close\r\n",
    b"\r\n",
    b"5\r\nhello\r\n",
    b"0\r\n\r\n",
    b"fffffff\r\n",
    gzip.compress(b"hello"),
    zlib.compress(b"hello"),
]


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    stream=st.lists(
        st.one_of(st.sampled_from(_PIECES), st.binary(max_size=40)), min_size=1, max_size=12
    ),
    close=st.booleans(),
)
async def test_any_byte_stream_gives_a_response_or_a_typed_error(
    stream: list[bytes], close: bool
) -> None:
    limits = ResponseLimits(
        max_body_bytes=4096, max_decoded_bytes=4096, total_timeout_s=0.5, read_timeout_s=0.05
    )
    async with serving(sends(b"".join(stream), close=close)) as server:
        transport = H11Transport(limits=limits)
        async with client(server, transport) as http:
            with trio.fail_after(3):
                for _ in range(2):  # the second request meets what the first left
                    try:
                        response = await http.get("/", timeout=httpx.Timeout(1.0, read=0.05))
                    except (httpx.TransportError, httpx.DecodingError):
                        continue
                    assert 100 <= response.status_code <= 999
                    assert len(response.content) <= 4096
