"""Fixtures of the ordering tests: captured logs, the fake homeserver, the bot's settings.

The autojump clock of these tests waits `AUTOJUMP_THRESHOLD_S` of real time before it jumps: trio
counts a task waiting for a worker thread as idle, and the store does its SQLite work in worker
threads, so with pytest-trio's threshold of 0 the clock would jump to the next deadline (the
drain deadline, a test's time limit) while a commit is on disk. Ordering does not depend on the
threshold; virtual durations then mean what they say.

The ``hs`` fixture also checks, after every test, what no start-up may ever do (issue item 6):
no room or Space is created or linked, and reconciliation and repair only read markers (any
marker write comes after ``matrix_reconcile_complete``: an invite being accepted).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs
from trio.testing import MockClock

from bot.config import Settings
from bot.logging import merge_log_context
from fake_homeserver import FakeHomeserver
from ordering_harness import Logs, make_settings

AUTOJUMP_THRESHOLD_S = 0.02


@pytest.fixture(autouse=True)
def _autojump_after_threads_finish(request: pytest.FixtureRequest) -> None:
    if "autojump_clock" in request.fixturenames:
        clock: MockClock = request.getfixturevalue("autojump_clock")
        clock.autojump_threshold = AUTOJUMP_THRESHOLD_S


@pytest.fixture
def logs() -> Iterator[Logs]:
    """Every structlog entry of the test, in order, with context-bound fields merged in."""
    with capture_logs(processors=[merge_contextvars, merge_log_context]) as entries:
        yield entries


@pytest.fixture
def hs(logs: Logs) -> Iterator[FakeHomeserver]:
    server = FakeHomeserver(logs)
    yield server
    assert server.unexpected == [], "requests the fake homeserver does not know"
    assert server.provisioning_calls() == [], "a room or Space was created or linked"
    reconciled = [
        i for i, entry in enumerate(logs) if entry["event"] == "matrix_reconcile_complete"
    ]
    for write in server.account_data_writes():
        assert reconciled, f"account data written by a bot that never reconciled: {write.path}"
        assert write.after_log(reconciled[0]), (
            f"account data written before reconciliation completed: {write.path}"
        )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)
