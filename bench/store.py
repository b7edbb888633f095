"""The store's cost per message: SQLite next to PostgreSQL, the same calls.

One message costs the bot two store calls: its sync batch's `commit_sync_batch` (one
transaction: the events in, the token moved) and its `finish` (out of the inbox,
recorded as handled). This runs ``--batches`` batches of ``--size`` events through
each store, then finishes every event one call at a time, and prints per call and per
message: the wall time (what the sync loop or a lane waits) and the bot process's CPU.
PostgreSQL is a throwaway server on this machine (``tests/unit/pg_server.py``), with
fsync on (``--no-fsync`` for the tests' setting), so both stores pay for durability:
SQLite in WAL mode with ``synchronous=NORMAL`` does not wait for the disk at commit.

Figures only, never asserted; the machine is shared and they vary by a tenth.

    python bench/store.py [--batches 300] [--size 5] [--no-fsync]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "unit"))

from bot.store import NewInboxItem
from bot.store_api import BotStore, open_store
from matrix_api.models import EventID, RoomEvent, RoomID, SyncToken, UserID
from pg_server import PostgresServer, missing_binaries

ROOM = RoomID("!bench:example.org")


def item(n: int) -> NewInboxItem:
    event_id = EventID(f"$bench{n}")
    event = RoomEvent(
        type="m.room.message",
        event_id=event_id,
        sender=UserID("@alice:example.org"),
        origin_server_ts=1_700_000_000_000,
        content={"msgtype": "m.text", "body": f"message number {n} " + "x" * 100},
        room_id=ROOM,
    )
    return NewInboxItem(event_id, ROOM, "message", event)


async def run(store: BotStore, batches: int, size: int) -> dict[str, float]:
    fresh = []
    cpu, wall = time.process_time(), time.perf_counter()
    for b in range(batches):
        fresh += await store.commit_sync_batch(
            SyncToken(f"s{b}"), [item(b * size + i) for i in range(size)]
        )
    commit_cpu, commit_wall = time.process_time() - cpu, time.perf_counter() - wall
    cpu, wall = time.process_time(), time.perf_counter()
    for pending in fresh:
        await store.finish(pending, "replied", EventID(f"$reply-{pending.event_id}"))
    finish_cpu, finish_wall = time.process_time() - cpu, time.perf_counter() - wall
    assert len(fresh) == batches * size
    return {
        "commit_us": commit_wall / batches * 1e6,
        "commit_cpu_us": commit_cpu / batches * 1e6,
        "finish_us": finish_wall / len(fresh) * 1e6,
        "finish_cpu_us": finish_cpu / len(fresh) * 1e6,
        "per_message_us": (commit_wall + finish_wall) / len(fresh) * 1e6,
        "per_message_cpu_us": (commit_cpu + finish_cpu) / len(fresh) * 1e6,
    }


async def bench(url: str, scratch: Path, batches: int, size: int) -> None:
    print(f"{batches} batches of {size} events, then {batches * size} finish calls")
    print(
        f"{'store':<11} {'commit_sync_batch':>18} {'(cpu)':>8} {'finish':>9} {'(cpu)':>8}"
        f" {'per message':>12} {'(cpu)':>8}   (microseconds)"
    )
    for name, location in (("sqlite", str(scratch / "bench.sqlite3")), ("postgresql", url)):
        store = await open_store(location, "@bench:example.org")
        try:
            figures = await run(store, batches, size)
        finally:
            await store.aclose()
        print(
            f"{name:<11} {figures['commit_us']:>18.0f} {figures['commit_cpu_us']:>8.0f}"
            f" {figures['finish_us']:>9.0f} {figures['finish_cpu_us']:>8.0f}"
            f" {figures['per_message_us']:>12.0f} {figures['per_message_cpu_us']:>8.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--size", type=int, default=5)
    parser.add_argument("--no-fsync", action="store_true")
    args = parser.parse_args()
    reason = missing_binaries()
    if reason is not None:
        sys.exit(reason)
    with PostgresServer(durable=not args.no_fsync) as server, tempfile.TemporaryDirectory() as d:
        trio.run(bench, server.new_database_url(), Path(d), args.batches, args.size)


if __name__ == "__main__":
    main()
