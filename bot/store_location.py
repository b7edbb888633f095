"""Which store a configured location names (no imports: `bot.config` checks it too).

* ``postgresql://...`` or ``postgres://...``: PostgreSQL (a libpq URL);
* ``sqlite:///path``, ``sqlite:relative/path`` or a plain file path: SQLite.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["is_postgres_url", "sqlite_path"]

_POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(location: str) -> bool:
    return location.lower().startswith(_POSTGRES_SCHEMES)


def sqlite_path(location: str | Path) -> Path:
    """The file a SQLite location names (``~`` expanded); ValueError when it names none."""
    text = str(location)
    if text.lower().startswith("sqlite:"):
        text = text[len("sqlite:") :]
        if text.startswith("///"):  # sqlite:///abs -> /abs, as SQLAlchemy reads it
            text = text[2:]
        elif text.startswith("//"):
            raise ValueError("a SQLite URL has no host; use sqlite:///path")
    if not text:
        raise ValueError("no file named")
    return Path(text).expanduser()
