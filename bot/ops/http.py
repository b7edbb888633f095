"""The operators' listener: a small ASGI app served by hypercorn's trio worker.

    GET /readyz   200 once the bot takes messages, 503 before (and while stopping)
    GET /healthz  200 while the sync loop and the store work, 503 with the reason
    GET /metrics  Prometheus text format

Anything else is 404, another method on these paths 405. The HTTP itself (parsing,
limits on headers and bodies, keep-alive, timeouts, graceful shutdown) is hypercorn's:
a well-kept server, not ours to get wrong. It runs in the runtime's nursery and stops
when its shutdown trigger fires (`serve_ops`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from functools import partial
from typing import Any

import structlog
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from prometheus_client import generate_latest

from .health import OpsFacts, Verdict, health, readiness
from .metrics import BotMetrics

__all__ = ["OpsApp", "ops_config", "serve_ops"]

log = structlog.get_logger("bot.ops")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_JSON = b"application/json"
# The classic text format: what every Prometheus server reads (the names here need no
# escaping, so `generate_latest`'s output is the same in both versions).
_METRICS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
_ENDPOINTS = ("/readyz", "/healthz", "/metrics")
# How long requests in flight get to finish once the listener is asked to stop.
GRACEFUL_S = 2.0


class OpsApp:
    """The ASGI application; owns nothing but references to the runtime's facts."""

    def __init__(self, facts: OpsFacts, metrics: BotMetrics) -> None:
        self._facts = facts
        self._metrics = metrics
        self._counted = {
            (endpoint, status): metrics.ops_requests.labels(endpoint, str(status))
            for endpoint in (*_ENDPOINTS, "other")
            for status in (200, 404, 405, 503)
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "http":
            await self._http(scope, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})

    @staticmethod
    async def _lifespan(receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, send: Send) -> None:
        path = scope.get("path")
        endpoint = path if path in _ENDPOINTS else "other"
        headers: list[tuple[bytes, bytes]] = []
        if endpoint == "other":
            status, body, content_type = 404, b'{"error": "not found"}', _JSON
        elif scope.get("method") != "GET":
            status, body, content_type = 405, b'{"error": "method not allowed"}', _JSON
            headers.append((b"allow", b"GET"))
        elif endpoint == "/metrics":
            status, body = 200, generate_latest(self._metrics.registry)
            content_type = _METRICS_TYPE
        else:
            verdict = readiness(self._facts) if endpoint == "/readyz" else health(self._facts)
            status, body, content_type = _json_answer(verdict)
        self._counted[endpoint, status].inc()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", content_type),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store"),
                    *headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _json_answer(verdict: Verdict) -> tuple[int, bytes, bytes]:
    body = json.dumps(verdict.body, separators=(",", ":")).encode() + b"\n"
    return (200 if verdict.ok else 503), body, _JSON


def _first_leaf(group: BaseExceptionGroup[OSError]) -> OSError:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def ops_config(host: str, port: int) -> Config:
    """Hypercorn's settings for the listener: HTTP/1.1 and h2c on one loopback-minded
    socket, short timeouts, no access log (the scraper calls every few seconds)."""
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    # Through the standard logging the bot's structlog set-up renders (`bot.logging`).
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = GRACEFUL_S
    config.keep_alive_timeout = 5.0
    config.read_timeout = 10
    config.include_server_header = False
    return config


async def serve_ops(
    app: OpsApp,
    host: str,
    port: int,
    *,
    shutdown: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``host:port`` until ``shutdown`` returns, then stop gracefully
    (requests in flight get `GRACEFUL_S`).

    Reports started, with the bound addresses (``http://127.0.0.1:9464``; the real
    port when ``port`` is 0), once the socket listens. Raises `OSError` when it
    cannot listen (the address in use, not an address of this machine).
    """
    await serve(
        app,  # type: ignore[arg-type]  # hypercorn's ASGI types are TypedDicts
        ops_config(host, port),
        shutdown_trigger=shutdown,
        task_status=task_status,
        mode="asgi",
    )


async def start_ops(
    nursery: trio.Nursery,
    app: OpsApp,
    address: tuple[str, int],
    shutdown: Callable[[], Awaitable[None]],
) -> list[str]:
    """Start `serve_ops` in ``nursery``; the bound addresses.

    Raises `OSError` (bare, not in hypercorn's exception groups) when it cannot listen.
    """
    host, port = address
    try:
        binds: list[str] = await nursery.start(
            partial(serve_ops, app, host, port, shutdown=shutdown)
        )
    except BaseExceptionGroup as group:
        cannot_listen, other = group.split(OSError)
        if cannot_listen is None or other is not None:
            raise
        raise _first_leaf(cannot_listen) from group
    log.info("ops_listening", addresses=binds)
    return binds
