"""What a stopped bot left in its SQLite store, read from outside (read-only)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path


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
