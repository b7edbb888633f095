"""bot.doctor's copy of the store: one committed state, whether or not a bot runs."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import pytest

from bot.doctor import snapshot_store
from bot.store import Store
from bot.store_lock import StoreLock

BOT = "@bot:example.org"


def beside(store: Path) -> list[str]:
    return sorted(path.name for path in store.parent.iterdir())


async def test_with_no_store_there_is_nothing_to_copy(tmp_path: Path) -> None:
    snapshot_store(tmp_path / "store.sqlite3", tmp_path / "copy.sqlite3")
    assert list(tmp_path.iterdir()) == []


async def test_a_stopped_bots_store_is_copied_and_nothing_is_left_beside_it(
    tmp_path: Path,
) -> None:
    store_path = tmp_path / "store" / "bot.sqlite3"
    store = await Store.open(store_path, BOT)
    await store.set_meta("device_id", "DEV")
    await store.aclose()
    before = beside(store_path)
    copy = tmp_path / "copy.sqlite3"

    snapshot_store(store_path, copy)

    assert beside(store_path) == before
    copied = await Store.open(copy, BOT)
    try:
        assert await copied.get_meta("device_id") == "DEV"
    finally:
        await copied.aclose()


async def test_a_running_bots_store_is_read_through_sqlite(tmp_path: Path) -> None:
    store_path = tmp_path / "store" / "bot.sqlite3"
    store = await Store.open(store_path, BOT)  # holds the store, as a running bot does
    try:
        # Committed, and still only in the write-ahead log.
        await store.set_meta("device_id", "DEV")
        before = beside(store_path)
        copy = tmp_path / "copy.sqlite3"

        snapshot_store(store_path, copy)

        assert beside(store_path) == before
        # The copy stands alone: no WAL of its own to go with it.
        assert sorted(p.name for p in tmp_path.glob("copy.sqlite3*")) == ["copy.sqlite3"]
        copied = await Store.open(copy, BOT)
        try:
            assert await copied.get_meta("device_id") == "DEV"
        finally:
            await copied.aclose()
    finally:
        await store.aclose()


async def test_copies_taken_while_a_bot_writes_are_each_one_committed_state(
    tmp_path: Path,
) -> None:
    store_path = tmp_path / "store" / "bot.sqlite3"
    store = await Store.open(store_path, BOT)
    stop = threading.Event()

    def write() -> None:
        # Two rows that every transaction changes together, and a checkpoint that
        # empties the WAL every few commits: a copy of the files taken one by one
        # catches the database and the WAL from different moments (a corrupt index,
        # two rows apart), in most runs of this test.
        db = sqlite3.connect(store_path, isolation_level=None)
        db.execute("CREATE TABLE pair(side TEXT PRIMARY KEY, n INTEGER)")
        db.execute("INSERT INTO pair VALUES ('a', 0), ('b', 0)")
        n = 0
        while not stop.is_set():
            n += 1
            db.execute("BEGIN IMMEDIATE")
            db.execute("UPDATE pair SET n = ?", (n,))
            db.execute("INSERT INTO meta(key, value) VALUES (?, ?)", (f"k{n}", "x" * 500))
            db.execute("COMMIT")
            if n % 5 == 0:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.close()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        seen = set()
        for attempt in range(50):
            copy = tmp_path / f"copy{attempt}.sqlite3"
            snapshot_store(store_path, copy)
            db = sqlite3.connect(copy)
            try:
                assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
                sides = dict(db.execute("SELECT side, n FROM pair").fetchall() or [])
            except sqlite3.OperationalError as exc:
                if "no such table" not in str(exc):
                    raise
                sides = {}  # taken before the writer's first commit
            finally:
                db.close()
            assert sides.get("a") == sides.get("b")
            seen.add(sides.get("a"))
    finally:
        stop.set()
        writer.join()
        await store.aclose()
    assert len(seen) > 1, "the copies should have caught the writer at different points"


async def test_a_running_bots_unreadable_store_is_an_sqlite_error(tmp_path: Path) -> None:
    store_path = tmp_path / "bot.sqlite3"
    store_path.write_bytes(b"not a database at all" * 100)

    with StoreLock.try_acquire(store_path), pytest.raises(sqlite3.DatabaseError):
        snapshot_store(store_path, tmp_path / "copy.sqlite3")


async def test_doctor_never_prints_the_credentials_of_a_homeserver_url(tmp_path: Path) -> None:
    """`load_settings` refuses ``user:password@`` in the URL; a hand-built `Settings`
    may still carry it, and no line the doctor prints shows it (matrix_api's errors
    quote the URL)."""
    import trio

    from bot.config import Settings
    from bot.doctor import run_doctor
    from mini_http import HTTPRequest, Responder, serve_http

    secret = "pa55-in-the-url"

    async def refuse(request: HTTPRequest, out: Responder) -> None:
        # A server (or a proxy) that quotes the credentials it was sent.
        error = json.dumps({"errcode": "M_FORBIDDEN", "error": f"who is bot:{secret}?"})
        await out.send(403, error.encode())

    lines: list[str] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_http, refuse)
            settings = Settings(
                homeserver=f"http://bot:{secret}@127.0.0.1:{port}",
                user_id=BOT,
                access_token="syt_token",
                store_path=tmp_path / "store.sqlite3",
            )
            assert await run_doctor(settings, lines.append) == 1
            nursery.cancel_scope.cancel()
    assert lines[0] == f"ok    configuration: bot {BOT} on http://***@127.0.0.1:{port}"
    # The client refuses such a URL before a request could carry the credentials.
    assert lines[-1] == (
        "FAIL  homeserver: the homeserver URL must not hold credentials (user:password@)"
    )
    assert all(secret not in line for line in lines)
    assert not any(secret in line for line in lines), lines


async def test_doctor_says_what_a_running_bots_listener_says(tmp_path: Path) -> None:
    """With BOT_HTTP_LISTEN set, the doctor reads the running bot's /readyz and /healthz
    (what `python -m bot status` shows); nothing there is an info line, not a failure."""
    import trio

    from bot.config import Settings
    from bot.doctor import _check_running_bot
    from mini_http import HTTPRequest, Responder, serve_http

    answers = {
        "/readyz": (503, {"ready": False, "phase": "reconciling"}),
        "/healthz": (200, {"healthy": True}),
        "/metrics": (200, None),
    }

    async def listener(request: HTTPRequest, out: Responder) -> None:
        status, body = answers.get(request.path, (404, {}))
        await out.send(status, b"" if body is None else json.dumps(body).encode())

    def settings_for(port: int) -> Settings:
        return Settings(
            homeserver="http://127.0.0.1:1",
            user_id=BOT,
            access_token="syt_token",
            store_path=tmp_path / "store.sqlite3",
            http_listen=("127.0.0.1", port),
        )

    lines: list[str] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_http, listener)
            await _check_running_bot(settings_for(port), lines.append)
            answers["/readyz"] = (200, {"ready": True, "phase": "ready"})
            await _check_running_bot(settings_for(port), lines.append)
            nursery.cancel_scope.cancel()
        await _check_running_bot(settings_for(port), lines.append)
    assert lines[:2] == [
        "WARN  running bot: ready: no (phase reconciling)",
        "WARN  running bot: healthy: yes",
    ]
    assert lines[2] == f"ok    running bot: ready and healthy at http://127.0.0.1:{port}"
    assert lines[3].startswith(f"info  running bot: none answers at http://127.0.0.1:{port}")
