"""``python -m bot run`` as an operator runs it (`BotProcess`): settings from the
environment (`bot_env`), JSON log lines in one file per start; kill -9, SIGTERM, start again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import trio


def _wall(record: dict[str, Any]) -> float:
    stamp = record.get("timestamp")
    if not isinstance(stamp, str):
        return 0.0
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


@dataclass
class _Run:
    number: int
    log_path: Path
    process: trio.Process
    started_at: float  # wall clock
    records: list[dict[str, Any]] = field(default_factory=list)
    offset: int = 0
    partial: bytes = b""
    stray_lines: list[str] = field(default_factory=list)


class BotProcess:
    """``python -m bot run`` as an operator runs it: settings from the environment,
    JSON log lines (stderr) in ``<name>-<n>.log``, one file per start.

    The owner (`FaultLab`) stops it by pid; every start, kill and stop is awaited.
    """

    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.env = env
        self.log_dir = log_dir
        self.runs: list[_Run] = []

    @property
    def user_id(self) -> str:
        return self.env["MATRIX_USER_ID"]

    @property
    def store_path(self) -> Path:
        return Path(self.env["BOT_STORE_PATH"])

    @property
    def current(self) -> _Run:
        if not self.runs:
            raise RuntimeError(f"{self.name} was never started")
        return self.runs[-1]

    @property
    def running(self) -> bool:
        return bool(self.runs) and self.current.process.returncode is None

    def exited(self) -> str | None:
        """None while the current start runs; else its exit code and last log lines."""
        if self.running:
            return None
        code = self.current.process.returncode if self.runs else None
        return f"{self.name} exited ({code}):\n{self.tail()}"

    @property
    def pid(self) -> int | None:
        return self.current.process.pid if self.running else None

    async def start(self) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        number = len(self.runs) + 1
        log_path = self.log_dir / f"{self.name}-{number}.log"
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "bot", "run"],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=fd,
            )
        finally:
            os.close(fd)
        self.runs.append(_Run(number, log_path, process, time.time()))

    # -- reading the logs --------------------------------------------------------------

    def _refresh(self, run: _Run) -> None:
        with run.log_path.open("rb") as log:
            log.seek(run.offset)
            data = log.read()
        run.offset += len(data)
        lines = (run.partial + data).split(b"\n")
        run.partial = lines.pop()
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            try:
                record = json.loads(line)
            except ValueError:
                run.stray_lines.append(line)
                continue
            if not isinstance(record, dict):
                run.stray_lines.append(line)
                continue
            record["_run"] = run.number
            record["_t"] = _wall(record)
            run.records.append(record)

    def records(self, run: int | None = None) -> list[dict[str, Any]]:
        """The JSON log records of start number ``run`` (1-based), or of all starts."""
        chosen = self.runs if run is None else [self.runs[run - 1]]
        found: list[dict[str, Any]] = []
        for each in chosen:
            self._refresh(each)
            found.extend(each.records)
        return found

    def events(self, name: str, run: int | None = None) -> list[dict[str, Any]]:
        return [r for r in self.records(run) if r.get("event") == name]

    def text(self) -> str:
        return "".join(run.log_path.read_text(errors="replace") for run in self.runs)

    def tail(self, lines: int = 25) -> str:
        if not self.runs:
            return "(never started)"
        text = self.current.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    async def wait_for(
        self,
        event: str,
        *,
        timeout: float = 60.0,
        count: int = 1,
        where: Callable[[dict[str, Any]], bool] | None = None,
    ) -> dict[str, Any]:
        """The ``count``-th record named ``event`` of the current start (matching ``where``).

        Fails when the process exits first or nothing comes within ``timeout`` s.
        """
        run = self.current
        deadline = trio.current_time() + timeout
        while True:
            self._refresh(run)
            found = [
                r for r in run.records if r.get("event") == event and (where is None or where(r))
            ]
            if len(found) >= count:
                return found[count - 1]
            if run.process.returncode is not None:
                self._refresh(run)
                raise AssertionError(
                    f"{self.name} exited ({run.process.returncode}) before logging {event}:\n"
                    f"{self.tail()}"
                )
            if trio.current_time() > deadline:
                raise AssertionError(
                    f"{self.name} did not log {event} within {timeout} s:\n{self.tail()}"
                )
            await trio.sleep(0.05)

    async def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        return await self.wait_for("bot_ready", timeout=timeout)

    # -- stopping ------------------------------------------------------------------------

    async def kill(self) -> None:
        """kill -9, and wait for it."""
        run = self.current
        if run.process.returncode is None:
            run.process.send_signal(signal.SIGKILL)
        await run.process.wait()

    async def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (a graceful stop); the exit code. Fails after ``timeout`` s."""
        run = self.current
        if run.process.returncode is None:
            run.process.send_signal(signal.SIGTERM)
        with trio.fail_after(timeout):
            return await run.process.wait()

    async def wait_exit(self, timeout: float = 60.0) -> int:
        with trio.fail_after(timeout):
            return await self.current.process.wait()

    async def stop(self) -> None:
        """Leave nothing running: SIGTERM, then SIGKILL if it does not go."""
        if not self.running:
            if self.runs:
                await self.current.process.wait()
            return
        try:
            await self.terminate(timeout=20.0)
        except trio.TooSlowError:
            await self.kill()


def bot_env(
    homeserver: str,
    user_id: str,
    store: Path,
    *,
    access_token: str | None,
    password: str | None,
    device_id: str | None,
    drain_s: float,
    allowed: Sequence[str],
    level: str,
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MATRIX_", "BOT_"))}
    env.update(
        MATRIX_HOMESERVER=homeserver,
        MATRIX_USER_ID=user_id,
        BOT_STORE_PATH=str(store),
        BOT_LOG_FORMAT="json",
        BOT_LOG_LEVEL=level,
        BOT_DRAIN_TIMEOUT_S=str(drain_s),
        # The scenarios measure delivery, not fairness: no user runs out of messages.
        BOT_USER_MESSAGES_BURST="100000",
    )
    if access_token is not None:
        env["MATRIX_ACCESS_TOKEN"] = access_token
    if password is not None:
        env["MATRIX_PASSWORD"] = password
    if device_id is not None:
        env["MATRIX_DEVICE_ID"] = device_id
    if allowed:
        env["BOT_ALLOWED_USERS"] = ",".join(allowed)
    return env
