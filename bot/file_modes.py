"""Files at rest that only the bot's own user may read, and the check of them.

The store holds every message body and conversation it keeps; its key files
(``<store>.pickle-key``, ``<store>.recovery-key``) unlock the crypto state and the
cross-signing keys; ``bot dev``'s ``accounts.json`` holds passwords. Each is created
0600 in a directory created 0700. The mode comes from the umask in force while the
file is made (0077 here), never from a chmod afterwards: there is no moment in which
another user could open the file. SQLite gives a database's ``-wal`` and ``-shm``
the mode of the database file itself.

Files that already exist are left as they are (the operator may have widened them on
purpose, for a backup group say); `doctor` names each one that is wider, and the
command that narrows it (`wider_than_private`).
"""

from __future__ import annotations

import os
import shlex
import stat
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "PRIVATE_UMASK",
    "WideMode",
    "make_private_dir",
    "private_paths",
    "private_umask",
    "wider_than_private",
]

PRIVATE_UMASK = 0o077
FILE_MODE = 0o600
DIR_MODE = 0o700

# The umask belongs to the process, not the thread: two blocks in two threads must not
# restore each other's value. Reentrant, so a block may call `make_private_dir`.
_umask_lock = threading.RLock()


@contextmanager
def private_umask() -> Iterator[None]:
    """Within the block, what this process creates is private to its user (umask 0077).

    A file another thread creates meanwhile comes out narrower than it would have,
    never wider.
    """
    with _umask_lock:
        previous = os.umask(PRIVATE_UMASK)
        try:
            yield
        finally:
            os.umask(previous)


def make_private_dir(path: Path) -> None:
    """Create ``path`` and its missing parents, 0700; existing ones are left as they are."""
    with private_umask():
        path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)


def private_paths(store_path: Path) -> list[Path]:
    """The bot's files at rest beside ``store_path``: the store, its WAL files, its lock
    and its key files (whichever exist or not)."""
    name = store_path.name
    return [
        store_path,
        *(store_path.with_name(f"{name}{suffix}") for suffix in ("-wal", "-shm", ".lock")),
        store_path.with_name(f"{name}.pickle-key"),
        store_path.with_name(f"{name}.recovery-key"),
    ]


@dataclass(frozen=True)
class WideMode:
    """An existing file (or directory) that others may read or write."""

    path: Path
    mode: int
    is_dir: bool

    @property
    def wanted(self) -> int:
        return DIR_MODE if self.is_dir else FILE_MODE

    def advice(self) -> str:
        """One line: what, which file, the command that fixes it."""
        who = "other users can write in it" if self.is_dir else "other users can read it"
        kind = "directory" if self.is_dir else "file"
        return (
            f"{kind} {self.path} is {self.mode:04o}, {who}: "
            f"chmod {self.wanted:o} {shlex.quote(str(self.path))}"
        )


def wider_than_private(paths: Iterable[Path], directory: Path | None = None) -> list[WideMode]:
    """The ``paths`` that exist with any permission for the group or others, and
    ``directory`` when the group or others may write in it (then they could replace
    the files in it).

    A directory others may only list is not reported: it shows the files' names, and
    the files themselves are what is protected (the default store path is in the
    working directory, which is rarely 0700). Symbolic links are followed.
    """
    found: list[WideMode] = []
    for path in paths:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except OSError:  # not there (yet), or not ours to look at: nothing to say
            continue
        if mode & 0o077:
            found.append(WideMode(path, mode, is_dir=False))
    if directory is not None:
        try:
            info = directory.stat()
        except OSError:
            return found
        mode = stat.S_IMODE(info.st_mode)
        # /tmp-like sticky directories still let others drop files next to ours,
        # but not replace them.
        if mode & 0o022 and not mode & stat.S_ISVTX:
            found.append(WideMode(directory, mode, is_dir=True))
    return found
