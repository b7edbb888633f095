"""bot.store_lock: one process per store, and no stale lock after a crash."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
from structlog.testing import capture_logs

from bot import store_lock
from bot.reset import reset_local
from bot.store import Store, StoreError
from bot.store_lock import StoreLock, StoreLockHeld, lock_path

BOT = "@bot:example.org"

_HOLD = """
import sys, time
from pathlib import Path
from bot.store_lock import StoreLock
lock = StoreLock.try_acquire(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "bot.sqlite3"


@contextmanager
def held_by_another_process(path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process holding ``path``'s lock until killed (by PID, whatever happens)."""
    with subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE
    ) as holder:
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline() == b"held\n"
            yield holder
        finally:
            holder.kill()
            holder.wait()


async def test_a_second_open_is_refused_naming_the_holder_until_the_first_closes(
    path: Path,
) -> None:
    first = await Store.open(path, BOT)
    try:
        with pytest.raises(StoreError, match=rf"in use by another process \(pid {os.getpid()}\)"):
            await Store.open(path, BOT)
    finally:
        await first.aclose()
    second = await Store.open(path, BOT)
    await second.aclose()


async def test_a_store_left_by_a_killed_process_opens_at_once(path: Path) -> None:
    with held_by_another_process(path) as holder:
        with pytest.raises(StoreError, match=rf"pid {holder.pid}\)"):
            await Store.open(path, BOT)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        # The kernel let go with the process: nothing to clean up first.
        store = await Store.open(path, BOT)
        await store.aclose()


async def test_open_waits_for_a_holder_that_lets_go_within_the_wait(
    path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    first = await Store.open(path, BOT)

    async def close_later() -> None:
        await trio.sleep(3)
        await first.aclose()

    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(close_later)
            second = await Store.open(path, BOT, lock_wait_s=10)
            opened_at = trio.current_time()
    await second.aclose()
    assert opened_at >= 3
    waits = [entry for entry in logs if entry["event"] == "store_lock_wait"]
    assert len(waits) == 1  # said once, not at every poll
    assert waits[0]["holder_pid"] == os.getpid()


async def test_open_gives_up_when_the_holder_keeps_it_past_the_wait(
    path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    first = await Store.open(path, BOT)
    try:
        with pytest.raises(StoreError, match="in use"):
            await Store.open(path, BOT, lock_wait_s=2)
        assert trio.current_time() >= 2
    finally:
        await first.aclose()


async def test_a_store_refused_at_open_is_left_with_nothing_beside_it(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a database" * 100)
    with pytest.raises(StoreError, match="not a usable SQLite database"):
        await Store.open(path, BOT)
    assert sorted(path.parent.iterdir()) == [path]
    # And the refusal let go of the store.
    path.unlink()
    store = await Store.open(path, BOT)
    await store.aclose()


async def test_a_store_that_cannot_be_made_where_asked_is_refused_clearly(
    tmp_path: Path,
) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    with pytest.raises(StoreError, match="cannot be used as the bot's store"):
        await Store.open(not_a_directory / "bot.sqlite3", BOT)


async def test_the_lock_file_is_there_while_open_and_gone_after_close(path: Path) -> None:
    store = await Store.open(path, BOT)
    assert lock_path(path).read_text() == f"{os.getpid()}\n"
    await store.aclose()
    assert not lock_path(path).exists()


def test_a_lock_taken_on_a_file_removed_meanwhile_is_taken_again_on_the_new_one(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race the inode check closes: the holder removes the file and lets go just
    # as we lock the removed file, and someone else creates a new one at the path.
    real_flock = store_lock.fcntl.flock
    calls = 0

    def flock_as_the_file_is_replaced(fd: int, operation: int) -> None:
        nonlocal calls
        calls += 1
        real_flock(fd, operation)
        if calls == 1:
            lock_path(path).unlink()
            lock_path(path).touch()

    monkeypatch.setattr(store_lock.fcntl, "flock", flock_as_the_file_is_replaced)
    with StoreLock.try_acquire(path):
        assert calls == 2
        # Held on the file now at the path: another taker is refused.
        monkeypatch.setattr(store_lock.fcntl, "flock", real_flock)
        with pytest.raises(StoreLockHeld):
            StoreLock.try_acquire(path)


async def test_reset_local_refuses_while_a_bot_holds_the_store(path: Path) -> None:
    said: list[str] = []
    store = await Store.open(path, BOT)
    try:
        code = reset_local(path, confirm=lambda _: True, say=said.append)
    finally:
        await store.aclose()
    assert code == 1
    assert path.exists()
    assert "in use by another process" in said[-1]


async def test_reset_local_leaves_no_lock_file(path: Path) -> None:
    store = await Store.open(path, BOT)
    await store.aclose()
    said: list[str] = []
    assert reset_local(path, confirm=lambda _: True, say=said.append) == 0
    assert sorted(path.parent.iterdir()) == []
