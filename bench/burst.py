"""Reply latency under a burst: many messages at once, into a few rooms or many.

Starts a throwaway Synapse, makes managed chats for one user, then for each room
count in ``--rooms`` starts ``python -m bot run`` (echo backend) as its own process
and has the user send ``--messages`` messages as fast as Synapse takes them: one
task per room, each sending its room's share in order, all rooms at once. The user's
client follows /sync and matches each bot reply to its message by the reply's
``m.relates_to.m.in_reply_to.event_id``. Per scenario and round it prints:

* replies/s: messages over the time from the first send to the last reply;
* latency p50 / p95 / max: from just before a message's send request to the sync
  that brought its reply; and the spread of the rooms' own p95 (fairness);
* the bot's CPU per 1,000 messages (from /proc, while the burst lasts) and its
  requests per message.

``--slow-room`` adds the webhook backend case: a small HTTP server in this process
(127.0.0.1) answers the messages of one room after ``--slow-seconds`` and every
other room's at once. The slow room's message goes first; once the server holds it,
one message goes into each of the other rooms, and it prints how long their
answers took while the slow one was pending.

``--source DIR`` runs the bot from another checkout (``PYTHONPATH=DIR``, started in
DIR) with ``--python``, so one session can compare two versions; this process
(Synapse, the user's client) always runs this checkout's code. ``--env KEY=VALUE``
passes a setting to the bot (e.g. ``BOT_WORKERS=4`` for a version that has it).
Figures only: nothing here asserts a speed. The bot, Synapse and this process share
the machine's cores, so compare runs made at the same time.

    python bench/burst.py [--messages 400] [--rooms 4,40] [--rounds 1] [--slow-room]
    python bench/burst.py --source /tmp/before --python .nox/tests/bin/python
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import trio
from bot_runtime import BotProcess, cpu_seconds, make_managed_rooms

from matrix_api import MatrixClient, new_txn_id
from matrix_api.h11_transport import H11Transport
from matrix_api.models import FilterID, RoomID, SyncToken
from matrix_api.testing.synapse import SYNAPSE_VERSION, RegisteredUser, SynapseServer

CHECKOUT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# The user's side: send, stamp, follow /sync for the replies


def _reply_filter(bot_id: str, limit: int) -> dict[str, Any]:
    # Only the bot's messages, and room for a whole burst per sync: a "limited"
    # timeline would leave replies out.
    return {
        "room": {
            "timeline": {"limit": limit, "senders": [bot_id], "types": ["m.room.message"]},
            "state": {"lazy_load_members": True, "types": []},
            "ephemeral": {"not_types": ["*"]},
            "account_data": {"not_types": ["*"]},
        },
        "presence": {"not_types": ["*"]},
        "account_data": {"not_types": ["*"]},
    }


@dataclass
class ReplyClock:
    """Send times of the user's messages and arrival times of the bot's replies
    (``time.perf_counter``), keyed by the message's event id."""

    bot_id: str
    expected: int
    sent: dict[str, float] = field(default_factory=dict)
    room_of: dict[str, RoomID] = field(default_factory=dict)
    answered: dict[str, float] = field(default_factory=dict)
    duplicates: int = 0
    gaps: int = 0
    all_answered: trio.Event = field(default_factory=trio.Event)

    async def send(self, client: MatrixClient, room: RoomID, body: str) -> str:
        started = time.perf_counter()
        event_id = await client.send_event(
            room, "m.room.message", {"msgtype": "m.text", "body": body}, new_txn_id()
        )
        self.sent[event_id] = started
        self.room_of[event_id] = room
        self._check()
        return event_id

    async def send_in_order(self, client: MatrixClient, room: RoomID, count: int) -> None:
        for index in range(count):
            await self.send(client, room, f"burst {index}")

    async def start(self, client: MatrixClient) -> tuple[SyncToken, FilterID]:
        """Where the user's /sync stands now, and the filter for the bot's replies."""
        filter_id = await client.upload_filter(_reply_filter(self.bot_id, 1000))
        # A fresh timeout: Synapse answers an identical /sync from a cache for about
        # two minutes, which would hand a second run an old position.
        first = await client.sync(timeout_ms=secrets.randbelow(1000), filter=filter_id)
        return first.next_batch, filter_id

    async def follow(
        self,
        client: MatrixClient,
        since: SyncToken,
        filter_id: FilterID,
        alive: Callable[[], bool],
    ) -> None:
        """Record each reply's arrival until cancelled; raises if the bot exits."""
        while True:
            response = await client.sync(since=since, timeout_ms=2000, filter=filter_id)
            arrived = time.perf_counter()
            since = response.next_batch
            for joined in response.rooms.join.values():
                self.gaps += joined.timeline.limited
                for event in joined.timeline.events:
                    if event.sender != self.bot_id:
                        continue
                    relates = event.content.get("m.relates_to")
                    in_reply_to = (
                        relates.get("m.in_reply_to") if isinstance(relates, dict) else None
                    )
                    target = in_reply_to.get("event_id") if isinstance(in_reply_to, dict) else None
                    if not isinstance(target, str):
                        continue
                    if target in self.answered:
                        self.duplicates += 1
                    else:
                        self.answered[target] = arrived
            self._check()
            if not alive():
                raise RuntimeError("the bot exited during the burst")

    def _check(self) -> None:
        if len(self.sent) >= self.expected and self.sent.keys() <= self.answered.keys():
            self.all_answered.set()

    def latencies(self, rooms: Sequence[RoomID] | None = None) -> list[float]:
        return sorted(
            self.answered[event_id] - started
            for event_id, started in self.sent.items()
            if event_id in self.answered and (rooms is None or self.room_of[event_id] in rooms)
        )


@contextlib.asynccontextmanager
async def _user_client(
    hs: SynapseServer, user: RegisteredUser, senders: int
) -> AsyncIterator[MatrixClient]:
    # One connection per sending room plus the long-poll: the user's own client must
    # not be what queues the burst.
    transport = H11Transport(max_connections=senders + 2)
    async with MatrixClient(
        hs.base_url, access_token=user.access_token, user_id=user.user_id, transport=transport
    ) as client:
        yield client


# ---------------------------------------------------------------------------------------------
# The bot's process


@dataclass
class BotCommand:
    """How to start the bot: which interpreter, from which checkout, with which settings."""

    python: str
    source: Path
    settings: dict[str, str]

    def start(
        self, hs: SynapseServer, bot: RegisteredUser, store: Path, **extra: str
    ) -> BotProcess:
        overlay = {
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(self.source), os.environ.get("PYTHONPATH")])
            ),
            **self.settings,
            **extra,
        }
        # `BotProcess` takes its environment from os.environ and starts the bot in our
        # working directory: lend it both for the moment it spawns. `python -m` puts
        # the working directory first on sys.path, so it must be the checkout too.
        with _environment(overlay), contextlib.chdir(self.source):
            return BotProcess(hs, bot, store, command=[self.python, "-m", "bot", "run"])

    def describe(self) -> str:
        revision = subprocess.run(
            ["git", "-C", str(self.source), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        version = subprocess.run(
            [self.python, "-c", "import platform; print(platform.python_version())"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        shown = " ".join(f"{key}={value}" for key, value in self.settings.items())
        return f"bot from {self.source} ({revision or 'no git'}), python {version or '?'}" + (
            f", {shown}" if shown else ""
        )


@contextlib.contextmanager
def _environment(overlay: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in overlay}
    os.environ.update(overlay)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _stop(process: BotProcess) -> dict[str, Any] | None:
    """Stop the bot by its pid (SIGTERM, then SIGKILL after 30 s); its ``bot_stopped``
    line, or None when it had to be killed or did not log one."""
    try:
        process.stop()
    except subprocess.TimeoutExpired:
        process.proc.kill()
        process.proc.wait()
        return None
    try:
        return process.wait_for("bot_stopped", timeout=1)
    except RuntimeError:
        return None


def _log_tail(process: BotProcess, lines: int = 8) -> str:
    try:
        tail = process.log_path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n".join("    " + line[:300] for line in tail)


# ---------------------------------------------------------------------------------------------
# Figures


def _percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest rank: the smallest value at least ``fraction`` of them do not exceed."""
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


@dataclass
class Outcome:
    clock: ReplyClock
    rooms: list[RoomID]
    timed_out: bool
    cpu_s: float = math.nan
    requests: float = math.nan
    error: str | None = None

    @property
    def answered(self) -> int:
        return len(self.clock.sent.keys() & self.clock.answered.keys())

    def replies_per_s(self) -> float:
        if not self.clock.sent or not self.clock.answered:
            return math.nan
        span = max(self.clock.answered.values()) - min(self.clock.sent.values())
        return self.answered / span if span > 0 else math.nan

    def room_p95s(self) -> list[float]:
        return sorted(
            _percentile(self.clock.latencies([room]), 0.95)
            for room in self.rooms
            if self.clock.latencies([room])
        )


def _run_burst(
    hs: SynapseServer,
    user: RegisteredUser,
    process: BotProcess,
    clock: ReplyClock,
    rooms: list[RoomID],
    timeout: float,
) -> bool:
    """Send ``clock.expected`` messages across ``rooms`` at once and wait for every
    reply; whether ``timeout`` ran out first."""

    async def burst() -> bool:
        async with _user_client(hs, user, len(rooms)) as client:
            since, filter_id = await clock.start(client)
            with trio.move_on_after(timeout) as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(clock.follow, client, since, filter_id, _alive(process))
                    for index, room in enumerate(rooms):
                        share = clock.expected // len(rooms) + (index < clock.expected % len(rooms))
                        nursery.start_soon(clock.send_in_order, client, room, share)
                    await clock.all_answered.wait()
                    nursery.cancel_scope.cancel()
            return scope.cancelled_caught

    return trio.run(burst)


def _alive(process: BotProcess) -> Callable[[], bool]:
    return lambda: process.proc.poll() is None


HEADER = (
    f"{'scenario':<22}{'round':>6}{'answered':>10}{'replies/s':>11}{'p50 s':>8}{'p95 s':>8}"
    f"{'max s':>8}{'room p95 min-max':>18}{'cpu s/1k':>10}{'req/msg':>9}{'load':>6}"
)


def _print_burst(label: str, round_number: int, outcome: Outcome, messages: int) -> None:
    latencies = outcome.clock.latencies()
    p95s = outcome.room_p95s()
    spread = f"{p95s[0]:.2f}-{p95s[-1]:.2f}" if p95s else "-"
    per = outcome.answered or messages  # a burst cut short: per message answered
    print(
        f"{label:<22}{round_number:>6}{f'{outcome.answered}/{messages}':>10}"
        f"{outcome.replies_per_s():>11.1f}{_percentile(latencies, 0.5):>8.2f}"
        f"{_percentile(latencies, 0.95):>8.2f}{_percentile(latencies, 1.0):>8.2f}"
        f"{spread:>18}{outcome.cpu_s / per * 1000:>10.2f}{outcome.requests:>9.2f}"
        f"{os.getloadavg()[0]:>6.1f}",
        flush=True,
    )
    notes = []
    if outcome.timed_out:
        # The store is shared, so the next start answers what is left first.
        notes.append(
            f"TIMED OUT: {outcome.answered} of {messages} answered; the rest load the next scenario"
        )
    if outcome.error:
        notes.append(f"FAILED: {outcome.error}")
    if outcome.clock.duplicates:
        notes.append(f"{outcome.clock.duplicates} duplicate replies")
    if outcome.clock.gaps:
        notes.append(f"{outcome.clock.gaps} limited timelines (replies may be missing)")
    for note in notes:
        print(f"{'':<28}{note}", flush=True)


def burst_scenario(
    hs: SynapseServer,
    bot: RegisteredUser,
    user: RegisteredUser,
    command: BotCommand,
    rooms: list[RoomID],
    messages: int,
    timeout: float,
    store: Path,
) -> Outcome:
    """One bot process, one burst; the bot is stopped (by pid) whatever happens."""
    outcome = Outcome(ReplyClock(bot.user_id, messages), rooms, timed_out=False)
    process = command.start(hs, bot, store, BOT_BACKEND="echo")
    ready: dict[str, Any] = {}
    try:
        ready = process.wait_for("bot_ready", timeout=120)
        before = cpu_seconds(process.proc.pid)
        outcome.timed_out = _run_burst(hs, user, process, outcome.clock, rooms, timeout)
        outcome.cpu_s = cpu_seconds(process.proc.pid) - before
    except Exception as exc:  # noqa: BLE001  a failed scenario is news for its row only
        outcome.error = f"{type(exc).__name__}: {exc}\n{_log_tail(process)}"
    finally:
        stopped = _stop(process)
    if stopped is not None and "requests" in stopped and "startup_requests" in ready:
        requests = stopped["requests"] - ready["startup_requests"]
        outcome.requests = requests / (outcome.answered or messages)
    return outcome


# ---------------------------------------------------------------------------------------------
# One slow room, webhook backend


class SlowWebhook(ThreadingHTTPServer):
    """A webhook on 127.0.0.1 that answers ``slow_room``'s messages after ``seconds``
    and every other room's at once, echoing the body. Each request has a thread, so a
    held answer does not hold the others. Owned by `serving`."""

    daemon_threads = True

    def __init__(self, slow_room: str, seconds: float) -> None:
        super().__init__(("127.0.0.1", 0), _WebhookHandler)
        self.slow_room = slow_room
        self.seconds = seconds
        self.slow_seen = threading.Event()
        self.requests = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


class _WebhookHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the bot's transport expects
    server: SlowWebhook

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        document = json.loads(self.rfile.read(length) or b"{}")
        self.server.requests += 1
        if document.get("room_id") == self.server.slow_room:
            self.server.slow_seen.set()
            time.sleep(self.server.seconds)
        body = json.dumps({"reply": str(document.get("body") or "?")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the figures are the output


@contextlib.contextmanager
def serving(server: SlowWebhook) -> Iterator[SlowWebhook]:
    thread = threading.Thread(target=server.serve_forever, name="slow-webhook", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def slow_room_scenario(
    hs: SynapseServer,
    bot: RegisteredUser,
    user: RegisteredUser,
    command: BotCommand,
    rooms: list[RoomID],
    seconds: float,
    timeout: float,
    store: Path,
) -> tuple[Outcome, float]:
    """The slow room's message first; once the webhook holds it, one message into
    each other room. Returns the outcome and the slow room's own latency."""
    slow, others = rooms[0], rooms[1:]
    secret = secrets.token_hex(16)
    clock = ReplyClock(bot.user_id, len(rooms))
    outcome = Outcome(clock, rooms, timed_out=False)
    with serving(SlowWebhook(slow, seconds)) as webhook:
        process = command.start(
            hs,
            bot,
            store,
            BOT_BACKEND="webhook",
            WEBHOOK_URL=webhook.url,
            WEBHOOK_SECRET=secret,
            WEBHOOK_TIMEOUT_S=str(max(30.0, seconds * 2)),
        )

        async def scenario() -> bool:
            async with _user_client(hs, user, len(rooms)) as client:
                since, filter_id = await clock.start(client)
                with trio.move_on_after(timeout) as scope:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(clock.follow, client, since, filter_id, _alive(process))
                        await clock.send(client, slow, "slow")
                        # The bot is now inside the slow answer: everything after
                        # this must not wait for it.
                        await trio.to_thread.run_sync(
                            webhook.slow_seen.wait, abandon_on_cancel=True
                        )
                        for room in others:
                            nursery.start_soon(clock.send, client, room, "quick")
                        await clock.all_answered.wait()
                        nursery.cancel_scope.cancel()
                return scope.cancelled_caught

        try:
            process.wait_for("bot_ready", timeout=120)
            outcome.timed_out = trio.run(scenario)
        except Exception as exc:  # noqa: BLE001  a failed scenario is news for its row only
            outcome.error = f"{type(exc).__name__}: {exc}\n{_log_tail(process)}"
        finally:
            _stop(process)
    slow_latency = outcome.clock.latencies([slow])
    return outcome, slow_latency[0] if slow_latency else math.nan


def _print_slow(round_number: int, outcome: Outcome, slow_s: float, seconds: float) -> None:
    others = outcome.rooms[1:]
    latencies = outcome.clock.latencies(others)
    within = sum(latency <= 1.0 for latency in latencies)
    print(
        f"round {round_number}: slow room answered after {slow_s:.2f} s (webhook holds "
        f"{seconds:g} s); {len(latencies)}/{len(others)} other rooms answered, "
        f"{within} within 1 s; p50 {_percentile(latencies, 0.5):.2f} s, "
        f"max {_percentile(latencies, 1.0):.2f} s",
        flush=True,
    )
    print("  other rooms, s: " + " ".join(f"{latency:.2f}" for latency in latencies), flush=True)
    if outcome.timed_out:
        print(f"  TIMED OUT: {outcome.answered} of {len(outcome.rooms)} answered", flush=True)
    if outcome.error:
        print(f"  FAILED: {outcome.error}", flush=True)


# ---------------------------------------------------------------------------------------------


def _room_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected room counts like 4,40, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("room counts must be whole numbers of at least 1")
    return counts


def _setting(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=400, help="per burst (default 400)")
    parser.add_argument("--rooms", type=_room_counts, default=[4, 40], help="e.g. 4,40")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--timeout", type=float, default=300, help="seconds a scenario may take (default 300)"
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter for the bot")
    parser.add_argument(
        "--source", type=Path, default=CHECKOUT, help="checkout to run the bot from"
    )
    parser.add_argument(
        "--env",
        type=_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting for the bot's environment (repeatable)",
    )
    parser.add_argument("--slow-room", action="store_true", help="add the slow-webhook case")
    parser.add_argument("--slow-seconds", type=float, default=8.0)
    parser.add_argument(
        "--slow-rooms", type=int, default=16, help="rooms in the slow case, the slow one included"
    )
    parser.add_argument("--no-bursts", action="store_true", help="only the slow-webhook case")
    args = parser.parse_args()
    if args.messages < 1 or args.rounds < 1 or args.slow_rooms < 2:
        parser.error("--messages and --rounds must be at least 1, --slow-rooms at least 2")
    source = args.source.expanduser().resolve()
    if not (source / "bot" / "__main__.py").is_file():
        parser.error(f"--source {source}: no bot/__main__.py there")
    command = BotCommand(args.python, source, dict(args.env))
    # A SIGTERM to this script still runs the cleanups below (bot and Synapse by pid).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    bursts = [] if args.no_bursts else args.rooms
    needed = max([*bursts, args.slow_rooms if args.slow_room else 0])
    print(command.describe())
    print(
        f"Synapse {SYNAPSE_VERSION} on 127.0.0.1; {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.1f}; timeout {args.timeout:g} s per scenario",
        flush=True,
    )
    with (
        tempfile.TemporaryDirectory(prefix="bench-burst-") as tmp,
        SynapseServer(Path(tmp) / "synapse") as hs,
    ):
        bot = hs.register_user("burstbot")
        user = hs.register_user("burstuser")
        rooms = trio.run(make_managed_rooms, hs, bot, user, needed)
        store = Path(tmp) / "store.sqlite3"
        if bursts:
            print(f"\n{HEADER}", flush=True)
        for round_number in range(1, args.rounds + 1):
            for count in bursts:
                outcome = burst_scenario(
                    hs, bot, user, command, rooms[:count], args.messages, args.timeout, store
                )
                label = f"{args.messages} msgs / {count} rooms"
                _print_burst(label, round_number, outcome, args.messages)
        if args.slow_room:
            print(
                f"\nslow room: webhook backend, {args.slow_rooms} rooms, one message each; "
                f"one room's answer takes {args.slow_seconds:g} s",
                flush=True,
            )
            for round_number in range(1, args.rounds + 1):
                outcome, slow_s = slow_room_scenario(
                    hs,
                    bot,
                    user,
                    command,
                    rooms[: args.slow_rooms],
                    args.slow_seconds,
                    args.timeout,
                    store,
                )
                _print_slow(round_number, outcome, slow_s, args.slow_seconds)


if __name__ == "__main__":
    main()
