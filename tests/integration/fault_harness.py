"""Fault scenarios against a real Synapse: the bot as an operator runs it, people, a lying proxy.

Shared by the fault tests (``tests/integration/test_faults_*.py``, reduced sizes) and
``bench/faults.py`` (the issue's full sizes). The pieces:

* `FaultLab` owns whatever a scenario starts (bot processes, clients) and stops it by
  pid on the way out, even after a failure; then it scans every log line the bots
  wrote for the secrets it handed out (access tokens, passwords).
* `BotProcess` is ``python -m bot run`` configured through the environment, with its
  JSON log lines in one file per start: kill -9, SIGTERM, start again.
* `Traffic` is people sending at a steady rate and a collector reading the bot's
  answers from /sync by their ``m.in_reply_to`` targets; `audit` re-reads each room
  through /messages for the final count (answered once, lost, duplicated) and order.
* `FaultProxy` is a small HTTP/1.1 proxy on 127.0.0.1 in front of Synapse, written
  with trio: it records every exchange with its timing and, when armed, spoils
  selected answers (truncated JSON, wrong types, malformed events, slow answers,
  resets mid-answer, HTML 502 pages, a persistent rewrite).
* ``run_*``: one function per scenario; each returns its `Figures`.

Everything runs under trio with the real clock; the blocking launcher calls (Synapse
start and stop, registration) go through `trio.to_thread`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import time
import uuid
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import httpx
import msgspec
import trio
from structlog.testing import capture_logs

from bot.backends import BackendError
from bot.chats import CHAT_MARKER, Chat, marker_content, new_chat_id, now_ms
from bot.config import AllowList, Settings
from bot.handler import FAILED_NOTICE
from bot.messages import IncomingMessage, in_reply_to
from bot.runtime import BotRuntime, run_bot
from bot.store import NewInboxItem, Store
from matrix_api import (
    LimitExceeded,
    MatrixAPIError,
    MatrixClient,
    MatrixError,
    RetryPolicy,
    new_txn_id,
)
from matrix_api import TransportError as MatrixTransportError
from matrix_api.models import EventID, RoomEvent, RoomID, SyncToken
from matrix_api.testing.synapse import RegisteredUser, SynapseServer

DEFAULT_SEED = 5
"""The issue's number; ``FAULT_SEED=<n>`` in the environment replays another run."""


def seed_from_env() -> int:
    return int(os.environ.get("FAULT_SEED", DEFAULT_SEED))


# --- sizes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """How big each scenario is: `CI` for the tests, `FULL` (the issue's) for the bench."""

    crash_messages: int
    crash_rate: float  # messages per second, over 4 rooms
    outage_messages: int
    outage_rate: float
    outage_s: float
    burst_messages: int  # over 3 rooms, Synapse's default rate limits
    gap_messages: int  # sent while the bot is down, one room
    busy_per_sender: int  # 4 senders, 4 rooms, back to back
    token_messages: int
    token_rate: float
    hostile_rounds: int  # each round spoils one answer of every kind
    graceful_messages: int
    restart_messages: int
    restart_rate: float
    settle_s: float  # how long to keep watching for duplicates once all is answered


CI = Sizes(
    crash_messages=48,
    crash_rate=4.0,
    outage_messages=24,
    outage_rate=1.0,
    outage_s=10.0,
    burst_messages=10,
    gap_messages=120,
    busy_per_sender=25,
    token_messages=24,
    token_rate=2.0,
    hostile_rounds=1,
    graceful_messages=20,
    restart_messages=36,
    restart_rate=2.0,
    settle_s=2.0,
)
FULL = Sizes(
    crash_messages=300,
    crash_rate=10.0,
    outage_messages=90,
    outage_rate=3.0,
    outage_s=12.0,
    burst_messages=60,
    gap_messages=200,
    busy_per_sender=100,
    token_messages=90,
    token_rate=3.0,
    hostile_rounds=3,
    graceful_messages=20,
    restart_messages=180,
    restart_rate=2.0,
    settle_s=5.0,
)


# --- figures --------------------------------------------------------------------------


@dataclass
class Figures:
    """What one scenario run shows: the issue's columns, plus notes.

    ``recover_s``: from the end of a fault (the bot started again, the homeserver
    back, the token renewed ...) until every message sent before that moment, and
    the first one sent after it, had its answer; the largest over the run's faults.
    """

    scenario: str
    sent: int = 0
    answered_once: int = 0
    lost: int = 0
    duplicated: int = 0
    recover_s: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict, repr=False)
    """What the tests check beyond the columns; not printed."""

    HEADER = f"{'scenario':<26}{'sent':>6}{'once':>6}{'lost':>6}{'dup':>6}{'recover s':>11}  notes"

    def row(self) -> str:
        recover = "-" if self.recover_s is None else f"{self.recover_s:.1f}"
        notes = ", ".join(f"{key}={value}" for key, value in self.notes.items())
        return (
            f"{self.scenario:<26}{self.sent:>6}{self.answered_once:>6}{self.lost:>6}"
            f"{self.duplicated:>6}{recover:>11}  {notes}"
        )

    def show(self) -> None:
        print(f"\n{self.HEADER}\n{self.row()}", flush=True)


# --- running things in the background -------------------------------------------------


def _sole(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error inside (nested) ``group``, else the group itself."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        error = pending.pop()
        if isinstance(error, BaseExceptionGroup):
            pending.extend(error.exceptions)
        else:
            leaves.append(error)
    return leaves[0] if len(leaves) == 1 else group


@asynccontextmanager
async def background(
    *tasks: Callable[..., Awaitable[Any]],
) -> AsyncIterator[trio.Nursery]:
    """Start ``tasks`` (each with ``nursery.start``) for the body, then cancel them.

    An error in the body or in a task comes out as itself, not wrapped in an
    exception group, so a failing assertion reads as one.
    """
    try:
        async with trio.open_nursery() as nursery:
            for task in tasks:
                await nursery.start(task)
            yield nursery
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise _sole(group) from None


async def together(*jobs: Callable[[], Awaitable[Any]]) -> None:
    """Run ``jobs`` concurrently until all are done; a failure comes out as itself."""
    try:
        async with trio.open_nursery() as nursery:
            for job in jobs:
                nursery.start_soon(job)
    except BaseExceptionGroup as group:
        raise _sole(group) from None


# --- the bot as a process -------------------------------------------------------------


def _wall(record: dict[str, Any]) -> float:
    stamp = record.get("timestamp")
    if not isinstance(stamp, str):
        return 0.0
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


@dataclass
class _Run:
    number: int
    log_path: Path
    process: trio.Process
    started_at: float  # wall clock
    records: list[dict[str, Any]] = field(default_factory=list)
    offset: int = 0
    partial: bytes = b""
    stray_lines: list[str] = field(default_factory=list)


class BotProcess:
    """``python -m bot run`` as an operator runs it: settings from the environment,
    JSON log lines (stderr) in ``<name>-<n>.log``, one file per start.

    The owner (`FaultLab`) stops it by pid; every start, kill and stop is awaited.
    """

    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.env = env
        self.log_dir = log_dir
        self.runs: list[_Run] = []

    @property
    def user_id(self) -> str:
        return self.env["MATRIX_USER_ID"]

    @property
    def store_path(self) -> Path:
        return Path(self.env["BOT_STORE_PATH"])

    @property
    def current(self) -> _Run:
        if not self.runs:
            raise RuntimeError(f"{self.name} was never started")
        return self.runs[-1]

    @property
    def running(self) -> bool:
        return bool(self.runs) and self.current.process.returncode is None

    @property
    def pid(self) -> int | None:
        return self.current.process.pid if self.running else None

    async def start(self) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        number = len(self.runs) + 1
        log_path = self.log_dir / f"{self.name}-{number}.log"
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "bot", "run"],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=fd,
            )
        finally:
            os.close(fd)
        self.runs.append(_Run(number, log_path, process, time.time()))

    # -- reading the logs --------------------------------------------------------------

    def _refresh(self, run: _Run) -> None:
        with run.log_path.open("rb") as log:
            log.seek(run.offset)
            data = log.read()
        run.offset += len(data)
        lines = (run.partial + data).split(b"\n")
        run.partial = lines.pop()
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            try:
                record = json.loads(line)
            except ValueError:
                run.stray_lines.append(line)
                continue
            if not isinstance(record, dict):
                run.stray_lines.append(line)
                continue
            record["_run"] = run.number
            record["_t"] = _wall(record)
            run.records.append(record)

    def records(self, run: int | None = None) -> list[dict[str, Any]]:
        """The JSON log records of start number ``run`` (1-based), or of all starts."""
        chosen = self.runs if run is None else [self.runs[run - 1]]
        found: list[dict[str, Any]] = []
        for each in chosen:
            self._refresh(each)
            found.extend(each.records)
        return found

    def events(self, name: str, run: int | None = None) -> list[dict[str, Any]]:
        return [r for r in self.records(run) if r.get("event") == name]

    def text(self) -> str:
        return "".join(run.log_path.read_text(errors="replace") for run in self.runs)

    def tail(self, lines: int = 25) -> str:
        if not self.runs:
            return "(never started)"
        text = self.current.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    async def wait_for(
        self,
        event: str,
        *,
        timeout: float = 60.0,
        count: int = 1,
        where: Callable[[dict[str, Any]], bool] | None = None,
    ) -> dict[str, Any]:
        """The ``count``-th record named ``event`` of the current start (matching ``where``).

        Fails when the process exits first or nothing comes within ``timeout`` s.
        """
        run = self.current
        deadline = trio.current_time() + timeout
        while True:
            self._refresh(run)
            found = [
                r for r in run.records if r.get("event") == event and (where is None or where(r))
            ]
            if len(found) >= count:
                return found[count - 1]
            if run.process.returncode is not None:
                self._refresh(run)
                raise AssertionError(
                    f"{self.name} exited ({run.process.returncode}) before logging {event}:\n"
                    f"{self.tail()}"
                )
            if trio.current_time() > deadline:
                raise AssertionError(
                    f"{self.name} did not log {event} within {timeout} s:\n{self.tail()}"
                )
            await trio.sleep(0.05)

    async def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        return await self.wait_for("bot_ready", timeout=timeout)

    # -- stopping ------------------------------------------------------------------------

    async def kill(self) -> None:
        """kill -9, and wait for it."""
        run = self.current
        if run.process.returncode is None:
            run.process.send_signal(signal.SIGKILL)
        await run.process.wait()

    async def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (a graceful stop); the exit code. Fails after ``timeout`` s."""
        run = self.current
        if run.process.returncode is None:
            run.process.send_signal(signal.SIGTERM)
        with trio.fail_after(timeout):
            return await run.process.wait()

    async def wait_exit(self, timeout: float = 60.0) -> int:
        with trio.fail_after(timeout):
            return await self.current.process.wait()

    async def stop(self) -> None:
        """Leave nothing running: SIGTERM, then SIGKILL if it does not go."""
        if not self.running:
            if self.runs:
                await self.current.process.wait()
            return
        try:
            await self.terminate(timeout=20.0)
        except trio.TooSlowError:
            await self.kill()


def _bot_env(
    homeserver: str,
    user_id: str,
    store: Path,
    *,
    access_token: str | None,
    password: str | None,
    device_id: str | None,
    workers: int,
    drain_s: float,
    allowed: Sequence[str],
    level: str,
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MATRIX_", "BOT_"))}
    env.update(
        MATRIX_HOMESERVER=homeserver,
        MATRIX_USER_ID=user_id,
        BOT_STORE_PATH=str(store),
        BOT_LOG_FORMAT="json",
        BOT_LOG_LEVEL=level,
        BOT_WORKERS=str(workers),
        BOT_DRAIN_TIMEOUT_S=str(drain_s),
    )
    if access_token is not None:
        env["MATRIX_ACCESS_TOKEN"] = access_token
    if password is not None:
        env["MATRIX_PASSWORD"] = password
    if device_id is not None:
        env["MATRIX_DEVICE_ID"] = device_id
    if allowed:
        env["BOT_ALLOWED_USERS"] = ",".join(allowed)
    return env


# --- the lab --------------------------------------------------------------------------


class FaultLab:
    """Owns what one scenario starts; see `fault_lab`."""

    def __init__(self, workdir: Path, seed: int) -> None:
        self.workdir = workdir
        self.seed = seed
        self.rng = random.Random(seed)
        self.bots: list[BotProcess] = []
        self.secrets: set[str] = set()
        self.captured: list[str] = []
        """Other captured output to scan (in-process bots' log records)."""
        self._clients: list[MatrixClient] = []

    def remember_secret(self, *values: str | None) -> None:
        self.secrets.update(v for v in values if v)

    async def user(
        self,
        hs: SynapseServer,
        prefix: str,
        *,
        admin: bool = False,
        password: str | None = None,
    ) -> RegisteredUser:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        user = await trio.to_thread.run_sync(partial(hs.register_user, name, password, admin=admin))
        self.remember_secret(user.access_token, user.password)
        return user

    def client(
        self,
        homeserver: str,
        user: RegisteredUser | None = None,
        *,
        access_token: str | None = None,
        user_id: str | None = None,
    ) -> MatrixClient:
        """A client the lab closes; as ``user`` or with an explicit token.

        It tries each request once: `Traffic` and the collector retry on their own,
        quietly, so the only retry logs are the bot's.
        """
        client = MatrixClient(
            homeserver,
            access_token=user.access_token if user is not None else access_token,
            user_id=user.user_id if user is not None else user_id,
            retry_policy=RetryPolicy(max_attempts=1),
        )
        self._clients.append(client)
        return client

    def bot(
        self,
        homeserver: str,
        user_id: str,
        *,
        access_token: str | None = None,
        password: str | None = None,
        device_id: str | None = None,
        name: str = "bot",
        store: Path | None = None,
        workers: int = 4,
        drain_s: float = 5.0,
        allowed: Sequence[str] = (),
        level: str = "info",
    ) -> BotProcess:
        self.remember_secret(access_token, password)
        taken = {bot.name for bot in self.bots}
        if name in taken:  # each bot its own store and log files
            name = next(f"{name}{n}" for n in range(2, 100) if f"{name}{n}" not in taken)
        log_dir = self.workdir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        env = _bot_env(
            homeserver,
            user_id,
            store or self.workdir / f"{name}.sqlite3",
            access_token=access_token,
            password=password,
            device_id=device_id,
            workers=workers,
            drain_s=drain_s,
            allowed=allowed,
            level=level,
        )
        process = BotProcess(name, env, log_dir)
        self.bots.append(process)
        return process

    @asynccontextmanager
    async def proxy(self, upstream: str) -> AsyncIterator[FaultProxy]:
        """`open_fault_proxy`, with every URL it saw kept for the secret scan."""
        async with open_fault_proxy(upstream) as proxy:
            try:
                yield proxy
            finally:
                self.captured.append("\n".join(proxy.targets))

    def leaks(self) -> list[str]:
        """Where a secret shows up in captured output (never the secret itself)."""
        found = []
        texts: list[tuple[str, str]] = []
        for bot in self.bots:
            texts.extend(
                (run.log_path.name, run.log_path.read_text(errors="replace")) for run in bot.runs
            )
        texts.extend((f"captured #{i}", text) for i, text in enumerate(self.captured))
        for where, text in texts:
            for number, secret in enumerate(sorted(self.secrets)):
                if len(secret) >= 8 and secret in text:
                    found.append(f"secret #{number} ({len(secret)} chars) appears in {where}")
        return found

    def stray_output(self) -> list[str]:
        """Lines a bot wrote that are not JSON log records (a raw traceback, a warning)."""
        found = []
        for bot in self.bots:
            for run in bot.runs:
                bot.records(run.number)
                found.extend(f"{run.log_path.name}: {line[:300]}" for line in run.stray_lines)
        return found

    async def aclose(self) -> None:
        """Stop every bot (by its process) and close every client, whatever fails."""
        async with AsyncExitStack() as stack:
            for client in self._clients:
                stack.push_async_callback(client.aclose)
            for bot in self.bots:
                stack.push_async_callback(bot.stop)


@asynccontextmanager
async def fault_lab(workdir: Path, seed: int | None = None) -> AsyncIterator[FaultLab]:
    """A `FaultLab` for the body; afterwards every bot is stopped (by pid), and the
    captured output is checked: no secret handed out appears in it, and every line a
    bot wrote is a JSON log record (a raw traceback would mean a crash)."""
    lab = FaultLab(workdir, seed_from_env() if seed is None else seed)
    print(f"\nfault seed {lab.seed} (FAULT_SEED=<n> replays another)", flush=True)
    try:
        yield lab
    finally:
        with trio.CancelScope(shield=True):
            await lab.aclose()
    leaks = lab.leaks()
    assert not leaks, "secrets in captured output:\n" + "\n".join(leaks)
    stray = lab.stray_output()
    assert not stray, "a bot wrote something other than JSON log lines:\n" + "\n".join(stray)


# --- rooms ----------------------------------------------------------------------------


async def managed_rooms(
    homeserver: str,
    bots: Sequence[RegisteredUser],
    owner: RegisteredUser,
    count: int,
    *,
    members: Sequence[RegisteredUser] = (),
    name: str = "fault chat",
) -> list[RoomID]:
    """Rooms ``owner`` made and each bot took on (marker written, joined), as if the
    bot had accepted the invite; ``members`` join too."""
    rooms: list[RoomID] = []
    async with AsyncExitStack() as stack:

        def client(user: RegisteredUser) -> MatrixClient:
            return MatrixClient(homeserver, access_token=user.access_token, user_id=user.user_id)

        as_owner = await stack.enter_async_context(client(owner))
        as_bots = [await stack.enter_async_context(client(b)) for b in bots]
        as_members = [await stack.enter_async_context(client(m)) for m in members]
        for index in range(count):
            title = f"{name} {index}"
            room_id = await as_owner.create_room(
                name=title,
                preset="private_chat",
                invite=[u.user_id for u in (*bots, *members)],
            )
            for as_bot in as_bots:
                chat = Chat(new_chat_id(), room_id, owner.user_id, title, now_ms())
                await as_bot.put_room_account_data(room_id, CHAT_MARKER, marker_content(chat))
                await as_bot.join_room(room_id)
            for as_member in as_members:
                await as_member.join_room(room_id)
            rooms.append(room_id)
    return rooms


async def admin_request(
    homeserver: str, admin: RegisteredUser, method: str, path: str, body: Any = None
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=homeserver, timeout=30.0) as http:
        response = await http.request(
            method,
            path,
            json=body,
            headers={"Authorization": f"Bearer {admin.access_token}"},
        )
    if response.status_code >= 400:
        raise AssertionError(f"{method} {path}: HTTP {response.status_code} {response.text[:200]}")
    return response


def user_path(user_id: str) -> str:
    return quote(user_id, safe="")


# --- people and the bot's answers -----------------------------------------------------


@dataclass(frozen=True)
class Sent:
    event_id: EventID
    room_id: RoomID
    sender: str
    index: int
    at: float  # wall clock, once the server accepted it


@dataclass(frozen=True)
class Answer:
    event_id: EventID
    room_id: RoomID
    bot: str
    target: str | None
    ts: float  # the server's origin_server_ts in seconds (same machine, same clock)
    content: dict[str, Any]


_COLLECTOR_FILTER = {
    "room": {
        "timeline": {"limit": 200, "types": ["m.room.message"]},
        "state": {"lazy_load_members": True, "types": []},
        "ephemeral": {"types": []},
        "account_data": {"types": []},
    },
    "presence": {"types": []},
    "account_data": {"types": []},
}
_PAGE_FILTER = {"types": ["m.room.message"]}


def _transient(error: MatrixAPIError) -> bool:
    return isinstance(error, MatrixTransportError | LimitExceeded) or (
        isinstance(error, MatrixError) and error.status >= 500
    )


class Traffic:
    """People writing to the bot, and the bot's answers as they see them.

    `send` keeps trying (same transaction id) through outages and rate limits, so a
    message counts as sent only once the server has it. `collect` long-polls /sync
    and records every message of the bots, filling ``limited`` gaps with /messages.
    """

    def __init__(self, bots: Collection[str]) -> None:
        self.bots = frozenset(bots)
        self.sent: list[Sent] = []
        self.seen: dict[EventID, Answer] = {}

    async def send(
        self,
        client: MatrixClient,
        room_id: RoomID,
        body: str | None = None,
        *,
        content: dict[str, Any] | None = None,
        patience: float = 180.0,
    ) -> EventID:
        content = content if content is not None else {"msgtype": "m.text", "body": body}
        txn_id = new_txn_id()
        deadline = trio.current_time() + patience
        while True:
            try:
                event_id = await client.send_event(room_id, "m.room.message", content, txn_id)
                break
            except MatrixAPIError as exc:
                if not _transient(exc) or trio.current_time() > deadline:
                    raise
                await trio.sleep(0.5)
        self.sent.append(
            Sent(event_id, room_id, client.require_user_id(), len(self.sent), time.time())
        )
        return event_id

    async def stream(
        self,
        client: MatrixClient,
        rooms: Sequence[RoomID],
        count: int,
        rate: float | None,
        *,
        label: str = "message",
    ) -> None:
        """``count`` messages round-robin over ``rooms``, ``rate`` a second (None: back
        to back); a send that takes longer delays the ones after it."""
        started = trio.current_time()
        for index in range(count):
            if rate is not None:
                await trio.sleep_until(started + index / rate)
            await self.send(client, rooms[index % len(rooms)], f"{label} {index}")

    async def collect(
        self, client: MatrixClient, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        since: SyncToken | None = None
        while True:
            try:
                response = await client.sync(
                    since=since, timeout_ms=0 if since is None else 2000, filter=_COLLECTOR_FILTER
                )
                batches = []
                for room_id, room in response.rooms.join.items():
                    events = list(room.timeline.events)
                    prev = room.timeline.prev_batch
                    if since is not None and room.timeline.limited and prev is not None:
                        events = [*await self._missed(client, room_id, prev, since), *events]
                    batches.append((room_id, events))
            except MatrixAPIError:
                await trio.sleep(0.5)
                continue
            for room_id, events in batches:
                self._note(room_id, events)
            if since is None:
                task_status.started()
            since = response.next_batch

    @staticmethod
    async def _missed(
        client: MatrixClient, room_id: RoomID, prev: SyncToken, since: SyncToken
    ) -> list[RoomEvent]:
        missed: list[RoomEvent] = []
        token: SyncToken | None = prev
        while token is not None:
            page = await client.messages(
                room_id,
                direction="b",
                from_token=token,
                to_token=since,
                limit=500,
                filter=_PAGE_FILTER,
            )
            missed.extend(page.chunk)
            if not page.chunk:
                break
            token = page.end
        missed.reverse()
        return missed

    def _note(self, room_id: RoomID, events: Iterable[RoomEvent]) -> None:
        for event in events:
            if event.sender in self.bots and event.event_id not in self.seen:
                self.seen[event.event_id] = Answer(
                    event.event_id,
                    room_id,
                    event.sender,
                    in_reply_to(event),
                    event.origin_server_ts / 1000,
                    dict(event.content),
                )

    def answers_to(self, event_id: str, bot: str | None = None) -> list[Answer]:
        return [
            a for a in self.seen.values() if a.target == event_id and (bot is None or a.bot == bot)
        ]

    def unanswered(
        self, events: Iterable[str] | None = None, bots: Iterable[str] | None = None
    ) -> list[str]:
        wanted = list(events) if events is not None else [s.event_id for s in self.sent]
        answered = {(a.bot, a.target) for a in self.seen.values()}
        return [
            event_id
            for event_id in wanted
            if any((bot, event_id) not in answered for bot in (bots or self.bots))
        ]

    async def wait_answered(
        self,
        events: Iterable[str] | None = None,
        *,
        timeout: float,
        bots: Iterable[str] | None = None,
    ) -> float:
        """Wait until each of ``events`` (default: all sent) has an answer from each
        bot; returns the seconds it took. Fails after ``timeout`` s."""
        wanted = list(events) if events is not None else None
        bot_list = list(bots) if bots is not None else None
        started = trio.current_time()
        while True:
            missing = self.unanswered(wanted, bot_list)
            if not missing:
                return trio.current_time() - started
            if trio.current_time() - started > timeout:
                raise AssertionError(
                    f"{len(missing)} message(s) still unanswered after {timeout} s "
                    f"(of {len(wanted) if wanted is not None else len(self.sent)})"
                )
            await trio.sleep(0.1)


async def audit(client: MatrixClient, rooms: Iterable[RoomID]) -> dict[RoomID, list[RoomEvent]]:
    """Every ``m.room.message`` of each room, oldest first, read through /messages."""
    timelines: dict[RoomID, list[RoomEvent]] = {}
    for room_id in rooms:
        events: list[RoomEvent] = []
        token: SyncToken | None = None
        while True:
            page = await client.messages(
                room_id, direction="f", from_token=token, limit=500, filter=_PAGE_FILTER
            )
            events.extend(page.chunk)
            if not page.chunk or page.end is None:
                break
            token = page.end
        timelines[room_id] = events
    return timelines


def replies_by_target(
    timelines: dict[RoomID, list[RoomEvent]], bot: str
) -> dict[str, list[RoomEvent]]:
    """The bot's notices in ``timelines``, grouped by the message they answer."""
    replies: dict[str, list[RoomEvent]] = {}
    for events in timelines.values():
        for event in events:
            target = in_reply_to(event) if event.sender == bot else None
            if target is not None:
                replies.setdefault(target, []).append(event)
    return replies


def order_violations(
    sent: Sequence[Sent], timelines: dict[RoomID, list[RoomEvent]], bot: str
) -> list[str]:
    """Rooms where the bot answered the sent messages in another order than the room has them."""
    ours = {s.event_id for s in sent}
    bad = []
    for room_id, events in timelines.items():
        asked = [e.event_id for e in events if e.event_id in ours]
        answered: list[str] = []
        for event in events:
            target = in_reply_to(event) if event.sender == bot else None
            if target in ours and target not in answered:
                answered.append(target)
        expected = [e for e in asked if e in set(answered)]
        if answered != expected:
            bad.append(room_id)
    return bad


def figures(
    scenario: str,
    sent: Sequence[Sent],
    timelines: dict[RoomID, list[RoomEvent]],
    bot: str,
    *,
    fault_ends: Sequence[float] = (),
    notes: dict[str, Any] | None = None,
) -> Figures:
    """Count, from the rooms as the server has them, how each sent message was answered."""
    replies = replies_by_target(timelines, bot)
    counts = [len(replies.get(s.event_id, [])) for s in sent]
    first_answer = {
        target: min(e.origin_server_ts for e in events) / 1000 for target, events in replies.items()
    }
    recover = None
    for end in fault_ends:
        # Back in service: the backlog answered, and the first message after the fault too.
        backlog = [s for s in sent if s.at < end]
        backlog.extend(next(([s] for s in sent if s.at >= end), []))
        times = [first_answer[s.event_id] for s in backlog if s.event_id in first_answer]
        took = max(0.0, max(times, default=end) - end)
        recover = took if recover is None else max(recover, took)
    stray = sum(
        len(events)
        for target, events in replies.items()
        if target not in {s.event_id for s in sent}
    )
    return Figures(
        scenario,
        sent=len(sent),
        answered_once=sum(1 for c in counts if c == 1),
        lost=sum(1 for c in counts if c == 0),
        duplicated=sum(1 for c in counts if c > 1),
        recover_s=recover,
        notes=dict(notes or {}),
        details={
            "order_violations": order_violations(sent, timelines, bot),
            "replies_to_others": stray,
            "lost_ids": [s.event_id for s, c in zip(sent, counts, strict=True) if c == 0],
        },
    )


# --- the store, read from outside -----------------------------------------------------


@dataclass(frozen=True)
class StoreView:
    handled: dict[str, str]  # event id -> outcome
    inbox: list[str]
    sync_token: str | None
    integrity: str


def read_store(path: Path) -> StoreView:
    """What a stopped bot left in its store (read-only)."""
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        (integrity,) = db.execute("PRAGMA quick_check").fetchone()
        handled = dict(
            db.execute("SELECT event_id, outcome FROM events WHERE outcome IS NOT NULL").fetchall()
        )
        inbox = [
            row[0]
            for row in db.execute("SELECT event_id FROM events WHERE outcome IS NULL ORDER BY seq")
        ]
        token = db.execute("SELECT value FROM meta WHERE key = 'sync_token'").fetchone()
    finally:
        db.close()
    return StoreView(handled, inbox, token[0] if token else None, integrity)


# --- the fault-injecting proxy --------------------------------------------------------

FaultKind = Literal[
    "truncate", "wrong_types", "bad_events", "slow", "reset", "html_502", "rewrite", "limit"
]
FAULT_KINDS: tuple[FaultKind, ...] = (
    "truncate",
    "wrong_types",
    "bad_events",
    "slow",
    "reset",
    "html_502",
)

_HTML_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host"}
)
_NOT_FORWARDED = _HOP_BY_HOP | {"accept-encoding"}


@dataclass
class Fault:
    """One way to spoil the answers to matching requests.

    ``path`` is a regular expression searched in the request path; ``when`` (if
    given) looks at the decoded upstream answer and says whether to spoil this one.
    ``times`` answers are spoiled (None: until disarmed). A ``limit`` fault answers
    429 (``M_LIMIT_EXCEEDED``, ``Retry-After: retry_after_s``) in the homeserver's
    place: the request is not forwarded, as a real rate limit would refuse it.
    """

    kind: FaultKind
    method: str = "GET"
    path: str = r"/sync$"
    when: Callable[[Any], bool] | None = None
    times: int | None = 1
    delay_s: float = 3.0
    rewrite: Callable[[bytes], bytes] | None = None
    retry_after_s: int = 3
    applied: int = 0

    def wants(self, method: str, path: str) -> bool:
        return (
            (self.times is None or self.applied < self.times)
            and method == self.method
            and re.search(self.path, path) is not None
        )


@dataclass(frozen=True)
class Exchange:
    """One request through the proxy, on trio's clock."""

    method: str
    path: str
    received: float
    answered: float
    status: int | None  # None: the connection was dropped
    retry_after_header: float | None
    retry_after_ms: int | None
    fault: str | None

    @property
    def retry_after(self) -> float | None:
        """What the client must wait: the header when there is one (it wins), else the body."""
        if self.retry_after_header is not None:
            return self.retry_after_header
        return self.retry_after_ms / 1000 if self.retry_after_ms is not None else None


@dataclass(frozen=True)
class _Request:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def wants_close(self) -> bool:
        return any(k.lower() == "connection" and v.lower() == "close" for k, v in self.headers)


class _RequestReader:
    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def _fill(self) -> bool:
        try:
            data = await self._stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        self._buffer += data
        return bool(data)

    async def next(self) -> _Request | None:
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            if len(self._buffer) > 65536 or not await self._fill():
                return None
        head = bytes(self._buffer[:end]).decode("latin-1")
        del self._buffer[: end + 4]
        request_line, *lines = head.split("\r\n")
        method, target, _ = request_line.split(" ", 2)
        headers = [(n.strip(), v.strip()) for n, _, v in (line.partition(":") for line in lines)]
        length = int(next((v for k, v in headers if k.lower() == "content-length"), "0"))
        while len(self._buffer) < length:
            if not await self._fill():
                return None
        body = bytes(self._buffer[:length])
        del self._buffer[:length]
        return _Request(method, target, headers, body)


def _head(status: int, reason: str, headers: Iterable[tuple[str, str]], length: int) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _reset(stream: trio.SocketStream) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashing peer does."""
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def carries_timeline(doc: Any) -> bool:
    """A /sync answer with at least one timeline event in a joined room."""
    if not isinstance(doc, dict):
        return False
    joined = doc.get("rooms", {}).get("join", {})
    return any(room.get("timeline", {}).get("events") for room in joined.values())


def _with_bad_events(body: bytes) -> bytes:
    """Malformed and wrongly typed events among the good ones, and a room that is a list."""
    doc = json.loads(body)
    for room in doc.get("rooms", {}).get("join", {}).values():
        events = room.get("timeline", {}).get("events")
        if not events:
            continue
        sender = events[0].get("sender", "@someone:localhost")
        events.insert(
            len(events) // 2,
            {
                "type": "m.room.message",
                "event_id": "$fault-content-is-a-string",
                "sender": sender,
                "origin_server_ts": 1,
                "content": "<b>not an object</b>",
            },
        )
        events.insert(
            0,
            {
                "type": "m.room.message",
                "event_id": "$fault-wrong-types",
                "sender": sender,
                "origin_server_ts": "yesterday",
                "content": {"msgtype": "m.text", "body": ["not", "a", "string"]},
            },
        )
        events.append({"no": "type, no id, nothing"})
        break
    doc.setdefault("rooms", {}).setdefault("join", {})["!fault-room:localhost"] = ["a list"]
    return json.dumps(doc).encode()


def _wrong_types(body: bytes) -> bytes:
    del body
    return json.dumps({"next_batch": 42, "rooms": ["not", "an", "object"]}).encode()


class FaultProxy:
    """HTTP/1.1 on 127.0.0.1 in front of one homeserver; open with `open_fault_proxy`.

    Requests are forwarded whole (the bot's keep-alive connections are kept), each
    exchange is recorded in `exchanges`, and armed `Fault`\\ s spoil the answers they
    match. The proxy keeps no header values: tokens never reach its records.
    """

    def __init__(self, upstream: str, http: httpx.AsyncClient) -> None:
        self.upstream = upstream.rstrip("/")
        self.url = ""
        self.exchanges: list[Exchange] = []
        self.faults: list[Fault] = []
        self._in_flight: Counter[tuple[str, str]] = Counter()
        self._http = http
        self._moved = trio.Event()
        self.delivered: set[str] = set()
        """Event ids the proxy has seen in /sync answers (before any fault spoiled them)."""
        self.targets: list[str] = []
        """Every request line's target (path and query), to scan for secrets."""

    def arm(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    def disarm(self, fault: Fault) -> None:
        with contextlib.suppress(ValueError):
            self.faults.remove(fault)

    def in_flight(self, method: str, path: str) -> int:
        """Requests being answered right now whose path matches ``path`` (a regex)."""
        return sum(n for (m, p), n in self._in_flight.items() if m == method and re.search(path, p))

    async def wait_until(self, condition: Callable[[], bool], *, timeout: float = 60.0) -> None:
        """Wait until ``condition()`` holds; it is checked whenever traffic moves."""
        with trio.fail_after(timeout):
            while not condition():
                await self._moved.wait()

    async def wait_applied(self, fault: Fault, count: int = 1, *, timeout: float = 60.0) -> None:
        await self.wait_until(lambda: fault.applied >= count, timeout=timeout)

    def _notify(self) -> None:
        self._moved.set()
        self._moved = trio.Event()

    def _note_delivered(self, body: bytes) -> None:
        doc = _json_or_none(body)
        if not isinstance(doc, dict):
            return
        for room in doc.get("rooms", {}).get("join", {}).values():
            for event in room.get("timeline", {}).get("events", []):
                if isinstance(event, dict) and isinstance(event.get("event_id"), str):
                    self.delivered.add(event["event_id"])

    def _pick(self, method: str, path: str, body: bytes) -> Fault | None:
        doc: Any = None
        parsed = False
        for fault in self.faults:
            if fault.kind == "limit" or not fault.wants(method, path):
                continue
            if fault.when is not None:
                if not parsed:
                    doc, parsed = _json_or_none(body), True
                if not fault.when(doc):
                    continue
            fault.applied += 1
            self._notify()
            return fault
        return None

    async def handle(self, stream: trio.SocketStream) -> None:
        reader = _RequestReader(stream)
        try:
            while True:
                request = await reader.next()
                if request is None or not await self._exchange(stream, request):
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the client went away (killed, or cancelled its request)
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _exchange(self, stream: trio.SocketStream, request: _Request) -> bool:
        """Answer one request; False when the connection must not be used again."""
        path = request.target.partition("?")[0]
        self.targets.append(request.target)
        received = trio.current_time()
        key = (request.method, path)
        self._in_flight[key] += 1
        self._notify()
        try:
            limit = next(
                (f for f in self.faults if f.kind == "limit" and f.wants(request.method, path)),
                None,
            )
            if limit is not None:
                limit.applied += 1
                self._notify()
                body = json.dumps(
                    {
                        "errcode": "M_LIMIT_EXCEEDED",
                        "error": "Too Many Requests",
                        "retry_after_ms": limit.retry_after_s * 1000,
                    }
                ).encode()
                headers = [
                    ("Content-Type", "application/json"),
                    ("Retry-After", str(limit.retry_after_s)),
                ]
                await stream.send_all(_head(429, "Too Many Requests", headers, len(body)) + body)
                self._record(request.method, path, received, 429, headers, body, "limit")
                return not request.wants_close
            try:
                upstream = await self._http.request(
                    request.method,
                    self.upstream + request.target,
                    headers=[(k, v) for k, v in request.headers if k.lower() not in _NOT_FORWARDED],
                    content=request.body,
                )
            except httpx.TransportError:
                self._record(request.method, path, received, None, [], b"", "upstream_down")
                await _reset(stream)
                return False
            status, reason = upstream.status_code, upstream.reason_phrase
            headers = [(k, v) for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP]
            body = upstream.content
            if status == 200 and path.endswith("/sync"):
                self._note_delivered(body)
            fault = self._pick(request.method, path, body)
            kind = fault.kind if fault is not None else None
            if fault is not None:
                if fault.kind == "slow":
                    await trio.sleep(fault.delay_s)
                elif fault.kind == "truncate":
                    body = body[: len(body) // 2]
                elif fault.kind == "wrong_types":
                    body = _wrong_types(body)
                elif fault.kind == "bad_events":
                    body = _with_bad_events(body)
                elif fault.kind == "rewrite" and fault.rewrite is not None:
                    body = fault.rewrite(body)
                elif fault.kind == "html_502":
                    status, reason, body = 502, "Bad Gateway", _HTML_502
                    headers = [("Content-Type", "text/html"), ("Server", "nginx")]
                elif fault.kind == "reset":
                    await stream.send_all(_head(status, reason, headers, len(body)))
                    await stream.send_all(body[: len(body) // 2])
                    self._record(request.method, path, received, None, headers, body, kind)
                    await _reset(stream)
                    return False
            await stream.send_all(_head(status, reason, headers, len(body)) + body)
            self._record(request.method, path, received, status, headers, body, kind)
            return not request.wants_close
        finally:
            self._in_flight[key] -= 1
            self._notify()

    def _record(
        self,
        method: str,
        path: str,
        received: float,
        status: int | None,
        headers: list[tuple[str, str]],
        body: bytes,
        fault: str | None,
    ) -> None:
        header = next((v for k, v in headers if k.lower() == "retry-after"), None)
        retry_ms = None
        if status == 429:
            doc = _json_or_none(body)
            if isinstance(doc, dict) and isinstance(doc.get("retry_after_ms"), int):
                retry_ms = doc["retry_after_ms"]
        self.exchanges.append(
            Exchange(
                method,
                path,
                received,
                trio.current_time(),
                status,
                float(header) if header is not None and header.isdigit() else None,
                retry_ms,
                fault,
            )
        )


@asynccontextmanager
async def open_fault_proxy(upstream: str) -> AsyncIterator[FaultProxy]:
    """A `FaultProxy` listening on 127.0.0.1 for the body of the block."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), follow_redirects=False) as http:
        proxy = FaultProxy(upstream, http)
        async with background() as nursery:
            listeners = await nursery.start(
                partial(trio.serve_tcp, proxy.handle, 0, host="127.0.0.1")
            )
            port = listeners[0].socket.getsockname()[1]
            proxy.url = f"http://127.0.0.1:{port}"
            yield proxy


# --- scenario set-up shared by the runners ---------------------------------------------


@dataclass
class Stage:
    """A bot user, an owner, the chats between them, and the clients to drive them."""

    homeserver: str
    bot_user: RegisteredUser
    owner: RegisteredUser
    rooms: list[RoomID]
    sender: MatrixClient
    observer: MatrixClient
    traffic: Traffic


async def stage(
    lab: FaultLab,
    hs: SynapseServer,
    *,
    rooms: int,
    bot_user: RegisteredUser | None = None,
    owner: RegisteredUser | None = None,
    homeserver: str | None = None,
) -> Stage:
    homeserver = homeserver or hs.base_url
    bot_user = bot_user or await lab.user(hs, "bot")
    owner = owner or await lab.user(hs, "owner")
    room_ids = await managed_rooms(hs.base_url, [bot_user], owner, rooms)
    return Stage(
        homeserver,
        bot_user,
        owner,
        room_ids,
        lab.client(hs.base_url, owner),
        lab.client(hs.base_url, owner),
        Traffic([bot_user.user_id]),
    )


def _failed_attempts(bot: BotProcess, start: float, end: float) -> list[dict[str, Any]]:
    """Log records that stand for one failed request each, between two wall times."""
    names = {"matrix_request_retry", "sync_failed", "job_retry_later", "read_receipt_failed"}
    return [r for r in bot.records() if r.get("event") in names and start <= r["_t"] <= end]


# --- 1 and 10: crash and quick restart --------------------------------------------------


async def run_restarts(
    lab: FaultLab,
    hs: SynapseServer,
    *,
    scenario: str,
    how: Literal["kill", "term"],
    messages: int,
    rate: float,
    rooms: int = 4,
    faults: int = 3,
    settle_s: float = 2.0,
) -> Figures:
    """Stream ``messages`` over ``rooms``; stop the bot ``faults`` times at seeded random
    moments (kill -9, or SIGTERM) and start it again at once each time."""
    s = await stage(lab, hs, rooms=rooms)
    bot = lab.bot(s.homeserver, s.bot_user.user_id, access_token=s.bot_user.access_token)
    await bot.start()
    await bot.wait_ready()
    duration = messages / rate
    # One seeded moment in each of ``faults`` equal slices of the stream's middle 90 %.
    slice_s = 0.9 * duration / faults
    moments = [
        (0.05 + i * 0.9 / faults) * duration + lab.rng.uniform(0, slice_s) for i in range(faults)
    ]
    print(f"{scenario}: {how} at {[round(m, 2) for m in moments]} s of {duration:.0f} s")
    fault_ends: list[float] = []
    exit_codes: list[int] = []
    async with background(partial(s.traffic.collect, s.observer)):
        started = trio.current_time()

        async def chaos() -> None:
            for moment in moments:
                await trio.sleep_until(started + moment)
                if how == "kill":
                    await bot.kill()
                else:
                    exit_codes.append(await bot.terminate())
                await bot.start()
                fault_ends.append(time.time())

        await together(chaos, partial(s.traffic.stream, s.sender, s.rooms, messages, rate))
        window = trio.current_time() - started
        await bot.wait_ready()
        await s.traffic.wait_answered(timeout=120 + messages)
        await trio.sleep(settle_s)
    timelines = await audit(s.observer, s.rooms)
    result = figures(
        scenario,
        s.traffic.sent,
        timelines,
        bot.user_id,
        fault_ends=fault_ends,
        notes={"seed": lab.seed, how: faults, "window_s": round(window, 1)},
    )
    result.details.update(exit_codes=exit_codes, window_s=window, bot=bot)
    return result


# --- 2: homeserver outage --------------------------------------------------------------


async def run_outage(
    lab: FaultLab,
    hs: SynapseServer,
    *,
    messages: int,
    rate: float,
    outage_s: float,
    settle_s: float = 2.0,
) -> Figures:
    """Stop Synapse for ``outage_s`` (or more) mid-stream; the bot must ride it out."""
    s = await stage(lab, hs, rooms=2)
    bot = lab.bot(s.homeserver, s.bot_user.user_id, access_token=s.bot_user.access_token)
    await bot.start()
    await bot.wait_ready()
    base_url = hs.base_url
    window: dict[str, float] = {}
    async with background(partial(s.traffic.collect, s.observer)):
        started = trio.current_time()

        async def outage() -> None:
            await trio.sleep_until(started + 0.3 * messages / rate)
            window["down"] = time.time()
            await trio.to_thread.run_sync(hs.stop)
            await trio.sleep(max(0.0, outage_s - (time.time() - window["down"])))
            window["starting"] = time.time()
            await trio.to_thread.run_sync(hs.start)
            window["up"] = time.time()
            assert bot.running, f"the bot died during the outage:\n{bot.tail()}"

        await together(outage, partial(s.traffic.stream, s.sender, s.rooms, messages, rate))
        assert hs.base_url == base_url, "Synapse came back on another port"
        await s.traffic.wait_answered(timeout=180)
        await trio.sleep(settle_s)
    timelines = await audit(s.observer, s.rooms)
    attempts = _failed_attempts(bot, window["down"], window["starting"])
    down_s = window["starting"] - window["down"]
    sync_delays = [
        r["retry_in_s"]
        for r in bot.events("sync_failed")
        if window["down"] <= r["_t"] <= window["up"]
    ]
    result = figures(
        "2 outage",
        s.traffic.sent,
        timelines,
        bot.user_id,
        fault_ends=[window["up"]],
        notes={
            "down_s": round(window["up"] - window["down"], 1),
            "failed_requests": len(attempts),
            "per_s": round(len(attempts) / down_s, 2),
            "max_sync_backoff_s": max(sync_delays, default=0),
        },
    )
    result.details.update(bot=bot, attempts=attempts, down_s=down_s, sync_delays=sync_delays)
    return result


# --- 3: rate limits --------------------------------------------------------------------


async def exempt_from_rate_limits(hs: SynapseServer, admin: RegisteredUser, user_id: str) -> None:
    await admin_request(
        hs.base_url,
        admin,
        "POST",
        f"/_synapse/admin/v1/users/{user_path(user_id)}/override_ratelimit",
        {"messages_per_second": 0, "burst_count": 0},
    )


def early_retries(exchanges: Sequence[Exchange], *, tolerance: float = 0.01) -> list[str]:
    """Requests sent again before the Retry-After of the 429 their last try got."""
    found = []
    for index, limited in enumerate(exchanges):
        wait = limited.retry_after
        if limited.status != 429 or wait is None:
            continue
        retry = next(
            (
                e
                for e in exchanges[index + 1 :]
                if e.method == limited.method
                and e.path == limited.path
                and e.received > limited.received
            ),
            None,
        )
        if retry is not None and retry.received < limited.answered + wait - tolerance:
            found.append(
                f"{limited.method} {limited.path}: again after "
                f"{retry.received - limited.answered:.2f} s, asked to wait {wait:.2f} s"
            )
    return found


def requests_inside_retry_after(
    exchanges: Sequence[Exchange], path: str, *, tolerance: float = 0.01
) -> int:
    """Requests to ``path`` (a regex) sent while an earlier 429 there still said wait."""
    limits = [
        (e.answered, e.answered + e.retry_after)
        for e in exchanges
        if e.status == 429 and e.retry_after is not None and re.search(path, e.path)
    ]
    return sum(
        1
        for e in exchanges
        if re.search(path, e.path)
        and any(start < e.received < end - tolerance for start, end in limits)
    )


async def run_rate_limits(
    lab: FaultLab, strict: SynapseServer, *, messages: int, settle_s: float = 2.0
) -> Figures:
    """A burst over 3 rooms on Synapse's default ``rc_*`` limits; the bot is not exempt
    (its sender is, so the burst really is one). Every exchange goes through the proxy."""
    admin = await lab.user(strict, "admin", admin=True)
    owner = await lab.user(strict, "owner")
    await exempt_from_rate_limits(strict, admin, owner.user_id)
    async with lab.proxy(strict.base_url) as proxy:
        s = await stage(lab, strict, rooms=3, owner=owner, homeserver=proxy.url)
        bot = lab.bot(proxy.url, s.bot_user.user_id, access_token=s.bot_user.access_token)
        await bot.start()
        await bot.wait_ready()
        async with background(partial(s.traffic.collect, s.observer)):
            burst_started = time.time()
            await s.traffic.stream(s.sender, s.rooms, messages, None, label="burst")
            burst_s = time.time() - burst_started
            await s.traffic.wait_answered(timeout=60 + 6 * messages)
            await trio.sleep(settle_s)
        await bot.stop()  # before its proxy goes away
        exchanges = list(proxy.exchanges)
    timelines = await audit(s.observer, s.rooms)
    limited = [e for e in exchanges if e.status == 429]
    early = early_retries(exchanges)
    crowding = requests_inside_retry_after(exchanges, r"/send/")
    result = figures(
        "3 rate limits",
        s.traffic.sent,
        timelines,
        bot.user_id,
        fault_ends=[burst_started + burst_s],
        notes={
            "burst_s": round(burst_s, 1),
            "429s": len(limited),
            "early_retries": len(early),
            "sends_inside_retry_after": crowding,
        },
    )
    result.details.update(bot=bot, early=early, limited=limited, exchanges=exchanges)
    return result


async def run_long_rate_limit(
    lab: FaultLab, hs: SynapseServer, *, limited: int = 5, retry_after_s: int = 3
) -> Figures:
    """The bot's reply is refused with 429 (``Retry-After: retry_after_s``) ``limited``
    times in a row, more than the client's own attempts; it must still never be sent
    again before the Retry-After of the refusal before it."""
    async with lab.proxy(hs.base_url) as proxy:
        s = await stage(lab, hs, rooms=1, homeserver=proxy.url)
        bot = lab.bot(proxy.url, s.bot_user.user_id, access_token=s.bot_user.access_token)
        await bot.start()
        await bot.wait_ready()
        limit = proxy.arm(
            Fault(
                "limit",
                method="PUT",
                path=r"/send/m\.room\.message/",
                times=limited,
                retry_after_s=retry_after_s,
            )
        )
        async with background(partial(s.traffic.collect, s.observer)):
            await s.traffic.send(s.sender, s.rooms[0], "answer me, eventually")
            await s.traffic.wait_answered(timeout=60 + limited * retry_after_s)
            await trio.sleep(1.0)
        await bot.stop()  # before its proxy goes away
        exchanges = list(proxy.exchanges)
    timelines = await audit(s.observer, s.rooms)
    early = early_retries(exchanges)
    result = figures(
        "3 long rate limit",
        s.traffic.sent,
        timelines,
        bot.user_id,
        notes={"429s": limit.applied, "early_retries": len(early)},
    )
    result.details.update(bot=bot, early=early, exchanges=exchanges)
    return result


# --- 4: gaps -----------------------------------------------------------------------------


async def run_gap_while_down(
    lab: FaultLab, hs: SynapseServer, *, messages: int, settle_s: float = 2.0
) -> Figures:
    """``messages`` in one room while the bot is stopped (more than a /sync timeline
    holds); after the restart all answered once, in order."""
    s = await stage(lab, hs, rooms=1)
    bot = lab.bot(s.homeserver, s.bot_user.user_id, access_token=s.bot_user.access_token)
    await bot.start()
    await bot.wait_ready()
    assert await bot.terminate() == 0
    await s.traffic.stream(s.sender, s.rooms, messages, None, label="missed")
    async with background(partial(s.traffic.collect, s.observer)):
        restarted = time.time()
        await bot.start()
        await s.traffic.wait_answered(timeout=60 + messages)
        await trio.sleep(settle_s)
    timelines = await audit(s.observer, s.rooms)
    filled = bot.events("sync_gap_filled")
    result = figures(
        "4 gap (bot down)",
        s.traffic.sent,
        timelines,
        bot.user_id,
        fault_ends=[restarted],
        notes={"gap_filled_events": sum(r.get("events", 0) for r in filled)},
    )
    result.details.update(bot=bot, gap_filled=filled)
    return result


async def run_gap_while_busy(
    lab: FaultLab, hs: SynapseServer, *, per_sender: int, senders: int = 4, settle_s: float = 2.0
) -> Figures:
    """``senders`` people each writing ``per_sender`` messages back to back into their
    own room, all at once, faster than the bot replies."""
    bot_user = await lab.user(hs, "bot")
    owner = await lab.user(hs, "owner")
    people = [await lab.user(hs, f"sender{i}") for i in range(senders)]
    rooms = await managed_rooms(hs.base_url, [bot_user], owner, senders, members=people)
    bot = lab.bot(hs.base_url, bot_user.user_id, access_token=bot_user.access_token)
    await bot.start()
    await bot.wait_ready()
    traffic = Traffic([bot_user.user_id])
    clients = [lab.client(hs.base_url, p) for p in people]
    async with background(partial(traffic.collect, lab.client(hs.base_url, owner))):
        started = time.time()
        await together(
            *(
                partial(traffic.stream, client, [room], per_sender, None, label=f"from {i}")
                for i, (client, room) in enumerate(zip(clients, rooms, strict=True))
            )
        )
        sent_s = time.time() - started
        await traffic.wait_answered(timeout=60 + senders * per_sender)
        answered_s = time.time() - started
        await trio.sleep(settle_s)
    timelines = await audit(lab.client(hs.base_url, owner), rooms)
    result = figures(
        "4 gap (busy, 4 senders)",
        traffic.sent,
        timelines,
        bot.user_id,
        fault_ends=[started + sent_s],
        notes={
            "send_rate": round(len(traffic.sent) / sent_s, 1),
            "answer_rate": round(len(traffic.sent) / answered_s, 1),
            "gap_fills": len(bot.events("sync_gap_filled")),
        },
    )
    result.details.update(bot=bot)
    return result


# --- 5: lost token -----------------------------------------------------------------------

DEVICE_ID = "FAULTBOT"


async def run_lost_token_with_password(
    lab: FaultLab, hs: SynapseServer, *, messages: int, rate: float, settle_s: float = 2.0
) -> Figures:
    """The bot has a token, a password and a fixed device id. Mid-stream its token
    expires (``soft_logout``), later its device is deleted by an admin (a hard logout):
    each time it logs in again with the same device id and carries on."""
    admin = await lab.user(hs, "admin", admin=True)
    password = f"pw-{uuid.uuid4().hex}"
    bot_user = await lab.user(hs, "bot", password=password)
    s = await stage(lab, hs, rooms=2, bot_user=bot_user)
    duration = messages / rate
    # A token that expires a third of the way through the stream: soft_logout.
    response = await admin_request(
        hs.base_url,
        admin,
        "POST",
        f"/_synapse/admin/v1/users/{user_path(bot_user.user_id)}/login",
        {"valid_until_ms": int((time.time() + 4.0 + duration / 3) * 1000)},
    )
    expiring = response.json()["access_token"]
    lab.remember_secret(expiring)
    bot = lab.bot(
        s.homeserver,
        bot_user.user_id,
        access_token=expiring,
        password=password,
        device_id=DEVICE_ID,
    )
    await bot.start()
    await bot.wait_ready()
    renewed: list[float] = []
    async with background(partial(s.traffic.collect, s.observer)):
        started = trio.current_time()

        async def invalidate() -> None:
            await bot.wait_for("logged_in", timeout=duration + 30)
            renewed.append(time.time())
            await trio.sleep_until(started + 2 * duration / 3)
            await admin_request(
                hs.base_url,
                admin,
                "DELETE",
                f"/_synapse/admin/v2/users/{user_path(bot_user.user_id)}/devices/{DEVICE_ID}",
            )
            await bot.wait_for("logged_in", count=2, timeout=60)
            renewed.append(time.time())

        await together(invalidate, partial(s.traffic.stream, s.sender, s.rooms, messages, rate))
        await s.traffic.wait_answered(timeout=120)
        await trio.sleep(settle_s)
    timelines = await audit(s.observer, s.rooms)
    rejected = bot.events("token_invalidated")
    logins = bot.events("logged_in")
    result = figures(
        "5 lost token (password)",
        s.traffic.sent,
        timelines,
        bot.user_id,
        fault_ends=renewed,
        notes={
            "soft_logout": [r.get("soft_logout") for r in rejected],
            "relogins": len(logins),
            "devices": sorted({r.get("device_id") for r in logins}),
        },
    )
    result.details.update(bot=bot, rejected=rejected, logins=logins)
    return result


async def run_lost_token_without_password(
    lab: FaultLab, hs: SynapseServer, *, messages: int = 3
) -> Figures:
    """The bot has only an access token, which is logged out while it runs: it must
    exit non-zero with a clear message, its store intact; a restart with a new token
    then answers what came in meanwhile."""
    password = f"pw-{uuid.uuid4().hex}"
    bot_user = await lab.user(hs, "bot", password=password)
    s = await stage(lab, hs, rooms=1, bot_user=bot_user)
    session = lab.client(hs.base_url)
    login = await session.login_password(bot_user.user_id, password, device_id="ONLYTOKEN")
    lab.remember_secret(login.access_token)
    bot = lab.bot(s.homeserver, bot_user.user_id, access_token=login.access_token)
    await bot.start()
    await bot.wait_ready()
    async with background(partial(s.traffic.collect, s.observer)):
        await s.traffic.stream(s.sender, s.rooms, messages, None, label="before")
        await s.traffic.wait_answered(timeout=60)
        await session.logout()
        logged_out = time.time()
        after = await s.traffic.send(s.sender, s.rooms[0], "after the logout")
        code = await bot.wait_exit(timeout=90)
        exited_s = time.time() - logged_out
        view = read_store(bot.store_path)
        # An operator gives it a new token: nothing was lost.
        fresh = await session.login_password(bot_user.user_id, password, device_id="ONLYTOKEN")
        lab.remember_secret(fresh.access_token)
        bot.env["MATRIX_ACCESS_TOKEN"] = fresh.access_token
        restarted = time.time()
        await bot.start()
        await s.traffic.wait_answered([after], timeout=60)
        await trio.sleep(1.0)
    timelines = await audit(s.observer, s.rooms)
    fatal = bot.events("fatal", run=1)
    result = figures(
        "5 lost token (no password)",
        s.traffic.sent,
        timelines,
        bot.user_id,
        fault_ends=[restarted],
        notes={"exit_code": code, "exited_after_s": round(exited_s, 1)},
    )
    result.details.update(bot=bot, code=code, fatal=fatal, store=view, before=s.traffic.sent[:-1])
    return result


# --- 6: hostile server answers -------------------------------------------------------------


async def run_hostile_server(
    lab: FaultLab, hs: SynapseServer, *, rounds: int, settle_s: float = 2.0
) -> Figures:
    """Each round spoils, once each, the /sync answer that carries a new message:
    truncated JSON, wrong types, malformed events among good ones, a slow answer, a
    reset mid-answer, an HTML 502 page. Every message must still be answered once."""
    async with lab.proxy(hs.base_url) as proxy:
        s = await stage(lab, hs, rooms=2, homeserver=proxy.url)
        bot = lab.bot(proxy.url, s.bot_user.user_id, access_token=s.bot_user.access_token)
        await bot.start()
        await bot.wait_ready()
        applied: Counter[str] = Counter()
        async with background(partial(s.traffic.collect, s.observer)):
            for round_number in range(rounds):
                for index, kind in enumerate(FAULT_KINDS):
                    fault = proxy.arm(Fault(kind, when=carries_timeline, delay_s=4.0))
                    room = s.rooms[index % len(s.rooms)]
                    asked = await s.traffic.send(s.sender, room, f"round {round_number} {kind}")
                    await proxy.wait_applied(fault, timeout=60)
                    await s.traffic.wait_answered([asked], timeout=60)
                    applied[kind] += fault.applied
                    proxy.disarm(fault)
            await trio.sleep(settle_s)
            alive = bot.running
        await bot.stop()  # before its proxy goes away
    timelines = await audit(s.observer, s.rooms)
    skipped = bot.events("sync_events_skipped")
    failed = bot.events("sync_failed")
    retried = bot.events("matrix_request_retry")
    result = figures(
        "6 hostile server",
        s.traffic.sent,
        timelines,
        bot.user_id,
        notes={
            "spoiled": sum(applied.values()),
            "sync_failed": len(failed),
            "retried": len(retried),
            "skip_logs": len(skipped),
        },
    )
    result.details.update(
        bot=bot, alive=alive, skipped=skipped, failed=failed, retried=retried, applied=applied
    )
    return result


def lone_surrogate_rewrite(marker: str) -> Callable[[bytes], bytes]:
    """Put a lone surrogate escape (``\\ud800``) into the body of the message ``marker``."""
    needle = marker.encode()

    def rewrite(body: bytes) -> bytes:
        return body.replace(needle, needle + rb" \ud800 lone")

    return rewrite


async def run_poisoned_event(lab: FaultLab, hs: SynapseServer) -> Figures:
    """One message whose body carries a lone surrogate escape, in every answer that
    carries it (/sync and /messages), followed by ordinary ones in two rooms. The one
    event cannot be decoded; everything after it must still be answered."""
    marker = f"poison-{uuid.uuid4().hex[:8]}"
    async with lab.proxy(hs.base_url) as proxy:
        s = await stage(lab, hs, rooms=2, homeserver=proxy.url)
        proxy.arm(
            Fault(
                "rewrite",
                path=r"/sync$|/messages$",
                when=lambda doc: doc is not None,
                times=None,
                rewrite=lone_surrogate_rewrite(marker),
            )
        )
        bot = lab.bot(proxy.url, s.bot_user.user_id, access_token=s.bot_user.access_token)
        await bot.start()
        await bot.wait_ready()
        async with background(partial(s.traffic.collect, s.observer)):
            await s.traffic.send(s.sender, s.rooms[0], marker)
            after = [
                await s.traffic.send(s.sender, room, f"after the poison {i}")
                for i, room in enumerate(s.rooms)
            ]
            try:
                waited: float | None = await s.traffic.wait_answered(after, timeout=10)
            except AssertionError:
                waited = None
            alive = bot.running
        await bot.stop()  # before its proxy goes away
    timelines = await audit(s.observer, s.rooms)
    ordinary = [x for x in s.traffic.sent if x.event_id in after]
    result = figures(
        "sec: lone surrogate",
        ordinary,
        timelines,
        bot.user_id,
        notes={
            "sync_failed": len(bot.events("sync_failed")),
            "skip_logs": len(bot.events("sync_events_skipped")),
        },
    )
    result.details.update(bot=bot, waited=waited, alive=alive)
    return result


# --- 7: backend failures (in-process bot) ---------------------------------------------------


class FlakyBackend:
    """A backend that misbehaves on purpose, by message body:

    ``raise``: raises a plain error every time; ``refuse``: raises `BackendError`;
    ``hang``: never answers; ``flaky``: raises on the first call, answers the second.
    Anything else is echoed.
    """

    name = "flaky"

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    async def reply(self, chat: Chat, message: IncomingMessage) -> str:
        del chat
        self.calls[message.body] += 1
        kind = message.body.split(" ", 1)[0]
        if kind == "raise":
            raise RuntimeError("the backend exploded")
        if kind == "refuse":
            raise BackendError("upstream 503", user_message="The assistant is unavailable.")
        if kind == "hang":
            await trio.sleep_forever()
        if kind == "flaky" and self.calls[message.body] == 1:
            raise RuntimeError("a passing hiccup")
        return f"echo: {message.body}"


@asynccontextmanager
async def in_process_bot(settings: Settings, backend: FlakyBackend) -> AsyncIterator[BotRuntime]:
    """`run_bot` in this process for the body of the block, then a graceful stop."""
    try:
        async with trio.open_nursery() as nursery:
            runtime: BotRuntime = await nursery.start(partial(run_bot, settings, backend=backend))
            try:
                yield runtime
            finally:
                runtime.request_stop()
    except BaseExceptionGroup as group:
        raise _sole(group) from None


BACKEND_TIMEOUT_SETTING = "backend_timeout_s"
"""The setting a backend timeout is expected under (not in `Settings` yet: see the issue)."""


async def run_backend_failures(
    lab: FaultLab,
    hs: SynapseServer,
    *,
    kinds: Sequence[str] = ("raise", "refuse", "flaky"),
    hang_patience_s: float = 10.0,
    scenario: str = "7 backend failures",
) -> Figures:
    """Messages whose backend call raises, refuses, hiccups (or hangs), in one room of
    an in-process bot; then an ordinary message to show the room still works."""
    s = await stage(lab, hs, rooms=1)
    backend = FlakyBackend()
    settings = Settings(
        homeserver=hs.base_url,
        user_id=s.bot_user.user_id,
        access_token=s.bot_user.access_token,
        store_path=lab.workdir / f"backend-{uuid.uuid4().hex[:8]}.sqlite3",
        allowed=AllowList(servers=frozenset({hs.server_name})),
        workers=2,
        drain_timeout_s=1.0,
    )
    timeout_supported = BACKEND_TIMEOUT_SETTING in Settings.__dataclass_fields__
    if timeout_supported:
        settings = replace(settings, **{BACKEND_TIMEOUT_SETTING: 2.0})
    patience = 60.0 if timeout_supported else hang_patience_s
    outcomes: dict[str, str | None] = {}
    asked: dict[str, EventID] = {}
    with capture_logs() as logs:
        async with (
            in_process_bot(settings, backend) as runtime,
            background(partial(s.traffic.collect, s.observer)),
        ):
            for kind in kinds:
                asked[kind] = await s.traffic.send(s.sender, s.rooms[0], f"{kind} please")
                wait = patience if kind == "hang" else 60.0
                with contextlib.suppress(AssertionError):
                    await s.traffic.wait_answered([asked[kind]], timeout=wait)
            asked["after"] = await s.traffic.send(s.sender, s.rooms[0], "after the failures")
            with contextlib.suppress(AssertionError):
                await s.traffic.wait_answered([asked["after"]], timeout=patience)
            await trio.sleep(1.0)
            for kind, event_id in asked.items():
                outcomes[kind] = await runtime._store.handled_outcome(event_id)
    lab.captured.append(repr(logs))
    timelines = await audit(s.observer, s.rooms)
    notices = {
        kind: [a.content.get("body") for a in s.traffic.answers_to(event_id)]
        for kind, event_id in asked.items()
    }
    result = figures(
        scenario,
        s.traffic.sent,
        timelines,
        s.bot_user.user_id,
        notes={
            "calls": dict(backend.calls),
            "outcomes": outcomes,
        },
    )
    result.details.update(
        calls=backend.calls, outcomes=outcomes, notices=notices, logs=logs, asked=asked
    )
    return result


# --- 8: graceful stop ---------------------------------------------------------------------


WORKERS = 4


async def run_graceful_stop(
    lab: FaultLab, hs: SynapseServer, *, messages: int, slow_s: float = 1.5, drain_s: float = 10.0
) -> Figures:
    """``messages`` queued over 4 rooms while every reply takes ``slow_s`` (the proxy
    holds the answers to the bot's sends); SIGTERM once several are in flight."""
    async with lab.proxy(hs.base_url) as proxy:
        s = await stage(lab, hs, rooms=4, homeserver=proxy.url)
        bot = lab.bot(
            proxy.url,
            s.bot_user.user_id,
            access_token=s.bot_user.access_token,
            drain_s=drain_s,
            workers=WORKERS,
        )
        await bot.start()
        await bot.wait_ready()
        slow = proxy.arm(
            Fault("slow", method="PUT", path=r"/send/m\.room\.message/", times=None, delay_s=slow_s)
        )
        async with background(partial(s.traffic.collect, s.observer)):
            await s.traffic.stream(s.sender, s.rooms, messages, None, label="in flight")
            # Rooms are pinned to workers by a hash of their id: as many replies can be
            # in flight as the rooms take workers.
            busy = len({zlib.crc32(room.encode()) % WORKERS for room in s.rooms})
            await proxy.wait_until(lambda: proxy.in_flight("PUT", r"/send/") >= busy, timeout=30)
            # Every message has reached the bot (and so its inbox) before the signal.
            sent_ids = {x.event_id for x in s.traffic.sent}
            await proxy.wait_until(lambda: sent_ids <= proxy.delivered, timeout=30)
            await trio.sleep(0.5)
            in_flight = proxy.in_flight("PUT", r"/send/")
            stopping = trio.current_time()
            code = await bot.terminate(timeout=drain_s + 20)
            stop_s = trio.current_time() - stopping
            proxy.disarm(slow)
            view = read_store(bot.store_path)
            handled_after_stop = [
                r
                for r in bot.events("message_handled", run=1)
                if r["_t"] >= bot.events("stop_requested", run=1)[0]["_t"]
            ]
            restarted = time.time()
            await bot.start()
            await s.traffic.wait_answered(timeout=60 + messages)
            await trio.sleep(2.0)
        await bot.stop()  # before its proxy goes away
    timelines = await audit(s.observer, s.rooms)
    result = figures(
        "8 graceful stop",
        s.traffic.sent,
        timelines,
        bot.user_id,
        fault_ends=[restarted],
        notes={
            "in_flight": in_flight,
            "finished_draining": len(handled_after_stop),
            "left_in_inbox": len(view.inbox),
            "stop_s": round(stop_s, 1),
            "exit": code,
        },
    )
    result.details.update(
        bot=bot,
        code=code,
        stop_s=stop_s,
        view=view,
        drained=handled_after_stop,
        in_flight=in_flight,
    )
    return result


# --- 9: corrupt or foreign store -------------------------------------------------------------


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


async def make_truncated_store(path: Path) -> None:
    """A real bot store with some data, cut in half."""
    store = await Store.open(path, "@bot:localhost")
    event = RoomEvent(
        type="m.room.message",
        event_id=EventID("$x"),
        sender="@a:localhost",  # type: ignore[arg-type]
        origin_server_ts=1,
        content={"body": "x" * 2000},
    )
    items = [
        NewInboxItem(EventID(f"$e{i}"), RoomID("!r:localhost"), "message", replace_id(event, i))
        for i in range(200)
    ]
    await store.commit_sync_batch(SyncToken("s1"), items)
    await store.aclose()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def replace_id(event: RoomEvent, index: int) -> RoomEvent:
    return msgspec.structs.replace(event, event_id=EventID(f"$e{index}"))


def make_foreign_sqlite(path: Path) -> None:
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL);"
        "INSERT INTO invoices(total) VALUES (12.5), (99.0);"
    )
    db.close()


async def make_newer_store(path: Path) -> None:
    store = await Store.open(path, "@bot:localhost")
    await store.aclose()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()


async def run_unusable_store(path: Path, homeserver: str = "http://127.0.0.1:9") -> dict[str, Any]:
    """``python -m bot run`` on the store at ``path``: exit code, error, whether the file
    was left exactly as it was (bytes and mtime), and what files appeared beside it."""
    os.utime(path, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    before = _snapshot(path.parent)
    env = _bot_env(
        homeserver,
        "@bot:localhost",
        path,
        access_token="syt_never_used_token",
        password=None,
        device_id=None,
        workers=1,
        drain_s=1,
        allowed=(),
        level="info",
    )
    result = await trio.run_process(
        [sys.executable, "-m", "bot", "run"],
        env=env,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    records = []
    for line in result.stderr.decode(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    errors = [r.get("error", "") for r in records if r.get("event") == "store_unusable"]
    after = _snapshot(path.parent)
    return {
        "code": result.returncode,
        "errors": errors,
        "file_untouched": after.get(path.name) == before[path.name],
        "new_files": sorted(set(after) - set(before)),
        "stderr": result.stderr.decode(errors="replace"),
    }


# --- security: two bots, hostile bodies ----------------------------------------------------


async def run_two_bots(lab: FaultLab, hs: SynapseServer, *, messages: int = 5) -> Figures:
    """Two bots (two accounts, two processes) in one room with their owner and a
    stranger they do not serve: each of the owner's messages is answered once by each
    bot; the bots never answer each other, nor the stranger."""
    bots = [await lab.user(hs, "bot-a"), await lab.user(hs, "bot-b")]
    owner = await lab.user(hs, "owner")
    stranger = await lab.user(hs, "stranger")
    (room,) = await managed_rooms(hs.base_url, bots, owner, 1, members=[stranger])
    processes = [
        lab.bot(
            hs.base_url,
            b.user_id,
            access_token=b.access_token,
            name=f"bot{i}",
            allowed=[owner.user_id],
        )
        for i, b in enumerate(bots)
    ]
    for process in processes:
        await process.start()
    for process in processes:
        await process.wait_ready()
    traffic = Traffic([b.user_id for b in bots])
    sender = lab.client(hs.base_url, owner)
    as_stranger = lab.client(hs.base_url, stranger)
    async with background(partial(traffic.collect, lab.client(hs.base_url, owner))):
        ignored = [
            await traffic.send(as_stranger, room, "hello bots, answer me"),
            await traffic.send(as_stranger, room, "!help"),
        ]
        for index in range(messages):
            await traffic.send(sender, room, f"to both bots {index}")
        ours = [x.event_id for x in traffic.sent if x.sender == owner.user_id]
        await traffic.wait_answered(ours, timeout=60)
        await trio.sleep(5.0)  # long enough for a loop to show
    timelines = await audit(lab.client(hs.base_url, owner), [room])
    owner_sent = [x for x in traffic.sent if x.sender == owner.user_id]
    per_bot = [figures("", owner_sent, timelines, b.user_id) for b in bots]
    notices = [e for e in timelines[room] if e.sender in traffic.bots]
    targets = [in_reply_to(e) for e in notices]
    bot_events = {e.event_id for e in notices}
    result = Figures(
        "sec: two bots",
        sent=len(owner_sent),
        answered_once=min(f.answered_once for f in per_bot),
        lost=max(f.lost for f in per_bot),
        duplicated=max(f.duplicated for f in per_bot),
        notes={
            "bot_notices": len(notices),
            "answers_to_bots": sum(1 for t in targets if t in bot_events),
            "answers_to_stranger": sum(1 for t in targets if t in ignored),
        },
    )
    result.details.update(processes=processes, notices=notices)
    return result


def hostile_contents(big: int) -> list[tuple[str, dict[str, Any], bool]]:
    """(label, content, answered?) for the hostile messages of the security check."""
    injection = "<img src=x onerror=alert(1)>"
    return [
        ("big body", {"msgtype": "m.text", "body": "x" * big}, True),
        (
            "control characters",
            {
                "msgtype": "m.text",
                "body": "ctl \x00\x01\x07\x08\x0b\x0c\x1b[31mred\x1b[0m\x7f\x85 end",
            },
            True,
        ),
        (
            "bidi overrides",
            {"msgtype": "m.text", "body": "bidi \u202egnp.exe\u202c \u2066x\u2069\u200f"},
            True,
        ),
        (
            "html in body",
            {"msgtype": "m.text", "body": f"{injection}<script>alert(2)</script>"},
            True,
        ),
        (
            "html in formatted_body",
            {
                "msgtype": "m.text",
                "body": "look at this",
                "format": "org.matrix.custom.html",
                "formatted_body": f'{injection}<a href="javascript:alert(1)">x</a>',
            },
            True,
        ),
        ("markdown", {"msgtype": "m.text", "body": "[click](javascript:alert(1)) **b** `c`"}, True),
        ("emote", {"msgtype": "m.emote", "body": f"waves {injection}"}, True),
        (
            "reply fallback",
            {"msgtype": "m.text", "body": "> <@x:y> " + injection + "\n\nreal"},
            True,
        ),
        ("!new with html", {"msgtype": "m.text", "body": f"!new {injection}"}, True),
        ("!help with html", {"msgtype": "m.text", "body": "!help <script>alert(1)</script>"}, True),
        ("!chats", {"msgtype": "m.text", "body": "!chats"}, True),
        ("!status", {"msgtype": "m.text", "body": "!status"}, True),
        ("!new with bidi", {"msgtype": "m.text", "body": "!new abc\u202edcba"}, True),
        ("!new with NUL", {"msgtype": "m.text", "body": "!new a\x00b"}, True),
        ("long command", {"msgtype": "m.text", "body": "!" + "a" * 3000}, True),
        ("body not a string", {"msgtype": "m.text", "body": {"html": injection}}, False),
        ("no body", {"msgtype": "m.text"}, False),
    ]


class _HTMLAudit(HTMLParser):
    """Collects what in a piece of HTML could run or load something."""

    _DANGEROUS_TAGS = frozenset({"img", "script", "iframe", "object", "embed", "style", "svg"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.problems: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._DANGEROUS_TAGS:
            self.problems.append(f"<{tag}>")
        for name, value in attrs:
            if name.startswith("on"):
                self.problems.append(f"{tag} {name}=")
            if name in ("href", "src") and (value or "").strip().lower().startswith("javascript:"):
                self.problems.append(f"{tag} {name}=javascript:")


def html_problems(formatted: str) -> list[str]:
    """Elements and attributes of ``formatted`` that carry an injection through."""
    audit = _HTMLAudit()
    audit.feed(formatted)
    audit.close()
    return audit.problems


async def _largest_accepted_body(client: MatrixClient, room: RoomID) -> tuple[int, EventID]:
    for size in range(64 * 1024, 32 * 1024, -512):
        try:
            event_id = await client.send_event(
                room, "m.room.message", {"msgtype": "m.text", "body": "x" * size}, new_txn_id()
            )
        except MatrixError as exc:
            if exc.status == 413:
                continue
            raise
        return size, event_id
    raise AssertionError("Synapse refused every body above 32 KiB")


async def run_hostile_bodies(lab: FaultLab, hs: SynapseServer) -> Figures:
    """Hostile message bodies and command arguments: the bot never crashes, answers
    each text once, and its HTML never carries the injection through."""
    s = await stage(lab, hs, rooms=1)
    bot = lab.bot(s.homeserver, s.bot_user.user_id, access_token=s.bot_user.access_token)
    await bot.start()
    await bot.wait_ready()
    room = s.rooms[0]
    expected: list[EventID] = []
    unanswered: list[EventID] = []
    refused: dict[str, int] = {}
    async with background(partial(s.traffic.collect, s.observer)):
        big, big_id = await _largest_accepted_body(s.sender, room)
        s.traffic.sent.append(Sent(big_id, room, s.owner.user_id, 0, time.time()))
        expected.append(big_id)
        for label, content, answered in hostile_contents(big)[1:]:
            try:
                event_id = await s.traffic.send(s.sender, room, content=content)
            except MatrixError as exc:
                refused[label] = exc.status  # the homeserver would not take it
                continue
            (expected if answered else unanswered).append(event_id)
        # A lone surrogate escape, as raw JSON (impossible to send through our client).
        async with httpx.AsyncClient(base_url=hs.base_url, timeout=30) as http:
            raw = await http.put(
                f"/_matrix/client/v3/rooms/{quote(room)}/send/m.room.message/{new_txn_id()}",
                content=rb'{"msgtype": "m.text", "body": "lone \ud800 surrogate"}',
                headers={
                    "Authorization": f"Bearer {s.owner.access_token}",
                    "Content-Type": "application/json",
                },
            )
        surrogate_status = raw.status_code
        if raw.status_code == 200:
            expected.append(raw.json()["event_id"])
        tail = await s.traffic.send(s.sender, room, "still there?")
        expected.append(tail)
        await s.traffic.wait_answered(expected, timeout=90)
        await trio.sleep(3.0)
        alive = bot.running
    timelines = await audit(s.observer, s.rooms)
    sent = [x for x in s.traffic.sent if x.event_id in set(expected)]
    result = figures("sec: hostile bodies", sent, timelines, bot.user_id)
    notices = [e for e in timelines[room] if e.sender == bot.user_id]
    formatted = [e.content["formatted_body"] for e in notices if "formatted_body" in e.content]
    leaking = [html for html in formatted if html_problems(str(html))]
    answers_to_ignored = [e for e in notices if in_reply_to(e) in set(unanswered)]
    big_answer = [e for e in notices if in_reply_to(e) == big_id]
    result.notes.update(
        big_body=big,
        big_answer=(
            "echo"
            if big_answer and big_answer[0].content.get("body") != FAILED_NOTICE
            else "failure notice"
        ),
        lone_surrogate_put=surrogate_status,
        refused_by_synapse=refused or "none",
        html_replies=len(formatted),
        html_leaks=len(leaking),
    )
    result.details.update(
        bot=bot, alive=alive, leaking=leaking, answers_to_ignored=answers_to_ignored
    )
    return result
