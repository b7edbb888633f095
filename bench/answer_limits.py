"""Peak memory of the model backend under a server that never stops answering.

A loopback server sends, for ``--seconds`` at most, one of: an endless JSON body, an
endless SSE line, or endless SSE tokens with no ``[DONE]``. The model backend reads it
twice: with the default limits, and with every byte limit at its ceiling (1 GiB, about
what the bot did before it had limits: it read until the deadline). For each run it
prints what the user got, the bytes taken from the connection, the time, and the peak
of Python allocations (tracemalloc) and the process's peak RSS so far.

    python bench/answer_limits.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import structlog
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "backends"))

from bot.backend_settings.reading import MAX_BYTES_CEILING
from bot.backends.model import ModelBackend, ModelError, ModelSettings
from bot.chats import Chat
from bot.messages import IncomingMessage
from matrix_api.models import EventID, RoomID
from mini_http import HTTPRequest, Responder, serve_http

CHAT = Chat("c_bench", RoomID("!bench:example.org"), "@alice:example.org", "bench", 0)
MESSAGE = IncomingMessage(EventID("$q"), "@alice:example.org", "hello", 0)
FILLER = b"x" * 65536
TOKEN = b'data: {"choices": [{"delta": {"content": "ab "}}]}\n\n' * 500

Handler = Callable[[HTTPRequest, Responder], Awaitable[None]]


async def endless_json(request: HTTPRequest, out: Responder) -> None:
    await out.start(200, {"Content-Type": "application/json"}, chunked=True)
    await out.chunk(b'{"choices": [{"message": {"content": "')
    while True:
        await out.chunk(FILLER)


async def endless_line(request: HTTPRequest, out: Responder) -> None:
    await out.start(200, {"Content-Type": "text/event-stream"}, chunked=True)
    await out.chunk(b"data: ")
    while True:
        await out.chunk(FILLER)


async def endless_tokens(request: HTTPRequest, out: Responder) -> None:
    await out.start(200, {"Content-Type": "text/event-stream"}, chunked=True)
    while True:
        await out.chunk(TOKEN)


class Counting(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.received = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        owner = self

        class Stream(httpx.AsyncByteStream):
            async def __aiter__(self) -> AsyncIterator[bytes]:
                async for chunk in response.stream:  # type: ignore[union-attr]
                    owner.received += len(chunk)
                    yield chunk

            async def aclose(self) -> None:
                await response.aclose()

        return httpx.Response(
            response.status_code, headers=response.headers, stream=Stream(), extensions={}
        )

    async def aclose(self) -> None:
        await self.inner.aclose()


@asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, handler)
        yield f"http://127.0.0.1:{port}/v1"
        nursery.cancel_scope.cancel()


async def run(handler: Handler, stream: bool, limits: dict[str, Any], seconds: float) -> str:
    transport = Counting()
    async with server(handler) as base_url:
        settings = ModelSettings.from_mapping(
            {"base_url": base_url, "model": "m", "stream": stream, "request_timeout_s": 60} | limits
        )
        async with ModelBackend(settings, transport=transport) as backend:
            tracemalloc.start()
            started = time.perf_counter()
            outcome = "deadline"
            with trio.move_on_after(seconds):
                try:
                    answer = await backend.reply(CHAT, MESSAGE)
                    outcome = f"answer of {len(answer)} chars: ...{answer[-48:]!r}"
                except ModelError as exc:
                    outcome = f"error ({exc.kind}): {exc.user_message}"
            elapsed = time.perf_counter() - started
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return (
        f"read {transport.received / 2**20:8.1f} MiB in {elapsed:5.2f} s, "
        f"peak {peak / 2**20:8.1f} MiB (process max RSS {rss:7.0f} MiB)\n      {outcome}"
    )


async def main(seconds: float) -> None:
    unlimited = {
        "max_response_bytes": MAX_BYTES_CEILING,
        "max_line_bytes": MAX_BYTES_CEILING,
        "max_answer_chars": 10_000_000,
    }
    cases: list[tuple[str, Handler, bool]] = [
        ("endless JSON body", endless_json, False),
        ("endless SSE line", endless_line, True),
        ("endless SSE tokens, no [DONE]", endless_tokens, True),
    ]
    # The default limits first: the process's max RSS only grows.
    for label, limits in (("default limits", {}), ("limits at the ceiling", unlimited)):
        print(f"== {label}")
        for name, handler, stream in cases:
            print(f"  {name:32} {await run(handler, stream, limits, seconds)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    trio.run(main, args.seconds)
