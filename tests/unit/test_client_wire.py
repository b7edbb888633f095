"""`MatrixClient` over its default transport against a scripted server on 127.0.0.1:
what reaches the wire, and which `matrix_api` error each failure becomes."""

from __future__ import annotations

import gzip
import zlib

import httpx
import pytest
import trio

from matrix_api import (
    BadResponse,
    InvalidRequest,
    LimitExceeded,
    MatrixClient,
    NetworkError,
    ResponseLimitExceeded,
    ResponseLimits,
    RetryPolicy,
)
from matrix_api.http import DEFAULT_LIMITS
from matrix_api.models import RoomID, SyncToken
from scripted_http import Server, answer, keep_alive, sends, serving

ONCE = RetryPolicy(max_attempts=1)
WHOAMI = b'{"user_id": "@bot:example.org", "device_id": "D"}'


def matrix(server: Server, **kwargs: object) -> MatrixClient:
    return MatrixClient(
        f"http://127.0.0.1:{server.port}",
        access_token="t",
        retry_policy=ONCE,
        **kwargs,  # type: ignore[arg-type]
    )


async def test_what_reaches_the_wire() -> None:
    limited = answer(
        b'{"errcode": "M_LIMIT_EXCEEDED", "retry_after_ms": 9000}',
        status=429,
        headers=(b"Retry-After: 2",),
    )
    async with (
        serving(keep_alive(answer(WHOAMI), limited)) as server,
        MatrixClient(
            f"http://127.0.0.1:{server.port}/behind/a/prefix/",
            access_token="secret-token",
            retry_policy=ONCE,
        ) as client,
    ):
        who = await client.whoami()
        with pytest.raises(LimitExceeded) as raised:
            await client.sync(since=SyncToken("s 1&x"))
    assert who.user_id == "@bot:example.org"
    assert raised.value.retry_after == 2.0  # the header wins over the body
    first, second = server.requests
    lines = first.lower().split(b"\r\n")
    assert lines[0] == b"get /behind/a/prefix/_matrix/client/v3/account/whoami http/1.1"
    assert f"host: 127.0.0.1:{server.port}".encode() in lines
    assert b"authorization: bearer secret-token" in lines
    assert b"accept-encoding: gzip, deflate" in lines
    # No cookie, no client default headers beyond ours.
    assert sorted(line.split(b":")[0] for line in lines[1:] if line) == [
        b"accept",
        b"accept-encoding",
        b"authorization",
        b"host",
        b"user-agent",
    ]
    assert second.startswith(
        b"GET /behind/a/prefix/_matrix/client/v3/sync?timeout=0&since=s%201%26x "
    )
    assert server.connections == 1


async def test_only_a_get_asks_for_a_compressed_answer() -> None:
    async with (
        serving(keep_alive(answer(b'{"event_id": "$e"}'))) as server,
        matrix(server) as client,
    ):
        await client.send_event(RoomID("!r:example.org"), "m.room.message", {"body": "hi"}, "txn1")
    (put,) = server.requests
    assert put.startswith(b"PUT /_matrix/client/v3/rooms/%21r%3Aexample.org/send/")
    assert b"accept-encoding" not in put.lower()
    assert put.endswith(b'\r\n\r\n{"body":"hi"}')


async def test_a_cookie_is_never_sent_back() -> None:
    with_cookie = answer(WHOAMI, headers=(b"Set-Cookie: session=abc; Path=/",))
    async with serving(keep_alive(with_cookie)) as server, matrix(server) as client:
        await client.whoami()
        await client.whoami()
    assert all(b"cookie" not in request.lower() for request in server.requests)


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        (b"gzip", gzip.compress(WHOAMI)),
        (b"deflate", zlib.compress(WHOAMI)),
        (b"deflate", zlib.compress(WHOAMI, wbits=-zlib.MAX_WBITS)),
        (b"identity", WHOAMI),
        (b"gzip, identity", gzip.compress(WHOAMI)),
    ],
)
async def test_content_encodings_are_undone(encoding: bytes, body: bytes) -> None:
    response = answer(body, headers=(b"Content-Encoding: " + encoding,))
    async with serving(keep_alive(response)) as server, matrix(server) as client:
        assert (await client.whoami()).device_id == "D"


@pytest.mark.parametrize(
    ("encoding", "body"),
    [(b"gzip", b"not gzip at all"), (b"br", b"\x1b\x00"), (b"gzip, gzip", b"")],
)
async def test_a_body_that_does_not_match_its_encoding_is_a_network_error(
    encoding: bytes, body: bytes
) -> None:
    response = answer(body, headers=(b"Content-Encoding: " + encoding,))
    async with serving(keep_alive(response)) as server, matrix(server) as client:
        with pytest.raises(NetworkError, match="DecodingError"):
            await client.whoami()


async def test_a_refused_connection_was_certainly_not_processed() -> None:
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with MatrixClient(f"http://127.0.0.1:{port}", access_token="t", retry_policy=ONCE) as c:
        with pytest.raises(NetworkError) as raised:
            await c.whoami()
    assert not raised.value.maybe_processed
    assert "could not connect" in str(raised.value)


async def test_a_silent_server_is_a_read_timeout_limit() -> None:
    async def silent(stream: trio.SocketStream, server: Server) -> None:
        await server.read_request(stream, bytearray())
        await trio.sleep_forever()

    async with (
        serving(silent) as server,
        matrix(server, timeout=httpx.Timeout(5.0, read=0.2)) as client,
    ):
        with trio.fail_after(5), pytest.raises(ResponseLimitExceeded) as raised:
            await client.whoami()
    assert raised.value.limit == "read_timeout_s"
    assert raised.value.maybe_processed


async def test_a_reset_mid_response_may_have_been_processed() -> None:
    cut = sends(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"trunc', close=True)
    async with serving(cut) as server, matrix(server) as client:
        with pytest.raises(NetworkError) as raised:
            await client.whoami()
    assert raised.value.maybe_processed


@pytest.mark.parametrize(
    "garbage",
    [
        b"SMTP ready\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: lots\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunkedx\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
async def test_a_malformed_answer_is_a_network_error(garbage: bytes) -> None:
    async with serving(sends(garbage, close=True)) as server, matrix(server) as client:
        with pytest.raises(NetworkError, match="RemoteProtocolError"):
            await client.whoami()


async def test_a_redirect_is_an_error_with_its_status_and_not_followed() -> None:
    redirect = answer(b"{}", status=302, headers=(b"Location: http://elsewhere.example/",))
    async with serving(keep_alive(redirect)) as server, matrix(server) as client:
        with pytest.raises(BadResponse) as raised:
            await client.whoami()
    assert raised.value.status == 302
    assert "http://elsewhere.example/" in str(raised.value)
    assert len(server.requests) == 1


async def test_a_header_with_crlf_is_an_invalid_request_and_nothing_is_sent() -> None:
    async with serving(keep_alive(answer(WHOAMI))) as server, matrix(server) as client:
        client.set_access_token("secret\r\nX-Injected: yes")
        with pytest.raises(InvalidRequest) as raised:
            await client.whoami()
    assert server.requests == []
    assert "Illegal header value" in str(raised.value)
    assert "secret" not in str(raised.value)
    assert "secret" not in str(raised.value.__cause__)


async def test_a_large_answer_is_refused_before_its_body_except_where_answers_are_large() -> None:
    over = DEFAULT_LIMITS.max_body_bytes + 1
    padded_sync = b'{"next_batch": "s1"' + b" " * over + b"}"
    huge_whoami = f"HTTP/1.1 200 OK\r\nContent-Length: {over}\r\n\r\n".encode()
    async with (
        serving(sends(huge_whoami)) as refusing,
        serving(keep_alive(answer(padded_sync))) as syncing,
        matrix(refusing) as to_refusing,
        matrix(syncing) as to_syncing,
    ):
        with trio.fail_after(5), pytest.raises(ResponseLimitExceeded) as raised:
            await to_refusing.whoami()
        with trio.fail_after(20):
            synced = await to_syncing.sync()
    assert raised.value.limit == "max_body_bytes"
    assert synced.next_batch == "s1"


async def test_a_gzip_bomb_stops_at_the_clients_decoded_limit() -> None:
    bomb = gzip.compress(b"{" + b" " * (64 * 1024 * 1024))
    response = answer(bomb, headers=(b"Content-Encoding: gzip",))
    limits = ResponseLimits(max_decoded_bytes=1024 * 1024)
    async with serving(keep_alive(response)) as server, matrix(server, limits=limits) as client:
        with trio.fail_after(10), pytest.raises(ResponseLimitExceeded) as raised:
            await client.whoami()
    assert raised.value.limit == "max_decoded_bytes"


async def test_an_idempotent_request_is_retried_after_a_limit() -> None:
    endless = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1\r\nx\r\n" * 5000
    answers = iter([endless, answer(WHOAMI)])

    async def flaky(stream: trio.SocketStream, server: Server) -> None:
        await server.read_request(stream, bytearray())
        await stream.send_all(next(answers))
        await trio.sleep_forever()

    async with (
        serving(flaky) as server,
        MatrixClient(
            f"http://127.0.0.1:{server.port}",
            access_token="t",
            limits=ResponseLimits(max_body_bytes=1024),
            retry_policy=RetryPolicy(max_attempts=2, base_delay=0.01),
        ) as client,
    ):
        with trio.fail_after(10):
            assert (await client.whoami()).device_id == "D"
    assert len(server.requests) == 2
