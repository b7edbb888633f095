"""Encrypted rooms next to plain ones: the bot's CPU per echoed message, and its start-up.

Issue 19's goals: CPU per encrypted echoed message at most 2x plain, and start-up
requests with 300 encrypted rooms independent of the room count. One run, one
throwaway Synapse, two bot users (each ``python -m bot run``, echo backend, its
own process) and one person:

* ``plain`` bot: ``--rooms`` managed chats (as ``bot_runtime.py`` makes them);
* ``encrypted`` bot: as many, each with ``m.room.encryption`` (Megolm, default
  rotation) set before the bot ever syncs.

Start-up: process spawn to ``bot_ready``: wall time, the bot's CPU and peak RSS
(VmHWM) from /proc, ``startup_requests`` from the ``bot_ready`` line, and the
same requests counted by endpoint from Synapse's access log (the bot does not log
them). With 10 rooms and with ``--rooms``, each on an empty store (a new device,
as a first start: keys uploaded), then a restart on the ``--rooms`` store.

Echo: per bot and round (``--rounds``, plain then encrypted), a restart on its
store, one warm-up message per room (its requests are printed per room: the
restarted bot's first answer in each room; in round 1 also the first room keys
either way), then ``--messages`` messages across ``--echo-rooms`` rooms at once,
one sender per room (`burst.ReplyClock`, the same bodies for both kinds). The
bot's CPU (/proc) while they are answered, reply latency p50/p95 (send request to
the sync that brought the reply) and its requests per message by endpoint. The
person is Python: the bot's own crypto (`bot.e2ee.crypto.BotCrypto`, on a store
of its own) encrypts the whole burst before it starts, so its encryption does not
pace the sends; in the encrypted rooms only ``m.room.encrypted`` replies count, so
a reply in the clear would never arrive. ``--profile LINES`` runs the echo bots
under cProfile and prints their busiest functions (CPU figures are then inflated).

Figures only: nothing here asserts a speed. Bot, Synapse and this process share
the machine's cores: compare the two kinds within one run.

    .nox/tests/bin/python bench/e2ee.py                              # quick, ~2 min
    .nox/tests/bin/python bench/e2ee.py --messages 500 --rooms 300   # full, ~7 min
    .nox/tests/bin/python bench/e2ee.py --rooms 12 --messages 500 --profile 30
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import pstats
import re
import secrets
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import trio
from bot_runtime import BotProcess, cpu_seconds, make_managed_rooms
from burst import ReplyClock, _alive, _log_tail, _percentile, _reply_filter, _stop, _user_client

from bot.e2ee.crypto import BotCrypto
from bot.store import Store
from matrix_api import MatrixClient, new_txn_id
from matrix_api.models import RoomID, SyncToken
from matrix_api.testing.synapse import RegisteredUser, SynapseServer

KINDS = ("plain", "encrypted")
MEGOLM = {"algorithm": "m.megolm.v1.aes-sha2"}
SMALL = 10  # rooms in the small start-up case
BURST_TIMEOUT_S = 300


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return math.nan


# ---------------------------------------------------------------------------------------------
# Requests by endpoint, from Synapse's access log

_ACCESS = re.compile(
    r' - \{(?P<who>[^}]*)\} Processed request: .*"(?P<method>[A-Z]+) (?P<path>\S+) '
)
_WORD = re.compile(r"[a-z][a-zA-Z_]*|v\d+|r0")  # not ids: hex, "!room:hs", "m.room.x"


def endpoint(method: str, path: str) -> str:
    """``PUT /rooms/*/send/*/*``: ids, event types and transaction ids as ``*``."""
    path = path.split("?", 1)[0].removeprefix("/_matrix/client")
    return f"{method} " + "/".join(
        s if not s or _WORD.fullmatch(s) else "*" for s in path.split("/")
    )


class AccessLog:
    """Requests a user made, counted by endpoint, between two `mark`s of Synapse's log
    (a line is written when its request completes)."""

    def __init__(self, hs: SynapseServer) -> None:
        self._path = hs.log_path

    def mark(self) -> int:
        return self._path.stat().st_size

    def count(self, user_id: str, start: int, end: int | None = None) -> Counter[str]:
        with self._path.open("rb") as log:
            log.seek(start)
            text = log.read(None if end is None else end - start).decode(errors="replace")
        counts: Counter[str] = Counter()
        for line in text.splitlines():
            match = _ACCESS.search(line)
            if match and match["who"].split("|")[0] == user_id:
                counts[endpoint(match["method"], match["path"])] += 1
        return counts


# ---------------------------------------------------------------------------------------------
# Rooms and devices


async def make_rooms(
    hs: SynapseServer, bot: RegisteredUser, user: RegisteredUser, count: int, *, encrypted: bool
) -> list[RoomID]:
    """`bot_runtime.make_managed_rooms`, then (``encrypted``) Megolm turned on by the user."""
    rooms = await make_managed_rooms(hs, bot, user, count)
    if encrypted:
        async with MatrixClient(
            hs.base_url, access_token=user.access_token, user_id=user.user_id
        ) as alice:
            limiter = trio.CapacityLimiter(8)

            async def encrypt(room: RoomID) -> None:
                async with limiter:
                    await alice.put_state_event(room, "m.room.encryption", MEGOLM)

            async with trio.open_nursery() as nursery:
                for room in rooms:
                    nursery.start_soon(encrypt, room)
    return rooms


async def new_device(hs: SynapseServer, bot: RegisteredUser) -> RegisteredUser:
    """The bot user on a new device: an empty store must not meet keys the server
    already holds for its device (the bot would refuse them as a lost store)."""
    async with MatrixClient(hs.base_url) as client:
        login = await client.login_password(bot.user_id, bot.password)
    return dataclasses.replace(bot, access_token=login.access_token, device_id=login.device_id)


@contextlib.asynccontextmanager
async def person_crypto(
    client: MatrixClient, user: RegisteredUser, store_path: Path
) -> AsyncIterator[BotCrypto]:
    """The person's device crypto (the bot's own class, on a store of its own), its
    keys and one-time keys uploaded so the bot can share its room keys with it."""
    store = await Store.open(store_path, user.user_id)
    try:
        crypto = await BotCrypto.open(
            client, store, device_id=user.device_id, pickle_key=secrets.token_bytes(32)
        )
        await crypto.send_outgoing()  # device keys
        # The server's one-time key count, which the machine tops up from.
        first = await client.sync(
            timeout_ms=secrets.randbelow(1000), filter={"room": {"rooms": []}}
        )
        batch = crypto.take_sync(first)
        await store.apply_crypto(batch.rows)
        crypto.batch_committed(batch)
        await crypto.send_outgoing()
        yield crypto
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()


# ---------------------------------------------------------------------------------------------
# Start-up


@dataclass
class Start:
    wall_s: float
    cpu_s: float
    peak_mb: float
    requests: int
    chats: int
    endpoints: Counter[str]
    crypto: str  # the bot's e2ee log line: created / restored / missing


def _crypto_state(process: BotProcess) -> str:
    text = process.log_path.read_text(errors="replace")
    for event, state in (("e2ee_created", "created"), ("e2ee_restored", "restored")):
        if f'"{event}"' in text:
            return state
    return "NONE"


async def measure_start(
    hs: SynapseServer, log: AccessLog, bot: RegisteredUser, store: Path, command: list[str]
) -> Start:
    mark = log.mark()
    process = BotProcess(hs, bot, store, command=command)
    try:
        ready = await trio.to_thread.run_sync(process.wait_for, "bot_ready")
        wall = time.perf_counter() - process.started
        pid = process.proc.pid
        cpu, peak = cpu_seconds(pid), peak_rss_mb(pid)
        # Read at once: what the bot does after bot_ready is not start-up.
        endpoints = log.count(bot.user_id, mark)
    finally:
        await trio.to_thread.run_sync(_stop, process)
    return Start(
        wall, cpu, peak, ready["startup_requests"], ready["chats"], endpoints,
        _crypto_state(process),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Echo


def _bodies(count: int) -> list[str]:
    return [f"burst {index}" for index in range(count)]  # as `ReplyClock.send_in_order`


def _shares(expected: int, rooms: list[RoomID]) -> list[int]:
    return [expected // len(rooms) + (i < expected % len(rooms)) for i in range(len(rooms))]


@dataclass
class EncryptedReplyClock(ReplyClock):
    """`ReplyClock` for encrypted rooms: the same bodies, encrypted by ``crypto`` in
    `prepare`; only encrypted replies are seen."""

    crypto: BotCrypto | None = None

    prepared: dict[RoomID, list[dict[str, Any]]] = field(default_factory=dict)

    async def prepare(self, room: RoomID, count: int) -> None:
        """Encrypt ``room``'s share of the burst before it starts: the person's
        encryption (serialised by its crypto's lock) must not pace the sends."""
        assert self.crypto is not None
        self.prepared[room] = [
            await self.crypto.encrypt(room, "m.room.message", {"msgtype": "m.text", "body": body})
            for body in _bodies(count)
        ]

    async def send_in_order(self, client: MatrixClient, room: RoomID, count: int) -> None:
        for content in self.prepared.pop(room)[:count]:
            started = time.perf_counter()
            event_id = await client.send_event(room, "m.room.encrypted", content, new_txn_id())
            self.sent[event_id] = started
            self.room_of[event_id] = room
            self._check()

    async def start(self, client: MatrixClient) -> tuple[SyncToken, Any]:
        replies = _reply_filter(self.bot_id, 1000)
        replies["room"]["timeline"]["types"] = ["m.room.encrypted"]
        filter_id = await client.upload_filter(replies)
        first = await client.sync(timeout_ms=secrets.randbelow(1000), filter=filter_id)
        return first.next_batch, filter_id


async def run_burst(
    client: MatrixClient,
    clock: ReplyClock,
    rooms: list[RoomID],
    alive: Callable[[], bool],
) -> bool:
    """`burst._run_burst` inside the caller's trio run (the person's crypto lives
    there); whether `BURST_TIMEOUT_S` ran out first."""
    shares = _shares(clock.expected, rooms)
    if isinstance(clock, EncryptedReplyClock):
        for room, share in zip(rooms, shares, strict=True):
            await clock.prepare(room, share)
    since, filter_id = await clock.start(client)
    with trio.move_on_after(BURST_TIMEOUT_S) as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(clock.follow, client, since, filter_id, alive)
            for room, share in zip(rooms, shares, strict=True):
                nursery.start_soon(clock.send_in_order, client, room, share)
            await clock.all_answered.wait()
            nursery.cancel_scope.cancel()
    return scope.cancelled_caught


@dataclass
class Echo:
    kind: str
    messages: int
    answered: int = 0
    cpu_s: float = math.nan
    latencies: list[float] = field(default_factory=list)
    endpoints: Counter[str] = field(default_factory=Counter)
    warm_up: Counter[str] = field(default_factory=Counter)  # the first message per room
    load: float = math.nan  # the machine's 1-minute load average when it ended
    error: str | None = None

    @property
    def cpu_per_1k(self) -> float:
        return self.cpu_s / (self.answered or self.messages) * 1000


async def measure_echo(
    hs: SynapseServer,
    log: AccessLog,
    client: MatrixClient,
    crypto: BotCrypto | None,
    bot: RegisteredUser,
    store: Path,
    rooms: list[RoomID],
    messages: int,
    command: list[str],
) -> Echo:
    def clock(expected: int) -> ReplyClock:
        if crypto is None:
            return ReplyClock(bot.user_id, expected)
        return EncryptedReplyClock(bot.user_id, expected, crypto=crypto)

    echo = Echo("plain" if crypto is None else "encrypted", messages)
    process = BotProcess(hs, bot, store, command=command)
    try:
        await trio.to_thread.run_sync(process.wait_for, "bot_ready")
        alive = _alive(process)
        mark = log.mark()
        if await run_burst(client, clock(len(rooms)), rooms, alive):
            raise RuntimeError("the warm-up messages were not all answered")
        echo.warm_up = log.count(bot.user_id, mark)
        measured = clock(messages)
        mark, before = log.mark(), cpu_seconds(process.proc.pid)
        timed_out = await run_burst(client, measured, rooms, alive)
        echo.cpu_s = cpu_seconds(process.proc.pid) - before
        echo.load = os.getloadavg()[0]
        echo.endpoints = log.count(bot.user_id, mark)
        echo.latencies = measured.latencies()
        echo.answered = len(measured.sent.keys() & measured.answered.keys())
        if timed_out:
            echo.error = f"TIMED OUT: {echo.answered} of {messages} answered"
    except Exception as exc:  # noqa: BLE001  a failed scenario is news for its row only
        echo.error = f"{type(exc).__name__}: {exc}\n{_log_tail(process)}"
    finally:
        await trio.to_thread.run_sync(_stop, process)
    return echo


# ---------------------------------------------------------------------------------------------
# Figures


def print_starts(starts: dict[str, Start]) -> None:
    print("\nstart-up to bot_ready (spawn to the log line; Synapse on loopback)")
    print(
        f"{'case':<32}{'wall s':>8}{'cpu s':>8}{'peak MB':>9}{'requests':>10}"
        f"{'in log':>8}{'chats':>7}{'crypto':>10}"
    )
    for label, start in starts.items():
        print(
            f"{label:<32}{start.wall_s:8.2f}{start.cpu_s:8.2f}{start.peak_mb:9.1f}"
            f"{start.requests:10d}{sum(start.endpoints.values()):8d}{start.chats:7d}"
            f"{start.crypto:>10}"
        )
    print_endpoints(
        "start-up requests by endpoint (Synapse's access log)",
        {label: start.endpoints for label, start in starts.items()},
    )


def print_endpoints(
    title: str, counts: dict[str, Counter[str]], per: dict[str, int] | None = None
) -> None:
    """One row per endpoint, one column per case; divided by ``per`` (messages)."""
    names = sorted({name for counted in counts.values() for name in counted})
    short = {label: label.replace(" rooms,", "").replace("encrypted", "enc") for label in counts}
    width = max(9, *(len(s) + 2 for s in short.values()))
    print(f"\n{title}")
    print(f"{'endpoint':<40}" + "".join(f"{s:>{width}}" for s in short.values()))
    for name in names:
        cells = []
        for label, counted in counts.items():
            if per is None:
                cells.append(f"{counted[name]:>{width}d}")
            else:
                cells.append(f"{counted[name] / per[label]:>{width}.2f}")
        print(f"{name:<40}" + "".join(cells))


def print_echoes(echoes: list[Echo], messages: int, rooms: int) -> None:
    print(
        f"\necho: {messages} messages over {rooms} rooms at once, after one warm-up message "
        "per room (not counted)"
    )
    print(
        f"{'kind':<12}{'round':>6}{'answered':>10}{'cpu s/1k':>10}{'p50 s':>8}{'p95 s':>8}"
        f"{'max s':>8}{'req/msg':>9}{'load':>6}"
    )
    for number, echo in enumerate(echoes):
        per = echo.answered or messages
        print(
            f"{echo.kind:<12}{number // 2 + 1:>6}{f'{echo.answered}/{messages}':>10}"
            f"{echo.cpu_per_1k:>10.2f}{_percentile(echo.latencies, 0.5):>8.2f}"
            f"{_percentile(echo.latencies, 0.95):>8.2f}{_percentile(echo.latencies, 1.0):>8.2f}"
            f"{sum(echo.endpoints.values()) / per:>9.2f}{echo.load:>6.1f}"
        )
        if echo.error:
            print(f"{'':<18}{echo.error}")
    by_kind = {kind: [e for e in echoes if e.kind == kind and e.answered] for kind in KINDS}
    if all(by_kind.values()):
        cpu = {k: sum(e.cpu_per_1k for e in v) / len(v) for k, v in by_kind.items()}
        p50 = {
            k: sum(_percentile(e.latencies, 0.5) for e in v) / len(v) for k, v in by_kind.items()
        }
        print(
            f"encrypted / plain: CPU {cpu['encrypted'] / cpu['plain']:.2f}x "
            f"({cpu['encrypted']:.2f} vs {cpu['plain']:.2f} s per 1,000), "
            f"p50 {p50['encrypted'] / p50['plain']:.2f}x"
        )
    short = {"plain": "plain", "encrypted": "enc"}
    labels = {f"{short[echo.kind]} r{n // 2 + 1}": echo for n, echo in enumerate(echoes)}
    print_endpoints(
        "echo requests per message by endpoint (Synapse's access log)",
        {label: echo.endpoints for label, echo in labels.items()},
        {label: echo.answered or messages for label, echo in labels.items()},
    )
    print_endpoints(
        "warm-up requests per room (a restarted bot's first message in each room)",
        {label: echo.warm_up for label, echo in labels.items()},
        {label: rooms for label in labels},
    )


def print_profile(path: Path, kind: str, lines: int) -> None:
    if not path.exists():
        print(f"\n{kind}: no profile written")
        return
    print(f"\nprofile of the {kind} bot (whole process): by own time, then crypto by cumulative")
    stats = pstats.Stats(str(path))
    stats.sort_stats("tottime").print_stats(lines)
    stats.sort_stats("cumulative").print_stats(r"bot/e2ee|matrix_crypto|bot/store", lines)


# ---------------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace, tmp: Path, hs: SynapseServer) -> None:
    # The person's crypto is the bot's class: its info lines are not figures.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    log = AccessLog(hs)
    user = hs.register_user("benchuser")
    bots = {kind: hs.register_user(f"{kind}bot") for kind in KINDS}

    def command(kind: str) -> list[str]:
        """The echo bots' command: under cProfile with ``--profile`` (start-ups never)."""
        if args.profile:
            return [
                sys.executable,
                "-m",
                "cProfile",
                "-o",
                str(tmp / f"{kind}.prof"),
                "-m",
                "bot",
                "run",
            ]
        return [sys.executable, "-m", "bot", "run"]

    small = min(SMALL, args.rooms)
    started = time.perf_counter()
    print(f"setting up {args.rooms} plain and {args.rooms} encrypted rooms ...", flush=True)
    rooms = {
        kind: await make_rooms(hs, bot, user, small, encrypted=kind == "encrypted")
        for kind, bot in bots.items()
    }
    starts: dict[str, Start] = {}
    for kind, bot in bots.items():
        device = await new_device(hs, bot)
        store = tmp / f"{kind}-small.sqlite3"
        starts[f"{kind} {small} rooms, fresh"] = await measure_start(
            hs, log, device, store, [sys.executable, "-m", "bot", "run"]
        )
    if args.rooms > small:
        for kind, bot in bots.items():
            more = args.rooms - small
            rooms[kind] += await make_rooms(hs, bot, user, more, encrypted=kind == "encrypted")
    print(f"set up in {time.perf_counter() - started:.0f} s", flush=True)
    devices: dict[str, RegisteredUser] = {}
    for label in ("fresh", "restart"):
        for kind, bot in bots.items():
            if label == "fresh":
                devices[kind] = await new_device(hs, bot)
            store = tmp / f"{kind}.sqlite3"
            starts[f"{kind} {args.rooms} rooms, {label}"] = await measure_start(
                hs, log, devices[kind], store, [sys.executable, "-m", "bot", "run"]
            )
    print_starts(starts)
    sys.stdout.flush()

    echoes: list[Echo] = []
    async with (
        _user_client(hs, user, args.echo_rooms) as client,
        person_crypto(client, user, tmp / "person.sqlite3") as crypto,
    ):
        for _ in range(args.rounds):
            for kind in KINDS:
                echoes.append(
                    await measure_echo(
                        hs,
                        log,
                        client,
                        crypto if kind == "encrypted" else None,
                        devices[kind],
                        tmp / f"{kind}.sqlite3",
                        rooms[kind][: args.echo_rooms],
                        args.messages,
                        command(kind),
                    )
                )
    print_echoes(echoes, args.messages, args.echo_rooms)
    print(f"\nwhole run {time.perf_counter() - started:.0f} s")
    if args.profile:
        for kind in KINDS:
            print_profile(tmp / f"{kind}.prof", kind, args.profile)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rooms", type=int, default=60, help="rooms per bot (start-up)")
    parser.add_argument("--messages", type=int, default=200, help="echoed messages per bot")
    parser.add_argument("--echo-rooms", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="LINES",
        help="run the echo bots under cProfile; print this many of their busiest functions",
    )
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="bench-e2ee-") as tmp,
        SynapseServer(Path(tmp) / "synapse") as hs,
    ):
        trio.run(bench, args, Path(tmp), hs)


if __name__ == "__main__":
    main()
