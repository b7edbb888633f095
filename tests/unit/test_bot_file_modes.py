"""Files at rest: the store, its WAL files, its lock, its key files and ``bot dev``'s
data are created 0600 in 0700 directories whatever the process's umask, existing wider
files are left alone, and ``doctor`` names each one with the command that fixes it."""

from __future__ import annotations

import io
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from bot import dev
from bot.config import Settings
from bot.doctor import run_doctor
from bot.e2ee.pickle_key import key_file_for, load_pickle_key
from bot.file_modes import private_paths, private_umask, wider_than_private
from bot.store import Store
from bot.store_lock import lock_path
from mini_http import HTTPRequest, Responder, serve_http

BOT = "@bot:example.org"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    """The umask of most shells and service managers (0022: new files world-readable),
    so that nothing here passes only because the test runner's umask is strict."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def current_umask() -> int:
    value = os.umask(0)
    os.umask(value)
    return value


async def test_a_new_store_its_wal_files_and_its_lock_are_0600_in_0700_directories(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state" / "deeper" / "bot.sqlite3"
    store = await Store.open(path, BOT)
    try:
        await store.set_meta("device_id", "DEV")  # a write: the WAL holds it
        wal, shm = Path(f"{path}-wal"), Path(f"{path}-shm")
        assert wal.stat().st_size > 0
        files = {p.name: mode(p) for p in (path, wal, shm, lock_path(path))}
        assert files == {name: 0o600 for name in files}, {n: oct(m) for n, m in files.items()}
        # The checkpointer's own connection (a second one, opened later) changes nothing.
        store._checkpoint()
        assert mode(wal) == mode(shm) == 0o600
    finally:
        await store.aclose()
    assert mode(path) == 0o600
    assert mode(tmp_path / "state") == mode(tmp_path / "state" / "deeper") == 0o700
    assert current_umask() == 0o022  # the process's umask is given back


async def test_the_pickle_key_file_beside_the_store_is_0600(tmp_path: Path) -> None:
    store_path = tmp_path / "bot.sqlite3"
    load_pickle_key(None, store_path)
    assert mode(key_file_for(store_path)) == 0o600


async def test_an_existing_wider_store_is_not_changed_and_is_named_with_its_fix(
    tmp_path: Path,
) -> None:
    path = tmp_path / "bot.sqlite3"
    store = await Store.open(path, BOT)
    await store.aclose()
    path.chmod(0o644)  # as an older version (or an operator) left it

    store = await Store.open(path, BOT)
    try:
        await store.set_meta("device_id", "DEV")
        assert mode(path) == 0o644  # not silently narrowed
        wide = wider_than_private(private_paths(path), tmp_path)
        # SQLite gives the WAL files the database's mode: they are named too.
        assert {w.path.name for w in wide} == {path.name, f"{path.name}-wal", f"{path.name}-shm"}
        advice = next(w for w in wide if w.path == path).advice()
        assert advice == f"file {path} is 0644, other users can read it: chmod 600 {path}"
    finally:
        await store.aclose()


def test_a_directory_others_may_write_in_is_named_one_they_may_only_list_is_not(
    tmp_path: Path,
) -> None:
    listed, writable, sticky = tmp_path / "listed", tmp_path / "wr ite", tmp_path / "sticky"
    for directory, directory_mode in ((listed, 0o755), (writable, 0o777), (sticky, 0o1777)):
        directory.mkdir()
        directory.chmod(directory_mode)
    assert wider_than_private([], listed) == []
    assert wider_than_private([], sticky) == []
    (wide,) = wider_than_private([], writable)
    # A path with a space is quoted in the command.
    assert wide.advice() == (
        f"directory {writable} is 0777, other users can write in it: chmod 700 '{writable}'"
    )


def test_the_umask_block_restores_the_umask_even_when_it_fails() -> None:
    inside: list[int] = []

    def fail() -> None:
        with private_umask():
            inside.append(current_umask())
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        fail()
    assert inside == [0o077]
    assert current_umask() == 0o022


async def doctor_lines(store_path: Path) -> list[str]:
    """The doctor's lines against a homeserver that answers nothing useful (404)."""

    async def nothing(request: HTTPRequest, out: Responder) -> None:
        await out.send(404, b'{"errcode": "M_UNRECOGNIZED", "error": "no"}')

    lines: list[str] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_http, nothing)
            settings = Settings(
                homeserver=f"http://127.0.0.1:{port}",
                user_id=BOT,
                access_token="syt_token",
                store_path=store_path,
            )
            await run_doctor(settings, lines.append)
            nursery.cancel_scope.cancel()
    return lines


async def test_doctor_warns_of_each_wider_file_with_the_command_to_fix_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "bot.sqlite3"
    store = await Store.open(path, BOT)
    await store.aclose()
    load_pickle_key(None, path)
    assert [line for line in await doctor_lines(path) if line.startswith("WARN")] == []

    path.chmod(0o640)
    key = key_file_for(path)
    key.chmod(0o604)
    warnings = [line for line in await doctor_lines(path) if line.startswith("WARN")]

    assert warnings == [
        f"WARN  files: file {path} is 0640, other users can read it: chmod 600 {path}",
        f"WARN  files: file {key} is 0604, other users can read it: chmod 600 {key}",
    ]
    # The doctor changes nothing.
    assert mode(path) == 0o640
    assert mode(key) == 0o604


@dataclass
class _Registered:
    user_id: str
    password: str


class _FakeSynapse:
    """What `run_dev` uses of `SynapseServer`; it writes a file as Synapse would."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.base_url = "http://127.0.0.1:1"
        self.server_name = "localhost"

    def __enter__(self) -> _FakeSynapse:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "homeserver.signing.key").write_text("ed25519 a_key secret\n")
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    def register_user(self, localpart: str, password: str) -> _Registered:
        return _Registered(f"@{localpart}:{self.server_name}", password)


async def _open_and_write(settings: Settings) -> None:
    store = await Store.open(settings.store_path, settings.user_id)
    try:
        await store.set_meta("device_id", "DEV")
    finally:
        await store.aclose()


def test_dev_data_is_private_and_the_umask_is_given_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dev, "SynapseServer", _FakeSynapse)
    data_dir = tmp_path / "dev-data"
    seen: dict[str, int] = {}

    def serve(settings: Settings) -> int:
        seen["umask"] = current_umask()
        trio.run(_open_and_write, settings)
        return 0

    out = io.StringIO()
    assert dev.run_dev(data_dir, serve, out) == 0

    assert seen["umask"] == 0o077  # Synapse and the bot ran under it
    assert current_umask() == 0o022
    assert mode(data_dir) == mode(data_dir / "synapse") == 0o700
    accounts = data_dir / "accounts.json"
    assert set(json.loads(accounts.read_text())) >= {"bot_password", "user_password"}
    for path in (accounts, data_dir / "synapse" / "homeserver.signing.key"):
        assert mode(path) == 0o600, path
    for path in private_paths(data_dir / "bot.sqlite3"):
        if path.exists():
            assert mode(path) == 0o600, path
    assert "note:" not in out.getvalue()


def test_dev_names_a_data_dir_an_earlier_run_left_readable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dev, "SynapseServer", _FakeSynapse)
    data_dir = tmp_path / "old dev"
    data_dir.mkdir(mode=0o755)
    out = io.StringIO()
    assert dev.run_dev(data_dir, lambda settings: 0, out) == 0
    assert mode(data_dir) == 0o755  # left as it is
    assert (
        f"surfaces-bot dev: note: {data_dir} is 0755: other users may read the passwords and "
        f"data in it; to fix: chmod -R go-rwx '{data_dir}'\n"
    ) in out.getvalue()
