"""The bot's CPU per echoed message next to the least an echo over matrix_api costs.

Runs the same load as ``bot_runtime.py``'s echo (``--messages`` messages from one
user across ``--rooms`` rooms, one sender per room, against a throwaway Synapse)
twice per round:

* ``floor``: this file's `serve_floor` in its own process. A /sync long-poll and,
  per room, a task that sends each message's reply (the bot's content and
  transaction id) with `MatrixClient`. Nothing else: no store, no inbox, no
  receipts, no log line per message, no commands, no routing.
* ``bot``: ``python -m bot run`` with the echo backend, as in ``bot_runtime.py``.

It prints the CPU each spent per 1,000 messages. The floor is what trio, httpx's
exception types, msgspec and our HTTP client cost on this machine for the same
traffic; the difference is what the bot's durability, routing and logging add.

CPU time on a small shared machine varies by a tenth from run to run, more than
most single changes save. ``--instructions`` runs both processes under valgrind's
callgrind instead and prints the instructions each executed per message, counted
only while the messages flow: the same from run to run within a percent or two,
though blind to what caches and the kernel cost. It needs ``valgrind``, and runs
about fifty times slower (use fewer messages).

    python bench/echo_floor.py [--rooms 10] [--messages 1000] [--rounds 2]
    python bench/echo_floor.py --instructions --messages 300 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio
from bot_runtime import BotProcess, cpu_seconds, make_managed_rooms, send_and_await_replies

from bot.intake import sync_filters
from bot.messages import notice, reply_txn_id
from matrix_api import MatrixClient
from matrix_api.models import EventID, FilterID, RoomEvent, RoomID, SyncToken
from matrix_api.testing.synapse import RegisteredUser, SynapseServer


def _log(event: str, **fields: Any) -> None:
    # The two lines `BotProcess` waits for, in the bot's JSON shape.
    print(json.dumps({"event": event, **fields}), file=sys.stderr, flush=True)


async def serve_floor() -> None:
    """Answer every text message with the bot's reply, and do nothing else."""
    user_id = os.environ["MATRIX_USER_ID"]
    async with MatrixClient(
        os.environ["MATRIX_HOMESERVER"],
        access_token=os.environ["MATRIX_ACCESS_TOKEN"],
        user_id=user_id,
    ) as client:
        # The bot's own long-poll filter: the same /sync traffic for both.
        long_poll = await client.upload_filter(sync_filters(user_id)[1])
        # A random timeout: Synapse answers an identical /sync from a cache for
        # about two minutes, which would hand this run an old position.
        first = await client.sync(timeout_ms=secrets.randbelow(1000), filter=long_poll)
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            _log("bot_ready", startup_requests=client.requests_sent)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_echo, client, first.next_batch, long_poll)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break
        _log("bot_stopped", requests=client.requests_sent)


async def _echo(client: MatrixClient, since: SyncToken, long_poll: FilterID) -> None:
    rooms: dict[RoomID, trio.MemorySendChannel[RoomEvent]] = {}
    async with trio.open_nursery() as nursery:
        while True:
            response = await client.sync(since=since, timeout_ms=30_000, filter=long_poll)
            since = response.next_batch
            for room_id, room in response.rooms.join.items():
                for event in room.timeline.events:
                    if event.type != "m.room.message" or event.content.get("msgtype") == "m.notice":
                        continue
                    if room_id not in rooms:
                        send, receive = trio.open_memory_channel[RoomEvent](math.inf)
                        rooms[room_id] = send
                        nursery.start_soon(_answer_room, client, room_id, receive)
                    rooms[room_id].send_nowait(event)


async def _answer_room(
    client: MatrixClient, room_id: RoomID, events: trio.MemoryReceiveChannel[RoomEvent]
) -> None:
    async for event in events:
        body = event.content.get("body")
        await client.send_event(
            room_id,
            "m.room.message",
            notice(body if isinstance(body, str) else "", reply_to=EventID(event.event_id)),
            reply_txn_id(event.event_id),
        )


def measure(
    hs: SynapseServer,
    bot: RegisteredUser,
    user: RegisteredUser,
    rooms: list[RoomID],
    messages: int,
    store: Path,
    command: list[str],
    *,
    instructions: bool = False,
) -> tuple[float, float]:
    """What one process spent on ``messages``, and its requests per message.

    The cost is CPU seconds per 1,000 messages or, with ``instructions``, millions
    of instructions per message under callgrind, counted from ``bot_ready`` until
    every message is answered, so start-up and shutdown do not count.
    """
    out = store.with_suffix(".callgrind")
    if instructions:
        valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
        command = [*valgrind, f"--callgrind-out-file={out}", *command]
    process = BotProcess(hs, bot, store, command=command)
    try:
        ready = process.wait_for("bot_ready", timeout=600 if instructions else 120)
        if instructions:
            _callgrind_instrumentation(process.proc.pid, "on")
        before = cpu_seconds(process.proc.pid)
        trio.run(send_and_await_replies, hs, user, bot.user_id, rooms, messages)
        cpu = cpu_seconds(process.proc.pid) - before
        if instructions:
            _callgrind_instrumentation(process.proc.pid, "off")
    finally:
        process.stop()
    requests = process.wait_for("bot_stopped")["requests"] - ready["startup_requests"]
    if instructions:
        return _instruction_total(out) / messages / 1e6, requests / messages
    return cpu / messages * 1000, requests / messages


def _callgrind_instrumentation(pid: int, state: str) -> None:
    subprocess.run(["callgrind_control", "-i", state, str(pid)], check=True, capture_output=True)


def _instruction_total(callgrind_out: Path) -> int:
    for line in reversed(callgrind_out.read_text().splitlines()):
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"{callgrind_out}: callgrind wrote no instruction total")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rooms", type=int, default=10)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count instructions per message under valgrind's callgrind instead of CPU time",
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        trio.run(serve_floor)
        return
    if args.instructions and shutil.which("valgrind") is None:
        parser.error("--instructions needs valgrind (and its callgrind_control) on the PATH")
    if args.instructions:
        unit, digits = "M instructions per message", 3
    else:
        # CPU time comes in clock ticks: a hundredth of a second per 1,000 messages.
        unit, digits = "s CPU per 1,000 messages", 2

    floor_command = [sys.executable, str(Path(__file__).resolve()), "--serve"]
    figures: dict[str, list[float]] = {"floor": [], "bot": []}
    with (
        tempfile.TemporaryDirectory(prefix="bench-floor-") as tmp,
        SynapseServer(Path(tmp) / "synapse") as hs,
    ):
        user = hs.register_user("benchuser")
        # Each in rooms of its own, as its own user: messages the floor answered
        # must not wait in the bot's rooms as messages sent while it was down.
        bot = hs.register_user("benchbot")
        floor_bot = hs.register_user("floorbot")
        rooms = {
            "floor": (floor_bot, trio.run(make_managed_rooms, hs, floor_bot, user, args.rooms)),
            "bot": (bot, trio.run(make_managed_rooms, hs, bot, user, args.rooms)),
        }
        commands = {"floor": floor_command, "bot": [sys.executable, "-m", "bot", "run"]}
        print(f"{args.messages} messages over {args.rooms} rooms, {args.rounds} rounds")
        for round_number in range(1, args.rounds + 1):
            for name, (who, where) in rooms.items():
                store = Path(tmp) / f"{name}.sqlite3"
                cost, requests = measure(
                    hs,
                    who,
                    user,
                    where,
                    args.messages,
                    store,
                    commands[name],
                    instructions=args.instructions,
                )
                figures[name].append(cost)
                print(
                    f"round {round_number} {name:<6} {cost:6.{digits}f} {unit}, "
                    f"{requests:.2f} requests per message",
                    flush=True,
                )
    floor, bot_cost = statistics.median(figures["floor"]), statistics.median(figures["bot"])
    print(
        f"\nmedian: floor {floor:.{digits}f}, bot {bot_cost:.{digits}f} {unit}; "
        f"the bot adds {bot_cost - floor:.{digits}f} ({bot_cost / floor:.1f}x the floor)"
    )


if __name__ == "__main__":
    main()
