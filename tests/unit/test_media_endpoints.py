"""Downloads through the authenticated media API (matrix_api/endpoints/media.py).

`parse_mxc` against hostile URIs; what goes on the wire (a scripted server); and, over
real loopback sockets with the default `H11Transport`, that the size and time limits
hold whatever the server says: a lying ``Content-Length``, no length at all, an
endless chunked body, a gzip bomb, a slow drip.
"""

from __future__ import annotations

import gzip

import pytest
import trio

from matrix_api import MatrixClient, NotFound, ResponseLimitExceeded, RetryPolicy
from matrix_api.endpoints.media import InvalidMxcUri, MxcUri, media_limits, parse_mxc
from matrix_api.h11_transport import LIMITS_EXTENSION, ResponseLimits
from matrix_mock import NO_RETRY, TOKEN, ScriptedServer, matrix_error, raw
from scripted_http import Server, answer, keep_alive, sends, serving

V1 = "/_matrix/client/v1"
KiB = 1024


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("mxc://example.org/abcDEF123_-", MxcUri("example.org", "abcDEF123_-")),
        ("mxc://localhost:8448/x", MxcUri("localhost:8448", "x")),
        ("mxc://1.2.3.4/x", MxcUri("1.2.3.4", "x")),
        ("mxc://[::1]:8448/x", MxcUri("[::1]:8448", "x")),
        ("mxc://[2001:db8::1]/x", MxcUri("[2001:db8::1]", "x")),
    ],
)
def test_a_valid_mxc_uri_is_read(uri: str, expected: MxcUri) -> None:
    assert parse_mxc(uri) == expected
    assert str(parse_mxc(uri)) == uri


@pytest.mark.parametrize(
    "uri",
    [
        None,
        42,
        ["mxc://example.org/x"],
        {"url": "mxc://example.org/x"},
        b"mxc://example.org/x",
        "",
        "http://example.org/x",
        "https://evil.example/_matrix/media/v3/download/example.org/x",
        "file:///etc/passwd",
        "MXC://example.org/x",
        "mxc:/example.org/x",
        "mxc://example.org",
        "mxc://example.org/",
        "mxc:///x",
        "mxc://example.org/../../../_matrix/client/v3/account/whoami",
        "mxc://example.org/..",
        "mxc://example.org/.",
        "mxc://example.org/a/b",
        "mxc://example.org/a%2Fb",
        "mxc://example.org/x?allow_redirect=true",
        "mxc://example.org/x#frag",
        "mxc://../x",
        "mxc://a..b/x",
        "mxc://.example.org/x",
        "mxc://user@example.org/x",
        "mxc://evil.example\\@example.org/x",
        "mxc://exa mple.org/x",
        "mxc://example.org:99999/x",
        "mxc://example.org:0/x",
        "mxc://example.org:/x",
        "mxc://exämple.org/x",
        "mxc://example.org/ïd",
        "mxc://example.org/x\n",
        "mxc://example.org/x\x00",
        "mxc://example.org/" + "a" * 256,
        "mxc://" + "a" * 600 + "/x",
    ],
)
def test_anything_else_is_refused_without_quoting_it(uri: object) -> None:
    with pytest.raises(InvalidMxcUri) as raised:
        parse_mxc(uri)
    if isinstance(uri, str) and len(uri) > 12:
        assert uri not in str(raised.value)


async def test_the_download_is_an_authenticated_v1_get_with_its_limits() -> None:
    png = b"\x89PNG fake bytes"
    server = ScriptedServer(raw(200, png, "image/png"))
    async with server.client(retry_policy=NO_RETRY) as client:
        with trio.fail_after(5):
            data = await client.download_media(
                MxcUri("[::1]:8448", "abc"), max_bytes=5 * 1024 * 1024, timeout_s=7.0
            )
    assert data == png
    seen = server.only
    assert seen.method == "GET"
    # Every segment percent-encoded; the v1 (authenticated) endpoint, never media/v3.
    assert seen.raw_path == f"{V1}/media/download/%5B%3A%3A1%5D%3A8448/abc"
    assert seen.authorization == f"Bearer {TOKEN}"
    assert TOKEN not in str(seen.request.url)
    assert seen.params == {"timeout_ms": "0"}
    limits = seen.request.extensions[LIMITS_EXTENSION]
    assert isinstance(limits, ResponseLimits)
    assert limits.max_body_bytes == limits.max_decoded_bytes == 5 * 1024 * 1024
    assert limits.total_timeout_s == 7.0


async def test_unknown_media_is_not_found() -> None:
    server = ScriptedServer(matrix_error(404, "M_NOT_FOUND"))
    async with server.client() as client:
        with trio.fail_after(5), pytest.raises(NotFound):
            await client.download_media(MxcUri("example.org", "x"), max_bytes=KiB, timeout_s=5)
    assert len(server.seen) == 1


def test_limits_must_be_positive() -> None:
    assert media_limits(10, 1.0).max_body_bytes == 64 * KiB  # room for an error answer
    for size, seconds in [(0, 1.0), (-1, 1.0), (10, 0.0), (10, float("nan"))]:
        with pytest.raises(Exception, match="positive"):
            media_limits(size, seconds)


# -- the real transport: limits hold whatever the server claims ---------------------------


def real_client(server: Server) -> MatrixClient:
    return MatrixClient(
        f"http://127.0.0.1:{server.port}",
        access_token=TOKEN,
        retry_policy=RetryPolicy(max_attempts=3),
    )


MB = 1024 * 1024
OVER = 2 * MB


@pytest.mark.parametrize(
    ("head", "forever"),
    [
        # The header says 10 bytes: the connection then carries more (the rest is the
        # next answer to h11, never this body).
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10000000000\r\n\r\n", b"x"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2097153\r\n\r\n", b"y"),
        (b"HTTP/1.1 200 OK\r\n\r\n", b"z" * 4096),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"4000\r\n" + b"x" * 0x4000 + b"\r\n",
        ),
    ],
    ids=["ten-gigabytes-claimed", "one-byte-over", "until-close", "endless-chunked"],
)
async def test_a_download_past_the_size_limit_is_stopped_and_not_retried(
    head: bytes, forever: bytes
) -> None:
    async with serving(sends(head, then_forever=forever)) as server, real_client(server) as client:
        with trio.fail_after(10), pytest.raises(ResponseLimitExceeded) as raised:
            await client.download_media(MxcUri("example.org", "x"), max_bytes=OVER, timeout_s=5)
    assert raised.value.limit == "max_body_bytes"
    assert server.connections == 1  # a retry would download as much again


async def test_a_content_length_smaller_than_the_body_gives_only_that_many_bytes() -> None:
    # A lying length the other way: what follows it is not part of this answer.
    async with (
        serving(
            sends(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nabcdEXTRA" + b"e" * 9999)
        ) as server,
        real_client(server) as client,
    ):
        with trio.fail_after(5):
            data = await client.download_media(MxcUri("e.org", "x"), max_bytes=OVER, timeout_s=5)
    assert data == b"abcd"


async def test_a_gzip_bomb_stops_at_the_limit_once_inflated() -> None:
    bomb = gzip.compress(b"\0" * (64 * MB))
    assert len(bomb) < OVER
    async with (
        serving(keep_alive(answer(bomb, headers=(b"Content-Encoding: gzip",)))) as server,
        real_client(server) as client,
    ):
        with trio.fail_after(10), pytest.raises(ResponseLimitExceeded) as raised:
            await client.download_media(MxcUri("e.org", "x"), max_bytes=OVER, timeout_s=5)
    assert raised.value.limit == "max_decoded_bytes"


async def test_a_slow_drip_stops_at_the_time_limit() -> None:
    async def drip(stream: trio.SocketStream, server: Server) -> None:
        await server.read_request(stream, bytearray())
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(1000):
            await stream.send_all(b"x")
            await trio.sleep(0.05)

    async with serving(drip) as server, real_client(server) as client:
        started = trio.current_time()
        with trio.fail_after(10), pytest.raises(ResponseLimitExceeded) as raised:
            await client.download_media(MxcUri("e.org", "x"), max_bytes=OVER, timeout_s=1.0)
    assert raised.value.limit == "total_timeout_s"
    assert trio.current_time() - started < 5


async def test_a_download_within_its_limits_is_whole() -> None:
    body = bytes(range(256)) * 4096  # 1 MiB
    async with serving(keep_alive(answer(body))) as server, real_client(server) as client:
        with trio.fail_after(10):
            data = await client.download_media(MxcUri("e.org", "x"), max_bytes=MB, timeout_s=5)
    assert data == body
    request = server.requests[0]
    assert request.startswith(b"GET /_matrix/client/v1/media/download/e.org/x?timeout_ms=0 ")
    assert f"Bearer {TOKEN}".encode() in request
