"""The bot's own cost against a local Synapse: start-up, memory, CPU per echoed message.

Starts a throwaway Synapse, makes ``--rooms`` managed chats for one user (rooms the
bot joined and marked, as if it had accepted invites), then runs ``python -m bot
run`` as a separate process and reads its CPU time and resident memory from /proc:

* start: process spawn to the ``bot_ready`` log line (wall), the bot's CPU in that
  time, and how many requests it made (``startup_requests``), for two room counts,
  to show the count does not grow with the rooms;
* echo: the bot's CPU time for ``--messages`` messages answered (durable inbox,
  reply, receipts included), sent by the user across ``--echo-rooms`` rooms.

    python bench/bot_runtime.py [--rooms 300] [--messages 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from bot.chats import CHAT_MARKER, Chat, marker_content, new_chat_id, now_ms
from matrix_api import MatrixClient, new_txn_id
from matrix_api.models import RoomID, SyncToken
from matrix_api.testing.synapse import RegisteredUser, SynapseServer

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime + stime


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def make_managed_rooms(
    hs: SynapseServer, bot: RegisteredUser, user: RegisteredUser, count: int
) -> list[RoomID]:
    rooms: list[RoomID] = []
    async with (
        MatrixClient(hs.base_url, access_token=user.access_token, user_id=user.user_id) as alice,
        MatrixClient(hs.base_url, access_token=bot.access_token, user_id=bot.user_id) as botc,
    ):

        async def one(index: int) -> None:
            room_id = await alice.create_room(name=f"chat {index}", invite=[bot.user_id])
            chat = Chat(new_chat_id(), room_id, user.user_id, f"chat {index}", now_ms())
            await botc.put_room_account_data(room_id, CHAT_MARKER, marker_content(chat))
            await botc.join_room(room_id)
            rooms.append(room_id)

        limiter = trio.CapacityLimiter(8)

        async def limited(index: int) -> None:
            async with limiter:
                await one(index)

        async with trio.open_nursery() as nursery:
            for index in range(count):
                nursery.start_soon(limited, index)
    return rooms


class BotProcess:
    """``python -m bot run`` (or ``command``) with its JSON log lines written to a file
    we read back; it must log ``bot_ready`` and, when terminated, ``bot_stopped``."""

    def __init__(
        self,
        hs: SynapseServer,
        bot: RegisteredUser,
        store: Path,
        command: list[str] | None = None,
    ) -> None:
        env = {
            **os.environ,
            "MATRIX_HOMESERVER": hs.base_url,
            "MATRIX_USER_ID": bot.user_id,
            "MATRIX_ACCESS_TOKEN": bot.access_token,
            "BOT_STORE_PATH": str(store),
            "BOT_LOG_FORMAT": "json",
            "BOT_LOG_LEVEL": "info",
            # One user sends every message: the per-user limit would pace them.
            # (Ignored by versions without it.)
            "BOT_USER_MESSAGES_BURST": "100000",
        }
        self.log_path = store.with_suffix(".log")
        self.started = time.perf_counter()
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                command or [sys.executable, "-m", "bot", "run"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def wait_for(self, event: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.log_path.open() as log:
            while time.monotonic() < deadline:
                line = log.readline()
                if not line:
                    if self.proc.poll() is not None:
                        break
                    time.sleep(0.01)
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("event") == event:
                    return dict(record)
        raise RuntimeError(f"bot never logged {event} (exit code {self.proc.poll()})")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def measure_start(hs: SynapseServer, bot: RegisteredUser, store: Path) -> dict[str, float]:
    process = BotProcess(hs, bot, store)
    try:
        ready = process.wait_for("bot_ready")
        wall = time.perf_counter() - process.started
        return {
            "wall_s": wall,
            "cpu_s": cpu_seconds(process.proc.pid),
            "rss_mb": rss_mb(process.proc.pid),
            "requests": float(ready["startup_requests"]),
            "chats": float(ready["chats"]),
        }
    finally:
        process.stop()


async def send_and_await_replies(
    hs: SynapseServer, user: RegisteredUser, bot_id: str, rooms: list[RoomID], messages: int
) -> float:
    """Send ``messages`` across ``rooms``; return when all are answered (seconds)."""
    started = time.perf_counter()
    async with MatrixClient(
        hs.base_url, access_token=user.access_token, user_id=user.user_id
    ) as alice:
        # A fresh timeout each time: Synapse answers an identical /sync from a cache
        # for about two minutes, which would hand a second run an old position.
        since: SyncToken = (
            await alice.sync(
                timeout_ms=secrets.randbelow(1000), filter={"room": {"timeline": {"limit": 1}}}
            )
        ).next_batch
        sent: set[str] = set()
        answered: set[str] = set()

        async def sender(room: RoomID, count: int) -> None:
            for index in range(count):
                event_id = await alice.send_event(
                    room, "m.room.message", {"msgtype": "m.text", "body": f"m{index}"}, new_txn_id()
                )
                sent.add(event_id)

        async with trio.open_nursery() as nursery:
            # One sender per room, all at once: the bot sees a steady flood.
            for index, room in enumerate(rooms):
                share = messages // len(rooms) + (index < messages % len(rooms))
                nursery.start_soon(sender, room, share)
            while len(sent) < messages or not sent <= answered:
                response = await alice.sync(since=since, timeout_ms=5000)
                since = response.next_batch
                for joined in response.rooms.join.values():
                    for event in joined.timeline.events:
                        if event.sender != bot_id:
                            continue
                        target = (
                            event.content.get("m.relates_to", {})
                            .get("m.in_reply_to", {})
                            .get("event_id")
                        )
                        if target:
                            answered.add(target)
                if time.perf_counter() - started > 600:
                    raise RuntimeError(f"only {len(answered)} of {messages} answered")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rooms", type=int, default=300)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--echo-rooms", type=int, default=10)
    args = parser.parse_args()

    with (
        tempfile.TemporaryDirectory(prefix="bench-bot-") as tmp,
        SynapseServer(Path(tmp) / "synapse") as hs,
    ):
        bot = hs.register_user("benchbot")
        user = hs.register_user("benchuser")
        small = 10
        print(f"setting up {args.rooms} managed rooms ...", flush=True)
        rooms = trio.run(make_managed_rooms, hs, bot, user, small)
        few = measure_start(hs, bot, Path(tmp) / "store-few.sqlite3")
        rooms += trio.run(make_managed_rooms, hs, bot, user, args.rooms - small)

        # Fresh store: reconciliation restores every chat from its marker.
        cold = measure_start(hs, bot, Path(tmp) / "store.sqlite3")
        # Same store again: the usual restart.
        warm = measure_start(hs, bot, Path(tmp) / "store.sqlite3")
        print(f"\nstart-up to bot_ready ({sys.executable.split('/')[-1]}, Synapse on loopback)")
        print(f"{'case':<34}{'wall s':>8}{'cpu s':>8}{'rss MB':>8}{'requests':>10}{'chats':>7}")
        for label, figures in (
            (f"{small} rooms, empty store", few),
            (f"{args.rooms} rooms, empty store", cold),
            (f"{args.rooms} rooms, restart", warm),
        ):
            print(
                f"{label:<34}{figures['wall_s']:8.2f}{figures['cpu_s']:8.2f}"
                f"{figures['rss_mb']:8.1f}{figures['requests']:10.0f}{figures['chats']:7.0f}"
            )

        process = BotProcess(hs, bot, Path(tmp) / "store.sqlite3")
        try:
            ready = process.wait_for("bot_ready")
            cpu_before = cpu_seconds(process.proc.pid)
            elapsed = trio.run(
                send_and_await_replies,
                hs,
                user,
                bot.user_id,
                rooms[: args.echo_rooms],
                args.messages,
            )
            cpu = cpu_seconds(process.proc.pid) - cpu_before
            rss = rss_mb(process.proc.pid)
        finally:
            process.stop()
        requests = process.wait_for("bot_stopped")["requests"] - ready["startup_requests"]
        print(
            f"\necho: {args.messages} messages over {args.echo_rooms} rooms answered in "
            f"{elapsed:.1f} s wall; bot CPU {cpu:.2f} s "
            f"= {cpu / args.messages * 1000:.2f} s per 1,000 messages; "
            f"{requests / args.messages:.2f} requests per message; RSS after {rss:.1f} MB"
        )


if __name__ == "__main__":
    main()
