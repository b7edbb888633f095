"""Launch a real, throwaway Synapse homeserver on 127.0.0.1.

Used by the integration tests, ``python -m bot dev`` and the benchmarks. This is plain blocking
code (subprocess and `httpx.Client`) for pytest fixtures and CLIs; never call it from trio tasks.
It must not import pytest or anything from ``bot``.

Synapse lives in its own virtualenv (`ensure_synapse_installed`), so its many dependencies never
mix with ours. Everything one server writes stays in its data dir::

    homeserver.yaml      generated once by Synapse: signing key path, macaroon secret, ...
    overrides.json       our settings, passed as a second ``-c``; rewritten on every start
    log_config.json      Synapse's logging setup: everything goes to homeserver.log
    homeserver.log       Synapse's own log
    synapse.stdout.log   Synapse's stdout/stderr (tracebacks from before logging is set up)
    synapse.pid          pid of the running server, so a later start can clean up after us
    homeserver.db        the sqlite database
    media_store/

Command line::

    python -m matrix_api.testing.synapse install
    python -m matrix_api.testing.synapse run --data-dir DIR
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Final, Self

import httpx

SYNAPSE_VERSION: Final = "1.163.2"
SYNAPSE_REQUIREMENT: Final = f"matrix-synapse=={SYNAPSE_VERSION}"
VENV_ENV_VAR: Final = "SURFACES_SYNAPSE_VENV"
DEFAULT_VENV_PATH: Final = Path("~/.cache/surfaces-bot/synapse-venv")
DEFAULT_SERVER_NAME: Final = "localhost"
HOST: Final = "127.0.0.1"

_HOMESERVER_MODULE: Final = "synapse.app.homeserver"
_LOG_TAIL_LINES: Final = 40
_LOWEST_PORT: Final = 15000  # above the registered ports most local services use


class SynapseLauncherError(Exception):
    """Synapse could not be installed, started or used."""


class SynapseInstallError(SynapseLauncherError):
    """Creating Synapse's virtualenv or installing Synapse into it failed."""


class SynapseStartError(SynapseLauncherError):
    """Synapse did not come up; the message ends with the tails of its logs."""


class RegistrationError(SynapseLauncherError):
    """The admin registration API refused to create a user."""


@dataclass(frozen=True)
class RegisteredUser:
    """A user created through the shared-secret admin API, logged in on one device."""

    user_id: str
    access_token: str = field(repr=False)  # kept out of reprs, so out of pytest failure output
    device_id: str
    password: str = field(repr=False)


# ---------------------------------------------------------------------------------------------
# Installation


def default_venv_path() -> Path:
    """Where Synapse's virtualenv lives: ``$SURFACES_SYNAPSE_VENV``, else the user cache."""
    configured = os.environ.get(VENV_ENV_VAR)
    return Path(configured).expanduser() if configured else DEFAULT_VENV_PATH.expanduser()


def installed_synapse_version(python: Path) -> str | None:
    """The Synapse version importable by `python`, or None if there is none (or no python)."""
    if not python.exists():
        return None
    result = subprocess.run(
        [str(python), "-c", "import synapse; print(synapse.__version__)"],
        capture_output=True,
        text=True,
        env=_child_env(),
        check=False,
    )
    return result.stdout.strip() if result.returncode == 0 else None


def ensure_synapse_installed(venv_path: Path | None = None) -> Path:
    """Make sure `SYNAPSE_VERSION` is installed in its own virtualenv; return that venv's python.

    `venv_path` defaults to `default_venv_path()`. The venv is created with this interpreter's
    ``venv`` module and Synapse is pip-installed only when the venv does not already have the
    pinned version, which takes about 30 s. Concurrent callers (parallel CI jobs, xdist workers)
    are serialised with a lock file next to the venv.

    Raises `SynapseInstallError` with pip's output when anything fails.
    """
    venv = (venv_path or default_venv_path()).expanduser().absolute()
    python = venv / "bin" / "python"
    if installed_synapse_version(python) == SYNAPSE_VERSION:
        return python

    venv.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(venv.with_name(venv.name + ".lock")):
        # Someone else may have finished the install while we waited for the lock.
        if installed_synapse_version(python) == SYNAPSE_VERSION:
            return python
        if not python.exists():
            _run_or_raise([sys.executable, "-m", "venv", str(venv)], f"creating venv {venv}")
        _run_or_raise(
            [
                str(python),
                *("-m", "pip", "install", "-q", "--disable-pip-version-check"),
                SYNAPSE_REQUIREMENT,
            ],
            f"pip install {SYNAPSE_REQUIREMENT} into {venv}",
        )
        found = installed_synapse_version(python)
        if found != SYNAPSE_VERSION:
            raise SynapseInstallError(
                f"after installing {SYNAPSE_REQUIREMENT}, {python} imports synapse {found}"
            )
    return python


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with path.open("a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # released when the file is closed
        yield


def _run_or_raise(args: list[str], what: str) -> None:
    # pip prints harmless warnings even with -q; show its output only when it failed.
    result = subprocess.run(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_child_env(),
        check=False,
    )
    if result.returncode != 0:
        raise SynapseInstallError(
            f"{what} failed with exit code {result.returncode}:\n{_tail(result.stdout, 60)}"
        )


def _child_env() -> dict[str, str]:
    # Our own interpreter's settings must not leak into Synapse's virtualenv.
    leaky = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV"}
    return {key: value for key, value in os.environ.items() if key not in leaky}


# ---------------------------------------------------------------------------------------------
# Configuration


def _relaxed_rate_limits() -> dict[str, Any]:
    """Every rate limit Synapse 1.163 reads (synapse/config/ratelimiting.py), far out of reach."""
    high = {"per_second": 1000, "burst_count": 10000}
    return {
        "rc_message": high,
        "rc_registration": high,
        "rc_registration_token_validity": high,
        "rc_login": {"address": high, "account": high, "failed_attempts": high},
        "rc_admin_redaction": high,
        "rc_joins": {"local": high, "remote": high},
        "rc_joins_per_room": high,
        "rc_key_requests": high,  # to-device messages
        "rc_3pid_validation": high,
        "rc_invites": {"per_room": high, "per_user": high, "per_issuer": high},
        "rc_third_party_invite": high,
        "rc_media_create": high,
        "rc_presence": {"per_user": high},
        "rc_delayed_event_mgmt": high,
        "rc_room_creation": high,
        "rc_reports": high,
        "rc_user_directory": high,
        "rc_profile": high,
        # Not a token bucket but a sliding window; we serve no federation, but "relaxed"
        # should mean relaxed everywhere.
        "rc_federation": {
            "window_size": 1000,
            "sleep_limit": 10000,
            "sleep_delay": 500,
            "reject_limit": 10000,
            "concurrent": 1000,
        },
    }


def _log_config(log_file: Path, level: str) -> dict[str, Any]:
    return {
        "version": 1,
        "formatters": {
            # `request` is filled in by a log record factory Synapse installs.
            "precise": {
                "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s"
                " - %(request)s - %(message)s"
            }
        },
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "formatter": "precise",
                "filename": str(log_file),
                "encoding": "utf8",
            }
        },
        # At DEBUG this logger writes access tokens; never let a global level change reach it.
        "loggers": {"synapse.storage.SQL": {"level": "WARNING"}},
        "root": {"level": level, "handlers": ["file"]},
        "disable_existing_loggers": False,
    }


def _write_private(path: Path, data: dict[str, Any]) -> None:
    # The overrides hold the registration secret: readable by us only.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)  # JSON is YAML, so Synapse reads it and we need no yaml


def _free_port() -> int:
    """A free port below the kernel's ephemeral range.

    Outgoing connections (say, a client retrying while the server is down for an outage test)
    take their local ports from the ephemeral range, so one of them could grab the port of a
    stopped server; below that range only listeners like ours compete.
    """
    first_ephemeral = _first_ephemeral_port()
    if first_ephemeral > _LOWEST_PORT + 1000:
        for _ in range(100):
            port = random.randrange(_LOWEST_PORT, first_ephemeral)
            if _port_is_free(port):
                return port
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        any_port: int = sock.getsockname()[1]
        return any_port


def _first_ephemeral_port() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 49152  # the IANA range, which macOS uses


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        # Twisted listens with SO_REUSEADDR, so a port that only has TIME_WAIT connections
        # left (right after a stop) is free for Synapse: probe it the same way.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


# ---------------------------------------------------------------------------------------------
# Processes


def _signal_group(pid: int, sig: signal.Signals) -> None:
    # We start Synapse in a new session, so its pid is also the id of its process group.
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _command_line(pid: int) -> str | None:
    """The command line of process `pid`, or None if there is no such (live) process."""
    proc_file = Path(f"/proc/{pid}/cmdline")
    if Path("/proc/self").exists():
        try:
            raw = proc_file.read_bytes()
        except OSError:
            return None
        return raw.replace(b"\0", b" ").decode(errors="replace") or None  # zombies: empty
    result = subprocess.run(
        ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, check=False
    )
    return result.stdout.strip() or None


def _is_synapse_for(pid: int, config_path: Path) -> bool:
    # Check the config path too: after a reboot the stale pid may belong to anything.
    command = _command_line(pid)
    return command is not None and _HOMESERVER_MODULE in command and str(config_path) in command


def _tail(text: str, lines: int = _LOG_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _file_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return "(missing)"
    return _tail(text, lines) or "(empty)"


def _registration_mac(secret: str, nonce: str, username: str, password: str, admin: bool) -> str:
    mac = hmac.new(secret.encode(), digestmod=hashlib.sha1)
    mac.update(b"\0".join([nonce.encode(), username.encode(), password.encode()]))
    mac.update(b"\0admin" if admin else b"\0notadmin")
    return mac.hexdigest()


def _describe_error(response: httpx.Response) -> str:
    # Only errcode and error: a response body may carry tokens.
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    return f"HTTP {response.status_code} {body.get('errcode', '')}: {body.get('error', '')}"


def _retry_after(response: httpx.Response) -> float:
    try:
        millis = response.json().get("retry_after_ms")
    except (ValueError, AttributeError):
        millis = None
    if isinstance(millis, int | float):
        return millis / 1000
    header = response.headers.get("Retry-After", "")
    return float(header) if header.isdigit() else 1.0


# ---------------------------------------------------------------------------------------------
# The server


class SynapseServer:
    """One Synapse homeserver listening on 127.0.0.1, with all its state in `data_dir`.

    The server is started by `start()` (or ``with SynapseServer(...) as server:``) and must be
    stopped by `stop()`; the object owns the process. It can be stopped and started again on
    the same data dir: users, rooms and tokens survive, and the port stays the same unless
    something else took it meanwhile (then `base_url` changes). Starting on a data dir whose
    ``synapse.pid`` names a Synapse still running on that dir kills that one first.

    `relaxed_rate_limits` (the default) raises every rate limit out of reach; pass False to
    keep Synapse's defaults, e.g. to provoke real 429s.

    Not thread-safe. Blocking: do not call from inside trio.
    """

    def __init__(
        self,
        data_dir: Path | str,
        *,
        server_name: str = DEFAULT_SERVER_NAME,
        relaxed_rate_limits: bool = True,
        venv_path: Path | None = None,
        startup_timeout: float = 60.0,
        log_level: str = "INFO",
    ) -> None:
        # Absolute, because Synapse runs with the data dir as its working directory.
        self._data_dir = Path(data_dir).expanduser().absolute()
        self._server_name = server_name
        self._relaxed_rate_limits = relaxed_rate_limits
        self._venv_path = venv_path
        self._startup_timeout = startup_timeout
        self._log_level = log_level
        self._python: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._shared_secret: str | None = None

    def __repr__(self) -> str:
        where = self.base_url if self._port is not None else "not started"
        return f"<SynapseServer {self._server_name} at {where}, data in {self._data_dir}>"

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def server_name(self) -> str:
        return self._server_name

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``; known once `start()` has been called."""
        if self._port is None:
            raise RuntimeError("the Synapse server has not been started yet")
        return f"http://{HOST}:{self._port}"

    @property
    def shared_secret(self) -> str:
        """The ``registration_shared_secret`` for the admin register API."""
        if self._shared_secret is None:
            raise RuntimeError("the Synapse server has not been started yet")
        return self._shared_secret

    @property
    def pid(self) -> int | None:
        """The pid of the Synapse process while it runs, else None."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def log_path(self) -> Path:
        return self._data_dir / "homeserver.log"

    @property
    def _config_path(self) -> Path:
        return self._data_dir / "homeserver.yaml"

    @property
    def _overrides_path(self) -> Path:
        return self._data_dir / "overrides.json"

    @property
    def _pid_path(self) -> Path:
        return self._data_dir / "synapse.pid"

    @property
    def _stdout_path(self) -> Path:
        return self._data_dir / "synapse.stdout.log"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start Synapse and block until it answers ``/_matrix/client/versions``.

        Installs Synapse first if needed. Raises `SynapseInstallError` or `SynapseStartError`
        (with the tail of Synapse's logs); after an error no process is left running.
        """
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        if self._python is None:
            self._python = ensure_synapse_installed(self._venv_path)
        self._data_dir.mkdir(parents=True, exist_ok=True)
        self._kill_stale_server()
        self._generate_config(self._python)
        self._write_overrides()
        self._launch(self._python)
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM Synapse's process group, then SIGKILL after `timeout` s; no-op if stopped."""
        process = self._process
        if process is None:
            return
        try:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                process.wait()
        finally:
            if process.poll() is None:  # interrupted (Ctrl-C) while waiting: leave nothing
                _signal_group(process.pid, signal.SIGKILL)
                process.wait()
            self._process = None
            self._pid_path.unlink(missing_ok=True)

    def restart(self) -> None:
        """`stop()` then `start()`: same data, and the same port if it is still free."""
        self.stop()
        self.start()

    def register_user(
        self,
        username: str,
        password: str | None = None,
        *,
        admin: bool = False,
        timeout: float = 60.0,
    ) -> RegisteredUser:
        """Create a user with the shared-secret admin API and return its login.

        A random password is generated when none is given. Synapse lowercases `username`.
        A 429 is retried, honouring ``retry_after_ms``, for up to `timeout` s in total.
        Raises `RegistrationError` (e.g. ``M_USER_IN_USE``).
        """
        if not self.running:
            raise RuntimeError(f"{self!r} is not running")
        if password is None:
            password = secrets.token_urlsafe(18)
        url = f"{self.base_url}/_synapse/admin/v1/register"
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=30.0) as client:
            while True:
                # A nonce is single-use, so every attempt needs a fresh one.
                response = client.get(url)
                if response.status_code == 200:
                    nonce = response.json()["nonce"]
                    mac = _registration_mac(self.shared_secret, nonce, username, password, admin)
                    body = {
                        "nonce": nonce,
                        "username": username,
                        "password": password,
                        "admin": admin,
                        "mac": mac,
                    }
                    response = client.post(url, json=body)
                if response.status_code != 429 or time.monotonic() >= deadline:
                    break
                time.sleep(min(_retry_after(response), max(0.0, deadline - time.monotonic())))
        if response.status_code != 200:
            raise RegistrationError(f"registering {username!r}: {_describe_error(response)}")
        created = response.json()
        return RegisteredUser(
            user_id=created["user_id"],
            access_token=created["access_token"],
            device_id=created["device_id"],
            password=password,
        )

    # -- start() steps --------------------------------------------------------------------

    def _kill_stale_server(self) -> None:
        """Stop a Synapse left running on this data dir by an earlier process that died."""
        try:
            pid = int(self._pid_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return
        if _is_synapse_for(pid, self._config_path):
            _signal_group(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10.0
            while _is_synapse_for(pid, self._config_path):
                if time.monotonic() > deadline:
                    _signal_group(pid, signal.SIGKILL)
                    deadline = time.monotonic() + 10.0
                time.sleep(0.05)
        self._pid_path.unlink(missing_ok=True)

    def _generate_config(self, python: Path) -> None:
        """Have Synapse generate homeserver.yaml and its secrets, once per data dir."""
        if self._shared_secret is None and self._overrides_path.exists():
            # A data dir started before, maybe by another process: keep its secret and port.
            previous = json.loads(self._overrides_path.read_text(encoding="utf-8"))
            if previous.get("server_name") != self._server_name:
                raise SynapseStartError(
                    f"{self._data_dir} holds a server named {previous.get('server_name')!r},"
                    f" not {self._server_name!r}; use another data dir"
                )
            self._shared_secret = previous["registration_shared_secret"]
            self._port = previous["listeners"][0]["port"]
        if self._config_path.exists():
            return
        result = subprocess.run(
            [
                str(python),
                *("-m", _HOMESERVER_MODULE),
                *("--server-name", self._server_name),
                *("--config-path", str(self._config_path)),
                "--generate-config",
                "--report-stats=no",
            ],
            cwd=self._data_dir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_child_env(),
            check=False,
        )
        if result.returncode != 0:
            raise SynapseStartError(
                f"generating the Synapse config in {self._data_dir} failed"
                f" with exit code {result.returncode}:\n{_tail(result.stdout)}"
            )

    def _write_overrides(self) -> None:
        if self._shared_secret is None:
            self._shared_secret = secrets.token_urlsafe(32)
        if self._port is None or not _port_is_free(self._port):
            self._port = _free_port()
        log_config_path = self._data_dir / "log_config.json"
        _write_private(log_config_path, _log_config(self.log_path, self._log_level))
        overrides: dict[str, Any] = {
            "server_name": self._server_name,
            "listeners": [
                {
                    "port": self._port,
                    "bind_addresses": [HOST],
                    "type": "http",
                    "tls": False,
                    "x_forwarded": False,
                    "resources": [{"names": ["client"], "compress": False}],
                }
            ],
            "database": {
                "name": "sqlite3",
                "args": {"database": str(self._data_dir / "homeserver.db")},
            },
            "log_config": str(log_config_path),
            "media_store_path": str(self._data_dir / "media_store"),
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "presence": {"enabled": False},
            "bcrypt_rounds": 4,  # registration and login hash passwords; keep tests fast
            "registration_shared_secret": self._shared_secret,
            "enable_registration": False,
            "report_stats": False,
            "url_preview_enabled": False,
        }
        if self._relaxed_rate_limits:
            overrides |= _relaxed_rate_limits()
        _write_private(self._overrides_path, overrides)

    def _launch(self, python: Path) -> None:
        with self._stdout_path.open("ab") as output:
            output.write(f"--- starting Synapse at {time.ctime()}\n".encode())
            output.flush()
            # The child keeps its own copy of the log file descriptor; ours closes here.
            self._process = subprocess.Popen(
                [
                    str(python),
                    *("-m", _HOMESERVER_MODULE),
                    *("-c", str(self._config_path)),
                    *("-c", str(self._overrides_path)),
                ],
                cwd=self._data_dir,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=_child_env(),
                # Own process group: stop() can signal Synapse and any children together,
                # and a Ctrl-C in our terminal reaches only us, so we stop it in order.
                start_new_session=True,
            )
        self._pid_path.write_text(f"{self._process.pid}\n")

    def _wait_until_ready(self) -> None:
        process = self._process
        assert process is not None
        url = f"{self.base_url}/_matrix/client/versions"
        deadline = time.monotonic() + self._startup_timeout
        with httpx.Client(timeout=2.0) as client:
            while True:
                returncode = process.poll()
                if returncode is not None:
                    raise SynapseStartError(
                        f"Synapse exited with code {returncode} while starting\n{self._logs()}"
                    )
                with contextlib.suppress(httpx.TransportError):
                    if client.get(url).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise SynapseStartError(
                        f"Synapse did not answer {url} within {self._startup_timeout} s\n"
                        f"{self._logs()}"
                    )
                time.sleep(0.1)

    def _logs(self) -> str:
        return (
            f"--- tail of {self._stdout_path}\n{_file_tail(self._stdout_path)}\n"
            f"--- tail of {self.log_path}\n{_file_tail(self.log_path)}"
        )


# ---------------------------------------------------------------------------------------------
# Command line


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through the `with` block, which stops Synapse


def _run(args: argparse.Namespace) -> int:
    server = SynapseServer(
        args.data_dir,
        server_name=args.server_name,
        relaxed_rate_limits=not args.strict_rate_limits,
        venv_path=args.venv,
    )
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    started = time.monotonic()
    try:
        with server:
            print(f"Synapse {SYNAPSE_VERSION} is running ({time.monotonic() - started:.1f} s)")
            print(f"  url:           {server.base_url}")
            print(f"  server name:   {server.server_name}")
            print(f"  shared secret: {server.shared_secret}")
            print(f"  log:           {server.log_path}")
            print("Press Ctrl-C to stop it.", flush=True)
            while server.running:
                time.sleep(0.5)
            print(f"Synapse exited on its own; see {server.log_path}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        print("Stopped.")
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m matrix_api.testing.synapse",
        description="Install or run a throwaway Synapse homeserver on 127.0.0.1.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--venv",
        type=Path,
        default=None,
        help=f"Synapse's virtualenv (default: ${VENV_ENV_VAR} or {DEFAULT_VENV_PATH})",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "install", parents=[common], help=f"install {SYNAPSE_REQUIREMENT} if needed"
    )
    run = commands.add_parser("run", parents=[common], help="run one server until Ctrl-C")
    run.add_argument("--data-dir", type=Path, required=True, help="where the server keeps state")
    run.add_argument("--server-name", default=DEFAULT_SERVER_NAME)
    run.add_argument(
        "--strict-rate-limits",
        action="store_true",
        help="keep Synapse's default rate limits instead of relaxing them",
    )
    args = parser.parse_args(argv)

    try:
        if args.command == "install":
            python = ensure_synapse_installed(args.venv)
            print(f"Synapse {SYNAPSE_VERSION} is installed: {python}")
            return 0
        return _run(args)
    except SynapseLauncherError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
