"""A throwaway PostgreSQL 15 server for tests and benchmarks.

``initdb`` on a fresh temporary directory, ``pg_ctl`` on a loopback port with trust
authentication, stopped by the postmaster's PID and deleted afterwards. As root, the
server runs as the ``postgres`` user (``runuser``), since PostgreSQL refuses root.
The binaries come from the Debian package (``/usr/lib/postgresql/15/bin``, or
``$PG_BIN``); `.ci/run` installs it when missing.

    with PostgresServer() as server:
        url = server.new_database_url()   # or server.url("postgres")
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType

import psycopg

__all__ = ["PG_BIN", "PostgresServer", "missing_binaries"]

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
_SUPERUSER = "postgres"
_START_TIMEOUT_S = 60
_STOP_TIMEOUT_S = 30


def missing_binaries() -> str | None:
    """Why no server can be started here, or None when one can."""
    for name in ("initdb", "pg_ctl", "postgres"):
        if not (PG_BIN / name).is_file():
            return f"PostgreSQL 15 is not installed ({PG_BIN / name} missing; .ci/run installs it)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: PostgreSQL refuses to run as root"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _alive(pid: int) -> bool:
    # A zombie (its parent, pg_ctl, is gone and no one may reap it) has ended too.
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


class PostgresServer:
    """One PostgreSQL server on 127.0.0.1, owned by this object: `start` makes it,
    `stop` ends it by PID and removes its directory (a context manager does both).

    ``durable=False`` (tests) turns fsync off: the server's own crash safety is not
    what the tests check, and it makes each commit cheap on a busy machine.
    """

    def __init__(self, *, durable: bool = False) -> None:
        self.durable = durable
        self.port = 0
        self.pid: int | None = None
        self._dir: Path | None = None

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _as_server_user(self, *argv: str) -> list[str]:
        return ["runuser", "-u", _SUPERUSER, "--", *argv] if os.geteuid() == 0 else list(argv)

    def start(self) -> None:
        reason = missing_binaries()
        if reason is not None:
            raise RuntimeError(reason)
        # Not under pytest's tmp_path: its 0700 parents would keep the postgres user out.
        self._dir = Path(tempfile.mkdtemp(prefix="surfaces-bot-pg-"))
        data = self._dir / "data"
        if os.geteuid() == 0:
            shutil.chown(self._dir, _SUPERUSER, _SUPERUSER)
        try:
            subprocess.run(
                self._as_server_user(
                    str(PG_BIN / "initdb"),
                    "--pgdata",
                    str(data),
                    "--username",
                    _SUPERUSER,
                    "--auth",
                    "trust",
                    "--encoding",
                    "UTF8",
                    "--locale",
                    "C",
                    "--no-sync",
                ),
                check=True,
                capture_output=True,
                timeout=_START_TIMEOUT_S,
            )
            options = [
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self._dir}",
                "-c max_connections=50",
            ]
            if not self.durable:
                options += ["-c fsync=off", "-c full_page_writes=off"]
            for _attempt in range(5):  # the port may be taken between probe and bind
                self.port = _free_port()
                started = subprocess.run(
                    self._as_server_user(
                        str(PG_BIN / "pg_ctl"),
                        "start",
                        "--wait",
                        f"--timeout={_START_TIMEOUT_S}",
                        "--pgdata",
                        str(data),
                        "--log",
                        str(self._dir / "server.log"),
                        "-o",
                        " ".join([*options, f"-p {self.port}"]),
                    ),
                    capture_output=True,
                    timeout=_START_TIMEOUT_S + 10,
                    check=False,
                )
                if started.returncode == 0:
                    break
            else:
                log = (self._dir / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"PostgreSQL did not start: {started.stderr!r}\n{log}")
            self.pid = int((data / "postmaster.pid").read_text().split()[0])
        except BaseException:
            self.stop()
            raise

    def url(self, database: str = "postgres", **options: str) -> str:
        query = "&".join(f"{key}={value}" for key, value in options.items())
        base = f"postgresql://{_SUPERUSER}@127.0.0.1:{self.port}/{database}"
        return f"{base}?{query}" if query else base

    def new_database_url(self) -> str:
        """A URL to a new, empty database of its own (a test's private store)."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')  # a fixed alphabet: no injection
        return self.url(name)

    def stop(self) -> None:
        """Fast shutdown by PID (SIGINT: clients cut, no checkpoint wait), SIGKILL if it
        lingers; then the directory goes."""
        pid, self.pid = self.pid, None
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
                deadline = time.monotonic() + _STOP_TIMEOUT_S
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
        directory, self._dir = self._dir, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
