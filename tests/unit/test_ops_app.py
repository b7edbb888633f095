"""`bot.ops.http`: the operators' listener, as an ASGI app and served by hypercorn on a
loopback port (real sockets, real clock, every wait bounded): the three endpoints, 404 for
any other path, 405 for any other method, and hostile clients (huge or malformed requests,
a client that never finishes) handled by hypercorn without harm to the next request."""

from __future__ import annotations

import contextlib
import gc
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from bot.ops.health import OpsFacts
from bot.ops.http import OpsApp, start_ops
from bot.ops.metrics import BotMetrics

# Real seconds any one step of these tests may take before it fails.
STEP_S = 10.0


def make_app() -> tuple[OpsApp, OpsFacts, BotMetrics, list[str]]:
    phase = ["reconciling"]
    facts = OpsFacts(ready=trio.Event(), phase=lambda: phase[0], long_poll_s=30.0)
    facts.started_at = trio.current_time()
    metrics = BotMetrics()
    return OpsApp(facts, metrics), facts, metrics, phase


async def call(app: OpsApp, method: str, path: str) -> tuple[int, dict[bytes, bytes], bytes]:
    """One request through the ASGI interface, as a server would make it."""
    sent: list[dict[str, Any]] = []
    scope = {"type": "http", "method": method, "path": path, "headers": [], "query_string": b""}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start, body = sent
    return start["status"], dict(start["headers"]), body["body"]


async def test_each_endpoint_answers_and_everything_else_is_404_or_405() -> None:
    app, *_ = make_app()
    status, headers, body = await call(app, "GET", "/readyz")
    assert status == 503
    assert headers[b"content-type"] == b"application/json"
    assert json.loads(body)["phase"] == "reconciling"
    status, _, body = await call(app, "GET", "/healthz")
    assert status == 200
    assert json.loads(body)["healthy"] is True
    status, headers, body = await call(app, "GET", "/metrics")
    assert status == 200
    assert headers[b"content-type"].startswith(b"text/plain; version=0.0.4")
    assert any(
        f.name == "surfaces_build_info" for f in text_string_to_metric_families(body.decode())
    )

    for path in ["/", "/readyz/", "/Readyz", "/metrics/x", "/rooms/!a:b", "//metrics", ""]:
        status, _, _ = await call(app, "GET", path)
        assert status == 404, path
    for method in ["POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE", "get"]:
        status, headers, _ = await call(app, method, "/metrics")
        assert status == 405, method
        assert headers[b"allow"] == b"GET"
    # Unknown paths are counted under one label, never by their raw path.
    text = (await call(app, "GET", "/metrics"))[2].decode()
    assert 'surfaces_ops_requests_total{endpoint="other",status="404"} 7.0' in text
    assert 'surfaces_ops_requests_total{endpoint="/metrics",status="405"} 8.0' in text
    assert "rooms" not in text


async def test_lifespan_and_websocket_scopes_are_answered() -> None:
    app, *_ = make_app()
    inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return inbox.pop(0)

    async def send(message: Any) -> None:
        sent.append(message)

    await app({"type": "lifespan"}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    sent.clear()
    await app({"type": "websocket", "path": "/metrics"}, receive, send)
    assert sent == [{"type": "websocket.close", "code": 1008}]


@asynccontextmanager
async def serving(app: OpsApp) -> AsyncIterator[tuple[str, int]]:
    """``app`` on a loopback port chosen by the system; stopped (and awaited) at the end."""
    stop, stopped = trio.Event(), trio.Event()

    async def listen(*, task_status: trio.TaskStatus[list[str]]) -> None:
        async with trio.open_nursery() as inner:
            task_status.started(await start_ops(inner, app, ("127.0.0.1", 0), stop.wait))
        stopped.set()

    async with trio.open_nursery() as nursery:
        with trio.fail_after(STEP_S):
            (bound,) = await nursery.start(listen)
        host, _, port = bound.removeprefix("http://").rpartition(":")
        yield host, int(port)
        stop.set()
        with trio.fail_after(STEP_S):
            # The listener stops by itself once asked: nothing is cancelled from here.
            await stopped.wait()


async def raw_exchange(host: str, port: int, data: bytes) -> bytes:
    """Send ``data`` on a new connection and read until the server closes it or stops
    sending (then what came so far)."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(data)  # the server may close while we still send
        received = b""
        with trio.move_on_after(3):
            try:
                while chunk := await stream.receive_some(65536):
                    received += chunk
            except trio.BrokenResourceError:
                pass
        return received


async def test_served_by_hypercorn_on_loopback() -> None:
    app, facts, _, phase = make_app()
    async with serving(app) as (host, port), httpx.AsyncClient() as http:
        base = f"http://{host}:{port}"
        with trio.fail_after(STEP_S):
            assert (await http.get(f"{base}/readyz")).status_code == 503
            facts.ready.set()
            facts.lanes_started = facts.sync_started = True
            phase[0] = "ready"
            facts.taking_messages()
            ready = await http.get(f"{base}/readyz")
            assert ready.status_code == 200
            assert ready.json()["ready"] is True
            assert (await http.get(f"{base}/healthz")).status_code == 200
            metrics = await http.get(f"{base}/metrics?name[]=x")  # a query changes nothing
            assert metrics.status_code == 200
            families = {f.name for f in text_string_to_metric_families(metrics.text)}
            assert {"surfaces_messages_handled", "surfaces_build_info"} <= families
            assert (await http.get(f"{base}/nope")).status_code == 404
            assert (await http.get(f"{base}/%2e%2e/metrics")).status_code == 404
            assert (await http.delete(f"{base}/readyz")).status_code == 405


async def test_hostile_clients_do_no_harm() -> None:
    app, *_ = make_app()
    async with serving(app) as (host, port), httpx.AsyncClient() as http:
        base = f"http://{host}:{port}"
        with trio.fail_after(STEP_S * 3):
            # A 20 MB body on a GET-only endpoint: refused, never read into the app.
            big = await raw_exchange(
                host,
                port,
                b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 20000000\r\n\r\n"
                + b"x" * 20_000_000,
            )
            assert big.startswith(b"HTTP/1.1 405"), big[:80]
            # Not HTTP at all, a header line of 1 MB, a broken request line, a lie about
            # the body's length: hypercorn answers 400-something or hangs up.
            for junk in [
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 500,  # a TLS hello
                b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n",
                b"GET /me trics HTTP/1.1\r\nHost: x\r\n\r\n",
                b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
                b"GET /metrics HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"\r\n" * 10_000,
            ]:
                answer = await raw_exchange(host, port, junk)
                assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:80]
                assert b"surfaces_" not in answer
            # A client that never finishes its request holds only its own connection.
            async with await trio.open_tcp_stream(host, port) as slow:
                await slow.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                for _ in range(3):
                    assert (await http.get(f"{base}/healthz")).status_code == 200
    # ... and the listener stopped (in `serving`) with it still open.


# hypercorn's Config.create_sockets leaves the socket it failed to bind for the garbage
# collector (hypercorn 0.18): the bot stops right after, so only the warning is filtered.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_port_in_use_is_an_os_error_at_start() -> None:
    app, *_ = make_app()
    async with serving(app) as (host, port):
        with trio.fail_after(STEP_S):
            async with trio.open_nursery() as nursery:
                with pytest.raises(OSError, match="in use"):
                    await start_ops(nursery, app, (host, port), trio.sleep_forever)
    gc.collect()  # the leaked socket's warning here, not in whichever test runs next
