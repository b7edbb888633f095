"""One process per store: an advisory lock on a file beside it.

Two bots on one store would both take up its inbox and answer each message twice
(the backend asked twice, a streamed reply edited by two writers), and SQLite's
own locks would surface as "database is locked" in the sync loop. So the store is
held, for as long as it is open, with ``flock`` on ``<store>.lock``. The kernel
drops the lock when the process ends, however it ends: after a crash the file may
still be there, but it locks nothing, and no one has to delete it.

The file holds the holder's process id, for the error that names it, and goes
when the lock is let go, so a store refused at open is left with nothing new
beside it. Removing it is safe because a lock counts only while its file is still
the one at the path: a process that locked the file just as it was removed finds
that out and takes the lock again on the new file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

import structlog
import trio

from .file_modes import make_private_dir

__all__ = ["StoreLock", "StoreLockHeld", "lock_path"]

log = structlog.get_logger("bot.store")

_POLL_S = 0.1


def lock_path(store_path: Path) -> Path:
    return Path(f"{store_path}.lock")


class StoreLockHeld(Exception):
    """Another process holds the store."""

    def __init__(self, store_path: Path, holder_pid: int | None) -> None:
        holder = f"another process (pid {holder_pid})" if holder_pid else "another process"
        super().__init__(f"{store_path} is in use by {holder}")
        self.holder_pid = holder_pid


class StoreLock:
    """The lock on one store, held until `release` (or the process ends)."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    @classmethod
    def try_acquire(cls, store_path: Path) -> StoreLock:
        """Take the lock now, or raise `StoreLockHeld`."""
        path = lock_path(store_path)
        # The store's directory, when the bot makes it, is 0700 (bot.file_modes); the
        # lock file is 0600 whatever the umask (open(2) only narrows the mode given).
        make_private_dir(path.parent)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if _is_at(fd, path):
                    break
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                raise StoreLockHeld(store_path, holder) from None
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # its holder removed it as we locked it: lock the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd, path)

    @classmethod
    async def acquire(cls, store_path: Path, *, wait_s: float = 0.0) -> StoreLock:
        """Take the lock, waiting up to ``wait_s`` for its holder to let go (a bot
        still draining while its successor starts); then raise `StoreLockHeld`."""
        deadline = trio.current_time() + wait_s
        waiting = False
        while True:
            try:
                return cls.try_acquire(store_path)
            except StoreLockHeld as held:
                if trio.current_time() >= deadline:
                    raise
                if not waiting:
                    waiting = True
                    log.info("store_lock_wait", path=str(store_path), holder_pid=held.holder_pid)
            await trio.sleep(_POLL_S)

    def release(self) -> None:
        """Let go of the lock and remove its file; calling it again does nothing."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # while still held: see the module's docstring
            os.close(fd)  # closing the only descriptor drops the flock

    def __enter__(self) -> StoreLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _is_at(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is still the one at ``path``."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip())
    return None
