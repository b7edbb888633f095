"""Scenario 9: a corrupt, foreign or newer store, as the operator meets it.

``python -m bot run`` on such a file: a clear error naming the file, a non-zero
exit code, and the file (and its directory: no -wal or -shm appears) left exactly
as it was. The `Store` unit tests cover each kind of file; these cover the CLI end
to end for the kinds tests/integration/test_bot_cli.py does not (it has plain junk).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from bot.__main__ import EXIT_STORE
from faults.scenarios.store import (
    make_foreign_sqlite,
    make_newer_store,
    make_truncated_store,
    run_unusable_store,
)


async def _truncated(path: Path) -> None:
    await make_truncated_store(path)


async def _foreign(path: Path) -> None:
    make_foreign_sqlite(path)


async def _newer(path: Path) -> None:
    await make_newer_store(path)


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (_truncated, r"not a usable SQLite database|database is corrupt|cannot be used"),
        (_foreign, r"a SQLite file of something else"),
        (_newer, r"schema version 99 is newer than this bot understands"),
    ],
    ids=["truncated", "foreign", "newer-schema"],
)
async def test_an_unusable_store_stops_the_bot_with_a_clear_error_and_is_left_alone(
    tmp_path: Path, make: Callable[[Path], Awaitable[None]], says: str
) -> None:
    path = tmp_path / "store" / "bot.sqlite3"
    path.parent.mkdir()
    await make(path)

    outcome = await run_unusable_store(path)
    print(f"\nstore {path.name}: exit {outcome['code']}, error: {outcome['errors']}")

    assert outcome["code"] == EXIT_STORE, outcome["stderr"][-2000:]
    (error,) = outcome["errors"]
    assert str(path) in error
    assert re.search(says, error), error
    assert outcome["file_untouched"], "the store file changed"


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(_truncated, id="truncated"),
        pytest.param(_foreign, id="foreign"),
        pytest.param(_newer, id="newer-schema"),
    ],
)
async def test_refusing_a_store_leaves_no_new_file_beside_it(
    tmp_path: Path, make: Callable[[Path], Awaitable[None]]
) -> None:
    path = tmp_path / "store" / "bot.sqlite3"
    path.parent.mkdir()
    await make(path)

    outcome = await run_unusable_store(path)

    assert outcome["code"] == EXIT_STORE
    assert outcome["new_files"] == []
