"""Requests per second and client CPU per request, for each way of doing HTTP/1.1.

A small trio server in its own process (``--serve``) answers every request on
127.0.0.1 with the same JSON body, keeping connections alive. In this process, one
after another and in rounds, each client sends ``--requests`` GETs over one
keep-alive connection (``--concurrency`` tasks at once) and decodes the body:

* ``matrix_client``: `MatrixClient.whoami`, the bot's path: `HTTPCore` builds the
  `httpx.Request`, `httpx.AsyncClient.send` sends it over `H11Transport`;
* ``httpx/h11``: `httpx.AsyncClient.get` over `H11Transport` (h11 framing, limits),
  with the client's URL merging and default headers;
* ``transport/h11``: `H11Transport.handle_async_request` alone, on a request built
  once (the floor under both);
* ``httpx/default``: `httpx.AsyncClient` with its default transport (httpcore over
  anyio), skipped if it does not run under trio.

To compare with an older commit, run that commit's copy of this file in the same
session (``git worktree add``): its ``matrix_client`` row is the path of its day.

CPU is this process's (``time.process_time``), so the server's work is not in it.
On a small shared machine the figures move by a tenth from run to run: compare
within one run.

    python bench/http_transport.py [--requests 3000] [--rounds 3] [--concurrency 1]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

import httpx
import msgspec
import trio

from matrix_api import MatrixClient
from matrix_api.h11_transport import H11Transport

BODY = b'{"user_id": "@bench:example.org", "device_id": "BENCH"}'
ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(BODY)).encode()
    + b"\r\n\r\n"
    + BODY
)


async def serve() -> None:
    """Answer every request head (GETs only: no body) with ``ANSWER``; print the port."""

    async def connection(stream: trio.SocketStream) -> None:
        buffer = b""
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
                count = buffer.count(b"\r\n\r\n")
                if count:
                    buffer = buffer[buffer.rindex(b"\r\n\r\n") + 4 :]
                    await stream.send_all(ANSWER * count)
        except trio.BrokenResourceError:
            return

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(listeners[0].socket.getsockname()[1], flush=True)
    await trio.serve_listeners(connection, listeners)


Send = Callable[[], Awaitable[object]]

_decoder = msgspec.json.Decoder(dict[str, str])


def httpx_get(client: httpx.AsyncClient) -> Send:
    async def send() -> object:
        response = await client.get("/_matrix/client/v3/account/whoami")
        response.raise_for_status()
        return _decoder.decode(response.content)

    return send


def transport_only(transport: H11Transport, base: str, headers: dict[str, str]) -> Send:
    request = httpx.Request("GET", base + "/_matrix/client/v3/account/whoami", headers=headers)

    async def send() -> object:
        response = await transport.handle_async_request(request)
        return _decoder.decode(await response.aread())

    return send


async def make_clients(stack: AsyncExitStack, base: str) -> dict[str, Send]:
    clients: dict[str, Send] = {}
    matrix = await stack.enter_async_context(MatrixClient(base, access_token="bench"))
    clients["matrix_client"] = matrix.whoami
    headers = {"Authorization": "Bearer bench"}
    client = httpx.AsyncClient(transport=H11Transport(), base_url=base, headers=headers)
    clients["httpx/h11"] = httpx_get(await stack.enter_async_context(client))
    clients["transport/h11"] = transport_only(
        await stack.enter_async_context(H11Transport()), base, headers
    )
    default = await stack.enter_async_context(httpx.AsyncClient(base_url=base, headers=headers))
    try:
        await httpx_get(default)()
    except Exception as exc:  # noqa: BLE001 - any failure means "does not run here"
        print(f"httpx/default: skipped ({type(exc).__name__}: {exc})")
    else:
        clients["httpx/default"] = httpx_get(default)
    return clients


async def run(send: Send, requests: int, concurrency: int) -> tuple[float, float]:
    """Wall seconds and CPU seconds for ``requests`` requests."""
    per_task = requests // concurrency

    async def worker() -> None:
        for _ in range(per_task):
            await send()

    wall, cpu = time.perf_counter(), time.process_time()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return time.perf_counter() - wall, time.process_time() - cpu


async def bench(port: int, requests: int, rounds: int, concurrency: int) -> None:
    base = f"http://127.0.0.1:{port}"
    async with AsyncExitStack() as stack:
        clients = await make_clients(stack, base)
        for send in clients.values():  # warm up: connections open, code paths hot
            await run(send, 200, 1)
        figures: dict[str, list[tuple[float, float]]] = {name: [] for name in clients}
        for _ in range(rounds):
            for name, send in clients.items():
                figures[name].append(await run(send, requests, concurrency))
    n = requests // concurrency * concurrency
    print(
        f"{n} GETs per round, {rounds} rounds, concurrency {concurrency}, "
        f"{len(BODY)}-byte JSON body; medians"
    )
    print(f"{'client':<22}{'requests/s':>12}{'CPU ms/request':>16}")
    for name, rows in figures.items():
        wall = statistics.median(row[0] for row in rows)
        cpu = statistics.median(row[1] for row in rows)
        print(f"{name:<22}{n / wall:>12.0f}{cpu / n * 1000:>16.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        trio.run(serve)
        return
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        trio.run(bench, port, args.requests, args.rounds, args.concurrency)
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
