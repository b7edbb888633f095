"""Active/standby against Synapse and a real PostgreSQL (issue 22).

Two ``python -m bot run`` processes with ``BOT_STANDBY=true`` share one account,
device (the same access token) and database; the lock holder is told apart by the
``application_name`` each one's URL gives its PostgreSQL session.

* kill -9 of the active instance twice while a user sends messages at about 10/s:
  every message is answered exactly once (counted from the room's history), and the
  time from each kill to the first answer the new active instance made is printed.
* ``pg_terminate_backend`` of the active instance's session: it notices, stops (no
  answer from it afterwards) and goes back to standby; the other takes over;
  nothing is answered twice.

Every process is ended by its PID, whatever happens.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trio

from bot.chats import CHAT_MARKER, Chat, marker_content, new_chat_id, now_ms
from bot_harness import bot_process_env
from conftest import MakeUser
from matrix_api import MatrixClient, new_txn_id
from matrix_api.models import RoomID
from matrix_api.testing.synapse import RegisteredUser, SynapseServer
from matrix_crypto.cross_signing import SecretStorageKey
from pg_server import PostgresServer, missing_binaries

# Figures, not assertions: the machine is shared (see bench/).
MESSAGES = int(os.environ.get("FAILOVER_MESSAGES", "300"))
RATE_PER_S = 10.0
ROOMS = 3
E2EE = os.environ.get("FAILOVER_E2EE", "false")
PICKLE_KEY = base64.b64encode(secrets.token_bytes(32)).decode()
RECOVERY_KEY = SecretStorageKey.create().recovery_key


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PostgresServer]:
    reason = missing_binaries()
    if reason is not None:
        if os.environ.get("SURFACES_BOT_REQUIRE_POSTGRES"):
            pytest.fail(reason)
        pytest.skip(reason)
    with PostgresServer() as server:
        yield server


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Instance:
    """One bot process (started again under the same name after a kill)."""

    name: str
    env: dict[str, str]
    log_dir: Path
    http_port: int
    proc: subprocess.Popen[bytes] | None = None
    runs: int = 0

    @property
    def log(self) -> Path:
        return self.log_dir / f"{self.name}-{self.runs}.log"

    def start(self) -> None:
        self.runs += 1
        with self.log.open("wb") as sink:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bot", "run"], env=self.env, stdout=sink, stderr=sink
            )

    def events(self) -> list[dict[str, Any]]:
        records = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
        return records

    def names(self) -> list[str]:
        return [str(record.get("event")) for record in self.events()]

    async def wait_for(self, event: str, *, after: int = 0, timeout: float = 90) -> None:
        """Until the current run logged ``event`` (the ``after``-th one and later)."""
        with trio.fail_after(timeout):
            while self.names()[after:].count(event) == 0:
                assert self.proc is not None
                assert self.proc.poll() is None, f"{self.name} exited: {self.tail()}"
                await trio.sleep(0.05)

    def last_time_ms(self, event: str) -> int:
        """When the current run last logged ``event`` (its timestamp, ms)."""
        stamp = [r["timestamp"] for r in self.events() if r.get("event") == event][-1]
        moment = datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
        return int(moment.timestamp() * 1000)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])


@dataclass
class Pair:
    pg: PostgresServer
    url: str
    instances: dict[str, Instance] = field(default_factory=dict)

    def holder(self) -> str | None:
        """The instance whose session holds the store's lock (None: nobody)."""
        with psycopg.connect(self.url, autocommit=True) as db:
            row = db.execute(
                "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a"
                " ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted"
                " AND a.datname = current_database()"
            ).fetchone()
        return None if row is None else str(row[0])

    def terminate(self, name: str) -> int:
        with psycopg.connect(self.url, autocommit=True) as db:
            rows = db.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s AND datname = current_database()",
                (name,),
            ).fetchall()
        return len(rows)

    async def wait_holder(self, name: str, timeout: float = 60) -> None:
        with trio.fail_after(timeout):
            while await trio.to_thread.run_sync(self.holder) != name:  # noqa: ASYNC110
                await trio.sleep(0.05)


@contextlib.contextmanager
def bot_pair(
    synapse: SynapseServer, bot: RegisteredUser, pg: PostgresServer, tmp_path: Path
) -> Iterator[Pair]:
    url = pg.new_database_url()
    pair = Pair(pg, url)
    for name in ("bot-a", "bot-b"):
        port = _free_port()
        env = bot_process_env(
            synapse,
            bot,
            tmp_path / f"{name}.sqlite3",  # unused: the store is PostgreSQL
            BOT_STORE_URL=f"{url}?application_name={name}",
            BOT_STANDBY="true",
            # The counting needs plain rooms; FAILOVER_E2EE=true runs the device's
            # encryption tasks beside them (its state handed over in the store).
            BOT_E2EE=E2EE,
            BOT_PICKLE_KEY=PICKLE_KEY,
            MATRIX_RECOVERY_KEY=RECOVERY_KEY,
            BOT_LOG_LEVEL="info",
            BOT_HTTP_LISTEN=f"127.0.0.1:{port}",
            BOT_DRAIN_TIMEOUT_S="2",
        )
        pair.instances[name] = Instance(name, env, tmp_path, port)
    try:
        yield pair
    finally:
        for instance in pair.instances.values():
            instance.kill()


async def managed_rooms(
    hs: SynapseServer, bot: RegisteredUser, user: RegisteredUser, count: int
) -> list[RoomID]:
    """Chats the bot manages (joined, marked) before it first starts."""
    rooms = []
    async with (
        MatrixClient(hs.base_url, access_token=user.access_token, user_id=user.user_id) as alice,
        MatrixClient(hs.base_url, access_token=bot.access_token, user_id=bot.user_id) as botc,
    ):
        for index in range(count):
            room_id = await alice.create_room(name=f"chat {index}", invite=[bot.user_id])
            chat = Chat(new_chat_id(), room_id, user.user_id, f"chat {index}", now_ms())
            await botc.put_room_account_data(room_id, CHAT_MARKER, marker_content(chat))
            await botc.join_room(room_id)
            rooms.append(room_id)
    return rooms


def _reply_target(event: Any) -> str | None:
    relates = event.content.get("m.relates_to")
    in_reply_to = relates.get("m.in_reply_to") if isinstance(relates, dict) else None
    target = in_reply_to.get("event_id") if isinstance(in_reply_to, dict) else None
    return target if isinstance(target, str) else None


@dataclass
class Conversation:
    """The user's side: messages sent at a steady rate, the bot's replies followed."""

    bot_id: str
    sent: list[str] = field(default_factory=list)
    first_reply_ts: dict[str, int] = field(default_factory=dict)  # server time, ms

    async def send(self, client: MatrixClient, rooms: list[RoomID], count: int) -> None:
        started = trio.current_time()
        for index in range(count):
            await trio.sleep_until(started + index / RATE_PER_S)
            event_id = await client.send_event(
                rooms[index % len(rooms)],
                "m.room.message",
                {"msgtype": "m.text", "body": f"failover {index}"},
                new_txn_id(),
            )
            self.sent.append(event_id)

    async def follow(self, client: MatrixClient) -> None:
        since = (await client.sync(timeout_ms=random.randrange(1000))).next_batch
        filter = {
            "room": {"timeline": {"limit": 1000, "senders": [self.bot_id]}},
            "presence": {"not_types": ["*"]},
        }
        while True:
            response = await client.sync(since=since, timeout_ms=2000, filter=filter)
            since = response.next_batch
            for joined in response.rooms.join.values():
                for event in joined.timeline.events:
                    target = _reply_target(event)
                    if target is not None and target not in self.first_reply_ts:
                        self.first_reply_ts[target] = int(event.origin_server_ts or 0)

    def all_answered(self, expected: int) -> bool:
        return len(self.sent) == expected and set(self.sent) <= self.first_reply_ts.keys()

    def first_answer_after(self, wall_ms: int) -> float | None:
        """Seconds from ``wall_ms`` to the first reply the server made after it."""
        later = [ts for ts in self.first_reply_ts.values() if ts >= wall_ms]
        return (min(later) - wall_ms) / 1000 if later else None


async def replies_per_message(
    hs: SynapseServer, user: RegisteredUser, bot_id: str, rooms: list[RoomID]
) -> Counter[str]:
    """How many replies each message got, from each room's whole history."""
    counts: Counter[str] = Counter()
    async with MatrixClient(
        hs.base_url, access_token=user.access_token, user_id=user.user_id
    ) as client:
        for room_id in rooms:
            token = None
            while True:
                page = await client.messages(
                    room_id,
                    direction="b",
                    from_token=token,
                    limit=500,
                    filter={"senders": [bot_id], "types": ["m.room.message"]},
                )
                for event in page.chunk:
                    target = _reply_target(event)
                    if target is not None:
                        counts[target] += 1
                if page.end is None:
                    break
                token = page.end
    return counts


async def readyz(port: int) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient() as http:
        answer = await http.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
        return answer.status_code, answer.json()


def _wall_ms() -> int:
    return int(time.time() * 1000)


async def test_kill_9_of_the_active_twice_loses_nothing_and_answers_nothing_twice(
    synapse: SynapseServer, make_user: MakeUser, pg_server: PostgresServer, tmp_path: Path
) -> None:
    bot, user = make_user("bot"), make_user("alice")
    rooms = await managed_rooms(synapse, bot, user, ROOMS)
    chat = Conversation(bot.user_id)
    takeovers: list[tuple[float, float, float]] = []  # kill -> lock, ready, first answer
    with bot_pair(synapse, bot, pg_server, tmp_path) as pair:
        a, b = pair.instances["bot-a"], pair.instances["bot-b"]
        a.start()
        await a.wait_for("bot_ready")
        b.start()
        await b.wait_for("bot_standby")
        await pair.wait_holder("bot-a")
        # A standby says so: not ready, phase "standby".
        with trio.fail_after(30):
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    status, body = await readyz(b.http_port)
                    break
                await trio.sleep(0.1)
        assert (status, body["phase"]) == (503, "standby")

        async def kill_the_active() -> None:
            await trio.sleep_until(started + killed_at.pop(0))
            active_name = await trio.to_thread.run_sync(pair.holder)
            assert active_name in pair.instances, active_name
            active = pair.instances[active_name]
            other = pair.instances["bot-b" if active_name == "bot-a" else "bot-a"]
            await other.wait_for("bot_standby")
            killed_ms = _wall_ms()
            active.kill()
            await other.wait_for("bot_ready")
            # Answers made once the other held the store are its own (a request the
            # killed one had in flight may still complete in the server just after).
            took_ms = other.last_time_ms("bot_active")
            with trio.fail_after(60):
                while chat.first_answer_after(took_ms) is None:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            first_ms = took_ms + 1000 * (chat.first_answer_after(took_ms) or 0.0)
            takeovers.append(
                (
                    (took_ms - killed_ms) / 1000,
                    (other.last_time_ms("bot_ready") - killed_ms) / 1000,
                    (first_ms - killed_ms) / 1000,
                )
            )
            active.start()  # back, as the standby
            await active.wait_for("bot_standby")

        sending_s = MESSAGES / RATE_PER_S
        # Two random moments of the burst, one in each half (a slow machine may reach
        # the second only after the first takeover: then it is right after that).
        killed_at = [random.uniform(0.1, 0.4) * sending_s, random.uniform(0.55, 0.85) * sending_s]
        async with MatrixClient(
            synapse.base_url, access_token=user.access_token, user_id=user.user_id
        ) as client:
            with trio.fail_after(sending_s + 300):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(chat.follow, client)
                    started = trio.current_time()
                    async with trio.open_nursery() as work:
                        work.start_soon(chat.send, client, rooms, MESSAGES)
                        await kill_the_active()
                        await kill_the_active()
                    while not chat.all_answered(MESSAGES):  # noqa: ASYNC110
                        await trio.sleep(0.1)
                    nursery.cancel_scope.cancel()
        counts = await replies_per_message(synapse, user, bot.user_id, rooms)
    print(
        f"\nfailover: {len(chat.sent)} messages at {RATE_PER_S:.0f}/s, 2 kill -9 of the active;"
        " from the kill to the new active's lock / ready / first answer: "
        + ", ".join(f"{lock:.2f} / {ready:.2f} / {first:.2f} s" for lock, ready, first in takeovers)
    )
    assert len(takeovers) == 2
    assert [event_id for event_id in chat.sent if counts[event_id] == 0] == []  # none lost
    assert {event_id: n for event_id, n in counts.items() if n > 1} == {}  # none twice


async def test_a_cut_database_session_deposes_the_active_and_the_standby_takes_over(
    synapse: SynapseServer, make_user: MakeUser, pg_server: PostgresServer, tmp_path: Path
) -> None:
    bot, user = make_user("bot"), make_user("alice")
    rooms = await managed_rooms(synapse, bot, user, ROOMS)
    chat = Conversation(bot.user_id)
    count = 80
    with bot_pair(synapse, bot, pg_server, tmp_path) as pair:
        a, b = pair.instances["bot-a"], pair.instances["bot-b"]
        a.start()
        await a.wait_for("bot_ready")
        b.start()
        await b.wait_for("bot_standby")
        await pair.wait_holder("bot-a")

        async def cut_the_active() -> None:
            await trio.sleep(count / RATE_PER_S / 3)
            assert await trio.to_thread.run_sync(pair.terminate, "bot-a") >= 1
            await a.wait_for("bot_deposed", timeout=30)
            await b.wait_for("bot_ready")
            await pair.wait_holder("bot-b")

        async with MatrixClient(
            synapse.base_url, access_token=user.access_token, user_id=user.user_id
        ) as client:
            with trio.fail_after(count / RATE_PER_S + 180):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(chat.follow, client)
                    async with trio.open_nursery() as work:
                        work.start_soon(chat.send, client, rooms, count)
                        work.start_soon(cut_the_active)
                    while not chat.all_answered(count):  # noqa: ASYNC110
                        await trio.sleep(0.1)
                    nursery.cancel_scope.cancel()
        # The deposed one went back to standby, and answered nothing since it noticed.
        await a.wait_for("bot_standby", after=a.names().index("bot_deposed"))
        assert a.proc is not None
        assert a.proc.poll() is None
        after = a.names()[a.names().index("bot_deposed") :]
        assert "message_handled" not in after
        assert "bot_ready" not in after
        assert after.count("bot_deposed") == 1
        # A stop ends both: the standby at once, the active one after its drain.
        for instance in (a, b):
            assert instance.proc is not None
            instance.proc.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                while instance.proc.poll() is None:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            assert instance.proc.returncode == 0, instance.tail()
        assert a.names()[-1] == "bot_stopped"
        counts = await replies_per_message(synapse, user, bot.user_id, rooms)
    assert [event_id for event_id in chat.sent if counts[event_id] == 0] == []
    assert {event_id: n for event_id, n in counts.items() if n > 1} == {}


async def test_a_reply_resent_under_its_txn_id_by_another_login_of_the_device_is_one_event(
    synapse: SynapseServer, make_user: MakeUser
) -> None:
    """What makes a re-sent reply harmless: the new active instance, even with an
    access token of its own (a password login), sends as the same device, and the
    homeserver scopes transaction ids to the device."""
    from bot.messages import reply_txn_id

    bot, user = make_user("bot"), make_user("alice")
    [room_id] = await managed_rooms(synapse, bot, user, 1)
    sessions = []
    for _ in range(2):
        client = MatrixClient(synapse.base_url, user_id=bot.user_id)
        await client.login_password(bot.user_id, bot.password, device_id="FAILOVER")
        sessions.append(client)
    first, second = sessions
    try:
        async with MatrixClient(
            synapse.base_url, access_token=user.access_token, user_id=user.user_id
        ) as alice:
            message = await alice.send_event(
                room_id, "m.room.message", {"msgtype": "m.text", "body": "hi"}, new_txn_id()
            )
        txn_id = reply_txn_id(message)
        content = {
            "msgtype": "m.notice",
            "body": "answer",
            "m.relates_to": {"m.in_reply_to": {"event_id": message}},
        }
        by_deposed = await first.send_event(room_id, "m.room.message", content, txn_id)
        by_successor = await second.send_event(room_id, "m.room.message", content, txn_id)
        assert by_successor == by_deposed
        counts = await replies_per_message(synapse, user, bot.user_id, [room_id])
        assert counts[message] == 1
    finally:
        for client in sessions:
            await client.aclose()


async def test_without_standby_a_deposed_instance_exits_with_its_own_code(
    synapse: SynapseServer, make_user: MakeUser, pg_server: PostgresServer, tmp_path: Path
) -> None:
    bot = make_user("bot")
    await managed_rooms(synapse, bot, make_user("alice"), 1)
    with bot_pair(synapse, bot, pg_server, tmp_path) as pair:
        a, b = pair.instances["bot-a"], pair.instances["bot-b"]
        a.env["BOT_STANDBY"] = "false"
        a.start()
        await a.wait_for("bot_ready")
        b.start()
        await b.wait_for("bot_standby")
        assert await trio.to_thread.run_sync(pair.terminate, "bot-a") >= 1
        await b.wait_for("bot_ready")
        assert a.proc is not None
        with trio.fail_after(30):
            while a.proc.poll() is None:  # noqa: ASYNC110 (a lease check finds it)
                await trio.sleep(0.05)
        assert a.proc.returncode == 5, a.tail()  # deposed, not "store unusable" (3)
        names = a.names()
        assert names.count("bot_deposed") == 1
        assert names[-1] == "deposed"
        assert "bot_back_to_standby" not in names
