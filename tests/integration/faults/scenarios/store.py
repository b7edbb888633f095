"""Scenario 9: ``python -m bot run`` on a corrupt, foreign or newer store, and the
makers of such stores.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any

import msgspec
import trio

from bot.store import NewInboxItem, Store
from faults.harness.bot_process import bot_env
from matrix_api.models import EventID, RoomEvent, RoomID, SyncToken


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
    env = bot_env(
        homeserver,
        "@bot:localhost",
        path,
        access_token="syt_never_used_token",
        password=None,
        device_id=None,
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
