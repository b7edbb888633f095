"""bot.store and bot.store_postgres: the schema, the inbox invariants, the chat maps, and
refusing unusable stores.

The tests that are about the store's behaviour run against both stores (the ``kind``
fixture: SQLite in a temporary file, PostgreSQL in a database of its own on a server
the suite starts, see `pg_server`); the ones about SQLite files stay SQLite's, and
PostgreSQL has its own below them.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from bot.chats import Chat
from bot.config import ConfigError, load_settings
from bot.store import (
    _MIGRATIONS,
    HANDLED_KEEP_MS,
    SCHEMA_VERSION,
    NewInboxItem,
    Quarantined,
    Store,
    StoreError,
    StoreUnavailable,
    redaction_item,
)
from bot.store_api import BotStore, is_postgres_url, open_store, sqlite_path
from bot.store_postgres import _MIGRATIONS as PG_MIGRATIONS
from bot.store_postgres import PG_SCHEMA_VERSION, PostgresStore, StoreDeposed
from matrix_api.models import EventID, RoomEvent, RoomID, SyncToken, UserID
from pg_server import PostgresServer, missing_binaries

BOT = "@bot:example.org"
ALICE = "@alice:example.org"
ROOM = RoomID("!one:example.org")
OTHER_ROOM = RoomID("!two:example.org")


def message(event_id: str, room_id: RoomID = ROOM, body: str = "hi", **content: Any) -> RoomEvent:
    return RoomEvent(
        type="m.room.message",
        event_id=EventID(event_id),
        sender=UserID(ALICE),
        origin_server_ts=1_700_000_000_000,
        content={"msgtype": "m.text", "body": body, **content},
        room_id=room_id,
    )


def new_item(event_id: str, room_id: RoomID = ROOM, **content: Any) -> NewInboxItem:
    return NewInboxItem(
        EventID(event_id), room_id, "message", message(event_id, room_id, **content)
    )


def chat(chat_id: str, room_id: str, title: str = "a chat") -> Chat:
    return Chat(chat_id=chat_id, room_id=RoomID(room_id), owner=ALICE, title=title, created_ts=1000)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "bot.sqlite3"


@pytest.fixture
async def sqlite_store(path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(path, BOT)
    yield opened
    await opened.aclose()


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    connection = sqlite3.connect(path)
    try:
        return connection.execute(sql).fetchall()
    finally:
        connection.close()


# --- both stores ---------------------------------------------------------------------------


class SqliteKind:
    """A SQLite store at a file of its own."""

    name = "sqlite"
    schema_version = SCHEMA_VERSION
    # What a value the driver cannot send raises: a bug, passed through as it is.
    unbindable = sqlite3.ProgrammingError

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = str(path)

    async def open(self, user_id: str = BOT) -> BotStore:
        return await Store.open(self.path, user_id)

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        connection = sqlite3.connect(self.path)
        try:
            result = connection.execute(sql, params).fetchall()
            connection.commit()
            return result
        finally:
            connection.close()

    def stored_version(self) -> int:
        ((version,),) = self.rows("PRAGMA user_version")
        return int(version)

    def tables(self) -> set[str]:
        return {name for (name,) in self.rows("SELECT name FROM sqlite_master WHERE type='table'")}

    def indexes(self, table: str) -> set[str]:
        """Its indexes that were made by name (not a primary key's or a UNIQUE's)."""
        return {
            name
            for (name,) in self.rows(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?"
                " AND sql IS NOT NULL",
                (table,),
            )
        }


class PostgresKind:
    """A PostgreSQL store in a schema of its own in one shared database (a new schema
    costs milliseconds, a new database a quarter of a second), or in a database of its
    own (``own_database``)."""

    name = "postgresql"
    schema_version = PG_SCHEMA_VERSION
    unbindable = psycopg.ProgrammingError

    def __init__(self, server: PostgresServer, *, own_database: bool = False) -> None:
        self.server = server
        if own_database:
            self.location = server.new_database_url()
            return
        schema = f"s_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(server.url(), autocommit=True) as connection:
            connection.execute(f"CREATE SCHEMA {schema}")  # our own alphabet
        self.location = server.url(options=f"-csearch_path%3D{schema}")

    async def open(self, user_id: str = BOT) -> BotStore:
        return await PostgresStore.open(self.location, user_id)

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.location, autocommit=True) as connection:
            cursor = connection.execute(sql.replace("?", "%s"), params)
            return cursor.fetchall() if cursor.description else []

    def stored_version(self) -> int:
        ((version,),) = self.rows("SELECT version FROM bot_schema")
        return int(version)

    def tables(self) -> set[str]:
        return {
            name
            for (name,) in self.rows(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            )
        }

    def indexes(self, table: str) -> set[str]:
        """Its indexes that were made by name (not a primary key's or a UNIQUE's)."""
        return {
            name
            for (name,) in self.rows(
                "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
                " AND tablename = ? AND indexname NOT LIKE '%%_pkey'",
                (table,),
            )
        }


Kind = SqliteKind | PostgresKind


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    reason = missing_binaries()
    if reason is not None:
        if os.environ.get("SURFACES_BOT_REQUIRE_POSTGRES"):  # CI (.ci/run): never skipped
            pytest.fail(reason)
        pytest.skip(reason)
    with PostgresServer() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def new_kind(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[], Kind]:
    """Makes an empty place for a store of the parametrised kind, each call a new one."""
    if request.param == "sqlite":
        return lambda: SqliteKind(tmp_path_factory.mktemp("store") / "state" / "bot.sqlite3")
    server = request.getfixturevalue("pg_server")
    return lambda: PostgresKind(server)


@pytest.fixture
def kind(new_kind: Callable[[], Kind]) -> Kind:
    return new_kind()


@pytest.fixture
async def store(kind: Kind) -> AsyncIterator[BotStore]:
    opened = await kind.open()
    yield opened
    await opened.aclose()


# --- schema ------------------------------------------------------------------------------


async def test_a_new_store_is_created_and_migrated(kind: Kind) -> None:
    store = await kind.open()
    assert store.sync_token is None
    assert store.chats() == []
    assert await store.counts() == {
        "chats": 0,
        "inbox": 0,
        "handled": 0,
        "spaces": 0,
        "encrypted_rooms": 0,
    }
    assert await store.get_meta("user_id") == BOT
    await store.aclose()

    assert kind.stored_version() == kind.schema_version
    assert {"meta", "chats", "events", "spaces"} <= kind.tables()


async def test_opening_twice_does_not_migrate_again(kind: Kind) -> None:
    await (await kind.open()).aclose()
    store = await kind.open()
    await store.aclose()

    assert kind.stored_version() == kind.schema_version


def write_old_store(path: Path, version: int) -> None:
    """A store as a bot of schema ``version`` left it: a chat, a token, an inbox item,
    a handled event, and (from version 4 on) the chat's conversation."""
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path)
    for script in _MIGRATIONS[:version]:
        connection.executescript(script)
    connection.execute(f"PRAGMA user_version = {version}")
    connection.executemany(
        "INSERT INTO meta(key, value) VALUES (?, ?)", [("user_id", BOT), ("sync_token", "s7")]
    )
    connection.execute(
        "INSERT INTO chats(chat_id, room_id, owner, title, created_ts) VALUES (?, ?, ?, ?, ?)",
        ("c1", ROOM, ALICE, "a chat", 1000),
    )
    now = int(time.time() * 1000)
    encoded = msgspec.json.encode(message("$a"))
    if version < 6:
        connection.execute(
            "INSERT INTO inbox(event_id, room_id, kind, event, received_ts)"
            " VALUES (?, ?, 'message', ?, 0)",
            ("$a", ROOM, encoded),
        )
        connection.execute(
            "INSERT INTO handled(event_id, room_id, outcome, reply_event_id, handled_ts)"
            " VALUES (?, ?, ?, ?, ?)",
            ("$done", ROOM, "replied", "$reply", now),
        )
    else:  # from version 6 on, inbox and handled are one table
        connection.execute(
            "INSERT INTO events(event_id, room_id, kind, event, received_ts)"
            " VALUES (?, ?, 'message', ?, 0)",
            ("$a", ROOM, encoded),
        )
        connection.execute(
            "INSERT INTO events(event_id, room_id, kind, received_ts, outcome,"
            " reply_event_id, handled_ts) VALUES (?, ?, 'message', ?, ?, ?, ?)",
            ("$done", ROOM, now, "replied", "$reply", now),
        )
    if version >= 4:
        connection.executemany(
            "INSERT INTO turns(chat_id, role, content) VALUES ('c1', ?, ?)", OLD_TURNS
        )
        connection.execute("INSERT INTO contexts(chat_id) VALUES ('c1')")
    connection.commit()
    connection.close()


OLD_TURNS = [("user", "before"), ("assistant", "threads")]


@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION))
async def test_an_older_store_is_migrated_and_keeps_its_data(path: Path, version: int) -> None:
    write_old_store(path, version)

    store = await Store.open(path, BOT)
    try:
        assert store.sync_token == "s7"
        assert store.chats() == [chat("c1", ROOM)]
        assert [item.event for item in await store.pending()] == [message("$a")]
        assert await store.handled_outcome("$done") == "replied"
        # Still handled: a replay of it is not taken in again.
        assert await store.commit_sync_batch(SyncToken("s8"), [new_item("$done")]) == []
        # Its conversation is the chat's main timeline's; no thread has one yet.
        assert await store.conversation("c1") == (OLD_TURNS if version >= 4 else None)
        assert await store.conversation("c1", thread="$done") is None
    finally:
        await store.aclose()

    assert rows(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


async def test_an_empty_file_is_taken_as_a_new_store(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.touch()

    store = await Store.open(path, BOT)
    await store.aclose()

    assert rows(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


async def test_meta_values_round_trip(store: BotStore) -> None:
    assert await store.get_meta("anything") is None
    await store.set_meta("anything", "one")
    await store.set_meta("anything", "two")

    assert await store.get_meta("anything") == "two"


# --- the inbox ---------------------------------------------------------------------------


async def test_a_batch_enters_the_inbox_with_its_token(store: BotStore) -> None:
    fresh = await store.commit_sync_batch(
        SyncToken("s1"), [new_item("$a"), new_item("$b", OTHER_ROOM)]
    )

    assert [item.event_id for item in fresh] == ["$a", "$b"]
    assert [item.room_id for item in fresh] == [ROOM, OTHER_ROOM]
    assert fresh[0].seq < fresh[1].seq
    assert fresh[0].event == message("$a")
    assert store.sync_token == "s1"
    assert await store.get_meta("sync_token") == "s1"
    assert await store.pending() == fresh


async def test_an_empty_batch_still_advances_the_token(store: BotStore) -> None:
    assert await store.commit_sync_batch(SyncToken("s1"), []) == []

    assert store.sync_token == "s1"
    assert await store.get_meta("sync_token") == "s1"


async def test_duplicates_within_a_batch_are_dropped(store: BotStore) -> None:
    fresh = await store.commit_sync_batch(
        SyncToken("s1"), [new_item("$a"), new_item("$a"), new_item("$b")]
    )

    assert [item.event_id for item in fresh] == ["$a", "$b"]
    assert [item.event_id for item in await store.pending()] == ["$a", "$b"]


async def test_an_event_already_in_the_inbox_is_not_taken_again(store: BotStore) -> None:
    [first] = await store.commit_sync_batch(SyncToken("s1"), [new_item("$a")])

    fresh = await store.commit_sync_batch(SyncToken("s2"), [new_item("$a"), new_item("$b")])

    assert [item.event_id for item in fresh] == ["$b"]
    assert [item.seq for item in await store.pending()] == [first.seq, fresh[0].seq]
    assert store.sync_token == "s2"


async def test_an_event_already_handled_is_never_taken_again(store: BotStore) -> None:
    [item] = await store.commit_sync_batch(SyncToken("s1"), [new_item("$a")])
    await store.finish(item, "replied", EventID("$reply"))

    # The server replays the event (a restart from an old token, a /messages overlap).
    fresh = await store.commit_sync_batch(SyncToken("s2"), [new_item("$a")])

    assert fresh == []
    assert await store.pending() == []
    assert store.sync_token == "s2"


async def test_a_failing_batch_commits_nothing_not_even_the_token(
    store: BotStore, kind: Kind
) -> None:
    await store.commit_sync_batch(SyncToken("s1"), [new_item("$old")])
    unbindable = replace(new_item("$x"), event_id=object())  # the driver cannot send it

    with pytest.raises(kind.unbindable):
        await store.commit_sync_batch(SyncToken("s2"), [new_item("$new"), unbindable])

    assert store.sync_token == "s1"
    assert await store.get_meta("sync_token") == "s1"
    assert [item.event_id for item in await store.pending()] == ["$old"]


async def test_an_event_that_cannot_be_stored_is_quarantined_alone(store: BotStore) -> None:
    unencodable = new_item("$bad", weird=object())  # msgspec cannot encode it

    with capture_logs() as logs:
        fresh = await store.commit_sync_batch(SyncToken("s2"), [unencodable, new_item("$new")])

    assert [item.event_id for item in fresh] == ["$new"]
    assert store.sync_token == "s2"
    assert await store.quarantined() == {"$bad": "cannot be stored: TypeError"}
    [logged] = [e for e in logs if e["event"] == "event_quarantined"]
    assert logged["event_id"] == "$bad"
    # Recorded, so a later delivery is not taken in again.
    assert await store.commit_sync_batch(SyncToken("s3"), [new_item("$bad")]) == []


async def test_quarantined_events_are_recorded_with_the_batch(store: BotStore) -> None:
    entry = Quarantined("$junk", ROOM, "Expected `str`, got `array`", "@mallory:x")

    fresh = await store.commit_sync_batch(SyncToken("s2"), [new_item("$ok")], [entry])

    assert [item.event_id for item in fresh] == ["$ok"]
    assert await store.handled_outcome("$junk") == "quarantined"
    assert await store.quarantined() == {"$junk": "Expected `str`, got `array`"}
    assert [item.event_id for item in await store.pending()] == ["$ok"]


async def test_a_stored_event_that_no_longer_reads_is_quarantined_at_start(
    kind: Kind,
) -> None:
    store = await kind.open()
    await store.commit_sync_batch(SyncToken("s1"), [new_item("$a"), new_item("$b")])
    await store.aclose()
    kind.rows("UPDATE events SET event = ? WHERE event_id = '$a'", (b"[[[",))

    store = await kind.open()
    try:
        assert [item.event_id for item in await store.pending()] == ["$b"]
        assert (await store.quarantined())["$a"].startswith("stored event unreadable")
        assert [item.event_id for item in await store.pending()] == ["$b"]
    finally:
        await store.aclose()


async def test_pending_is_in_seq_order(store: BotStore) -> None:
    await store.commit_sync_batch(SyncToken("s1"), [new_item("$c"), new_item("$a")])
    await store.commit_sync_batch(SyncToken("s2"), [new_item("$b", OTHER_ROOM)])
    await store.commit_sync_batch(SyncToken("s3"), [new_item("$d")])

    pending = await store.pending()

    assert [item.event_id for item in pending] == ["$c", "$a", "$b", "$d"]
    assert [item.seq for item in pending] == sorted(item.seq for item in pending)


async def test_finish_takes_the_item_out_and_records_the_outcome(store: BotStore) -> None:
    first, second = await store.commit_sync_batch(SyncToken("s1"), [new_item("$a"), new_item("$b")])

    await store.finish(first, "replied", EventID("$reply"))
    await store.finish(second, "ignored")

    assert await store.pending() == []
    assert await store.handled_outcome("$a") == "replied"
    assert await store.handled_outcome("$b") == "ignored"
    assert await store.handled_outcome("$never") is None
    assert await store.counts() == {
        "chats": 0,
        "inbox": 0,
        "handled": 2,
        "spaces": 0,
        "encrypted_rooms": 0,
    }


async def test_finish_records_the_reply_event_id(kind: Kind) -> None:
    store = await kind.open()
    [item] = await store.commit_sync_batch(SyncToken("s1"), [new_item("$a")])
    await store.finish(item, "replied", EventID("$reply"))
    await store.aclose()

    assert kind.rows(
        "SELECT event_id, room_id, outcome, reply_event_id,"
        " CASE WHEN event IS NULL THEN 1 ELSE 0 END FROM events"
    ) == [("$a", ROOM, "replied", "$reply", 1)]


async def test_resumptions_are_counted_and_kept(kind: Kind) -> None:
    store = await kind.open()
    await store.commit_sync_batch(SyncToken("s1"), [new_item("$a")])
    [item] = await store.pending()
    assert await store.count_resumption(item) == 1
    assert await store.count_resumption(item) == 2
    await store.aclose()

    reopened = await kind.open()
    try:
        [again] = await reopened.pending()
        assert again.attempts == 2
        assert await reopened.count_resumption(again) == 3
    finally:
        await reopened.aclose()


async def test_discard_takes_the_item_out_without_recording_it(store: BotStore) -> None:
    [item] = await store.commit_sync_batch(SyncToken("s1"), [new_item("$a")])

    await store.discard(item)

    assert await store.pending() == []
    assert await store.handled_outcome("$a") is None
    # Not recorded as handled, so a later delivery is taken again.
    assert len(await store.commit_sync_batch(SyncToken("s2"), [new_item("$a")])) == 1


async def test_reopening_keeps_token_chats_inbox_and_handled(kind: Kind) -> None:
    store = await kind.open()
    await store.apply_chats(put=[chat("c1", ROOM), chat("c2", OTHER_ROOM, "second")])
    done, waiting = await store.commit_sync_batch(
        SyncToken("s9"), [new_item("$done"), new_item("$waiting", OTHER_ROOM)]
    )
    await store.finish(done, "replied", EventID("$r"))
    await store.aclose()

    reopened = await kind.open()
    try:
        assert reopened.sync_token == "s9"
        assert sorted(reopened.chats(), key=lambda c: c.chat_id) == [
            chat("c1", ROOM),
            chat("c2", OTHER_ROOM, "second"),
        ]
        assert reopened.chat_for_room(OTHER_ROOM) == chat("c2", OTHER_ROOM, "second")
        assert await reopened.pending() == [waiting]
        assert await reopened.handled_outcome("$done") == "replied"
        assert await reopened.counts() == {
            "chats": 2,
            "inbox": 1,
            "handled": 1,
            "spaces": 0,
            "encrypted_rooms": 0,
        }
    finally:
        await reopened.aclose()


# --- chats ---------------------------------------------------------------------------------


async def test_apply_chats_puts_and_removes(store: BotStore) -> None:
    await store.apply_chats(put=[chat("c1", "!a:x"), chat("c2", "!b:x")])
    await store.apply_chats(remove=["c1"])

    assert store.chat_by_id("c1") is None
    assert store.chat_for_room("!a:x") is None
    assert store.chat_by_id("c2") == chat("c2", "!b:x")
    assert store.chat_for_room("!b:x") == chat("c2", "!b:x")


async def test_a_chat_that_moves_room_leaves_its_old_room(store: BotStore, kind: Kind) -> None:
    await store.apply_chats(put=[chat("c1", "!old:x")])

    await store.apply_chats(put=[chat("c1", "!new:x")])

    assert store.chat_for_room("!old:x") is None
    assert store.chat_for_room("!new:x") == chat("c1", "!new:x")
    assert store.chats() == [chat("c1", "!new:x")]
    assert kind.rows("SELECT chat_id, room_id FROM chats") == [("c1", "!new:x")]


async def test_two_chats_cannot_share_a_room(store: BotStore, kind: Kind) -> None:
    await store.apply_chats(put=[chat("c1", "!a:x"), chat("c2", "!b:x")])

    await store.apply_chats(put=[chat("c3", "!a:x")])

    assert store.chat_for_room("!a:x") == chat("c3", "!a:x")
    assert store.chat_by_id("c1") is None
    assert sorted(c.chat_id for c in store.chats()) == ["c2", "c3"]
    assert sorted(kind.rows("SELECT chat_id, room_id FROM chats")) == [
        ("c2", "!b:x"),
        ("c3", "!a:x"),
    ]


async def test_a_chat_moving_into_an_occupied_room_displaces_its_chat(store: BotStore) -> None:
    await store.apply_chats(put=[chat("c1", "!a:x"), chat("c2", "!b:x")])

    await store.apply_chats(put=[chat("c1", "!b:x")])

    assert store.chats() == [chat("c1", "!b:x")]
    assert store.chat_for_room("!a:x") is None
    assert store.chat_by_id("c2") is None


async def test_a_title_change_replaces_the_chat(store: BotStore) -> None:
    await store.apply_chats(put=[chat("c1", "!a:x")])
    await store.apply_chats(put=[chat("c1", "!a:x").with_title("renamed")])

    assert store.chat_for_room("!a:x") == chat("c1", "!a:x", "renamed")
    assert len(store.chats()) == 1


async def test_spaces_are_kept_one_per_owner_and_room(store: BotStore, kind: Kind) -> None:
    await store.apply_spaces(put={ALICE: RoomID("!s1:x"), "@bob:x": RoomID("!s2:x")})
    await store.apply_spaces(put={ALICE: RoomID("!s3:x")})  # Alice's Space moves
    await store.apply_spaces(put={"@carol:x": RoomID("!s2:x")})  # takes Bob's room

    expected = {ALICE: "!s3:x", "@carol:x": "!s2:x"}
    assert store.spaces() == expected
    assert store.space_for("@bob:x") is None
    assert store.is_space("!s3:x")
    assert not store.is_space("!s1:x")
    assert dict(kind.rows("SELECT owner, room_id FROM spaces")) == expected

    await store.apply_spaces(remove=[ALICE])
    assert store.spaces() == {"@carol:x": "!s2:x"}


async def test_spaces_survive_a_reopen(kind: Kind) -> None:
    store = await kind.open()
    await store.apply_spaces(put={ALICE: RoomID("!s1:x")})
    await store.aclose()

    reopened = await kind.open()
    try:
        assert reopened.space_for(ALICE) == "!s1:x"
    finally:
        await reopened.aclose()


chat_ids = st.sampled_from(["c1", "c2", "c3", "c4"])
room_ids = st.sampled_from(["!a:x", "!b:x", "!c:x", "!d:x"])
operations = st.lists(
    st.tuples(
        st.lists(st.builds(chat, chat_ids, room_ids, st.sampled_from(["t1", "t2"])), max_size=3),
        st.lists(chat_ids, max_size=2),
    ),
    min_size=1,
    max_size=6,
)


# ``new_kind`` is a factory: each example makes a store of its own with it.
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(operations)
async def test_the_chat_maps_always_match_the_database(
    new_kind: Callable[[], Kind],
    ops: list[tuple[list[Chat], list[str]]],
) -> None:
    kind = new_kind()
    store = await kind.open()
    try:
        for put, remove in ops:
            await store.apply_chats(put=put, remove=remove)
            in_memory = sorted(store.chats(), key=lambda c: c.chat_id)
            # One room per chat, one chat per room, both maps agreeing.
            assert len({c.room_id for c in in_memory}) == len(in_memory)
            for c in in_memory:
                assert store.chat_for_room(c.room_id) == c
                assert store.chat_by_id(c.chat_id) == c
            for room in ("!a:x", "!b:x", "!c:x", "!d:x"):
                held = store.chat_for_room(room)
                assert held is None or held in in_memory
        await store.aclose()
        reopened = await kind.open()
        assert sorted(reopened.chats(), key=lambda c: c.chat_id) == in_memory
        await reopened.aclose()
    finally:
        await store.aclose()


# --- files the store refuses -----------------------------------------------------------------


def snapshot(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), os.stat(path).st_mtime_ns


def make_old_mtime(path: Path) -> None:
    # An mtime well in the past, so a write during the test would surely change it.
    os.utime(path, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))


async def valid_store_bytes(path: Path) -> bytes:
    store = await Store.open(path, BOT)
    await store.apply_chats(put=[chat(f"c{i}", f"!r{i}:x", "t" * 200) for i in range(100)])
    await store.commit_sync_batch(SyncToken("s1"), [new_item(f"${i}") for i in range(50)])
    await store.aclose()
    data = path.read_bytes()
    path.unlink()
    return data


async def truncated(path: Path) -> None:
    data = await valid_store_bytes(path)
    assert len(data) > 8 * 4096
    path.write_bytes(data[: len(data) // 2])


async def header_only(path: Path) -> None:
    data = await valid_store_bytes(path)
    path.write_bytes(data[:100])


async def random_bytes(path: Path) -> None:
    path.write_bytes(os.urandom(16 * 1024))


async def text_file(path: Path) -> None:
    path.write_text("homeserver = 'https://example.org'\n" * 50)


async def foreign_sqlite(path: Path) -> None:
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    connection.execute("INSERT INTO notes (body) VALUES ('keep me')")
    connection.commit()
    connection.close()


async def foreign_sqlite_with_a_version(path: Path) -> None:
    # Many applications use user_version too.
    await foreign_sqlite(path)
    connection = sqlite3.connect(path)
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    connection.close()


async def foreign_sqlite_with_a_meta_table(path: Path) -> None:
    # A table called meta is a common name; with a matching user_version it passes the probe.
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    connection.execute("INSERT INTO meta VALUES ('schema', 'another app')")
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    connection.commit()
    connection.close()


async def newer_schema(path: Path) -> None:
    store = await Store.open(path, BOT)
    await store.aclose()
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA user_version = 99")
    connection.close()


async def other_users_store(path: Path) -> None:
    store = await Store.open(path, "@someone-else:example.org")
    await store.apply_chats(put=[chat("c1", "!a:x")])
    await store.aclose()


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (truncated, "not a usable SQLite database|database is corrupt"),
        (header_only, "not a usable SQLite database|database is corrupt"),
        (random_bytes, "not a usable SQLite database"),
        (text_file, "not a usable SQLite database"),
        (foreign_sqlite, "a SQLite file of something else"),
        (foreign_sqlite_with_a_version, "not a bot store"),
        (foreign_sqlite_with_a_meta_table, "not a bot store"),
        (newer_schema, "schema version 99 is newer than this bot understands"),
        (other_users_store, "belongs to @someone-else:example.org, not @bot:example.org"),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
async def test_an_unusable_file_is_refused_and_left_untouched(
    path: Path, make: Any, says: str
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    await make(path)
    make_old_mtime(path)
    before = snapshot(path)

    with pytest.raises(StoreError) as caught:
        await Store.open(path, BOT)

    assert str(path) in str(caught.value)
    assert re.search(says, str(caught.value))
    assert snapshot(path) == before


async def test_a_foreign_store_is_refused_whatever_characters_its_path_has(
    tmp_path: Path,
) -> None:
    path = tmp_path / "backup#1" / "bot.sqlite3"
    path.parent.mkdir()
    await other_users_store(path)
    before = snapshot(path)

    try:
        store = await Store.open(path, BOT)
    except StoreError:
        refused = True
    else:
        await store.aclose()
        refused = False

    assert refused

    assert snapshot(path) == before
    assert not (tmp_path / "backup").exists()  # no stray file next to the real one


async def test_handled_events_older_than_a_month_are_pruned_at_open(kind: Kind) -> None:
    store = await kind.open()
    await store.commit_sync_batch(SyncToken("s1"), [new_item("$old"), new_item("$new")])
    for item in await store.pending():
        await store.finish(item, "replied")
    await store.aclose()
    kind.rows(
        "UPDATE events SET handled_ts = handled_ts - ? WHERE event_id = '$old'",
        (HANDLED_KEEP_MS + 1000,),
    )
    reopened = await kind.open()
    try:
        assert await reopened.handled_outcome("$old") is None
        assert await reopened.handled_outcome("$new") == "replied"
    finally:
        await reopened.aclose()


async def test_the_checkpoint_task_moves_the_log_into_the_database_file(
    sqlite_store: Store, path: Path
) -> None:
    store = sqlite_store
    await store.commit_sync_batch(
        SyncToken("s1"), [new_item(f"$e{index}", body="x" * 2000) for index in range(100)]
    )
    before = path.stat().st_size
    wal = path.with_name(path.name + "-wal")
    assert wal.stat().st_size > 200_000  # the batch is still only in the log

    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.checkpoint_every, 0.01)
        # Real time: the copy runs in a worker thread.
        for _ in range(1000):
            if path.stat().st_size > before:
                break
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()

    assert path.stat().st_size > before + 200_000
    assert len(rows(path, "SELECT seq FROM events")) == 100


async def test_a_full_disk_fails_a_batch_as_unavailable_and_commits_nothing(
    sqlite_store: Store,
) -> None:
    store = sqlite_store
    # SQLite's own "database or disk is full": the file may not grow past its size.
    ((pages,),) = store._db.execute("PRAGMA page_count").fetchall()
    store._db.execute(f"PRAGMA max_page_count = {pages}")
    batch = [new_item("$big", body="x" * 400_000)]

    with pytest.raises(StoreUnavailable, match="database or disk is full"):
        await store.commit_sync_batch(SyncToken("s1"), batch)
    assert store.sync_token is None
    assert await store.pending() == []

    # Room again: the same batch goes in, as if never tried (no transaction left open).
    store._db.execute("PRAGMA max_page_count = 1073741823")
    fresh = await store.commit_sync_batch(SyncToken("s1"), batch)
    assert [item.event_id for item in fresh] == ["$big"]
    assert store.sync_token == "s1"


async def test_a_store_that_cannot_write_keeps_the_item_pending(sqlite_store: Store) -> None:
    store = sqlite_store
    (item,) = await store.commit_sync_batch(SyncToken("s1"), [new_item("$e1")])
    store._db.execute("PRAGMA query_only = ON")  # "attempt to write a readonly database"

    with pytest.raises(StoreUnavailable, match="readonly"):
        await store.finish(item, "replied", EventID("$reply"))
    with pytest.raises(StoreUnavailable):
        await store.commit_sync_batch(SyncToken("s2"), [new_item("$e2")])
    assert [pending.event_id for pending in await store.pending()] == ["$e1"]

    store._db.execute("PRAGMA query_only = OFF")
    await store.finish(item, "replied", EventID("$reply"))
    assert await store.pending() == []


async def test_a_broken_statement_is_a_bug_not_an_unavailable_store(sqlite_store: Store) -> None:
    store = sqlite_store

    def broken() -> None:
        store._db.execute("SELECT no_such_column FROM events")

    with pytest.raises(sqlite3.OperationalError, match="no such column"):
        await store._run(broken)


async def test_a_commit_that_fails_leaves_no_transaction_open(sqlite_store: Store) -> None:
    store = sqlite_store
    # A deferred constraint is checked at COMMIT, which then fails and, by SQLite's
    # rules, leaves the transaction open, as a full disk can at COMMIT in WAL mode.
    store._db.execute("CREATE TEMP TABLE parent(id INTEGER PRIMARY KEY)")
    store._db.execute(
        "CREATE TEMP TABLE child(parent_id REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)"
    )

    def dangling(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO child(parent_id) VALUES (1)")

    with pytest.raises(sqlite3.IntegrityError):
        await store._run(store._transaction(dangling))
    assert not store._db.in_transaction
    await store.commit_sync_batch(SyncToken("s1"), [new_item("$e1")])
    assert store.sync_token == "s1"


# --- end-to-end encryption state ---------------------------------------------------------


async def test_crypto_rows_and_encryption_commit_with_the_sync_token(kind: Kind) -> None:
    store = await kind.open()
    try:
        await store.commit_sync_batch(
            SyncToken("s1"),
            [],
            crypto=[("account", "", "pickle-1"), ("olm", "peer/1", "session")],
            encryption={ROOM: '{"algorithm":"m.megolm.v1.aes-sha2"}'},
        )
        await store.apply_crypto([("olm", "peer/1", None), ("account", "", "pickle-2")])
        assert store.room_encryption(ROOM) == '{"algorithm":"m.megolm.v1.aes-sha2"}'
        assert store.room_encryption(OTHER_ROOM) is None
    finally:
        await store.aclose()

    reopened = await kind.open()
    try:
        assert await reopened.crypto_rows() == [("account", "", "pickle-2")]
        assert reopened.room_encryption(ROOM) == '{"algorithm":"m.megolm.v1.aes-sha2"}'
    finally:
        await reopened.aclose()


async def test_a_failing_batch_keeps_neither_its_crypto_changes_nor_its_token(
    store: BotStore, kind: Kind
) -> None:
    # The server re-delivers the batch's to-device events: their changes must go or
    # stay with the token, never without it.
    await store.commit_sync_batch(SyncToken("s1"), [], crypto=[("account", "", "old")])
    unbindable = replace(new_item("$x"), event_id=object())

    with pytest.raises(kind.unbindable):
        await store.commit_sync_batch(
            SyncToken("s2"),
            [unbindable],
            crypto=[("account", "", "new"), ("inbound", "k", "v")],
            encryption={OTHER_ROOM: "{}"},
        )

    assert store.sync_token == "s1"
    assert await store.crypto_rows() == [("account", "", "old")]
    assert store.room_encryption(OTHER_ROOM) is None


async def test_concurrent_writes_commit_in_call_order_and_the_maps_follow(
    store: BotStore, kind: Kind
) -> None:
    # PostgreSQL's calls let other tasks run while they wait; SQLite's do not.
    async with trio.open_nursery() as nursery:
        for n in range(20):
            nursery.start_soon(store.apply_chats, [chat("c1", f"!r{n}:x")])
            nursery.start_soon(store.apply_spaces, {ALICE: RoomID(f"!s{n}:x")})
            nursery.start_soon(store.commit_sync_batch, SyncToken(f"s{n}"), [new_item(f"${n}")])
            # Each task makes its call (takes its turn) before the next ones start.
            await trio.testing.wait_all_tasks_blocked()

    assert store.chats() == [chat("c1", "!r19:x")]
    assert kind.rows("SELECT chat_id, room_id FROM chats") == [("c1", "!r19:x")]
    assert store.spaces() == {ALICE: "!s19:x"}
    assert store.sync_token == "s19"
    assert await store.get_meta("sync_token") == "s19"
    assert [item.event_id for item in await store.pending()] == [f"${n}" for n in range(20)]


# --- both stores: text PostgreSQL cannot hold ----------------------------------------------


async def test_a_nul_character_sinks_neither_a_batch_nor_an_answer(store: BotStore) -> None:
    # A hostile server may put U+0000 in an event id; a user may send it in a message.
    # PostgreSQL text cannot hold it (it becomes U+FFFD there); SQLite keeps it.
    hostile = new_item("$evil\x00id", body="a\x00b")

    item, _ = await store.commit_sync_batch(SyncToken("s1"), [hostile, new_item("$ok")])
    await store.finish_with_turns(item, "replied", EventID("$r"), "c1", [("user", "a\x00b")])

    assert store.sync_token == "s1"
    assert await store.handled_outcome("$evil\x00id") == "replied"
    assert await store.conversation("c1") in ([("user", "a\x00b")], [("user", "a\ufffdb")])
    assert [pending.event_id for pending in await store.pending()] == ["$ok"]
    # Still recognised when the server sends it again.
    assert await store.commit_sync_batch(SyncToken("s2"), [hostile]) == []


# --- both stores: redactions (issue 23) --------------------------------------------------


def redaction(event_id: str, target: str, room_id: RoomID = ROOM) -> NewInboxItem:
    return redaction_item(EventID(event_id), room_id, ALICE, 1_700_000_000_100, EventID(target))


def bodies_of(kind: Kind, *event_ids: str) -> list[Any]:
    """The stored bodies of ``event_ids`` (None: no body kept)."""
    return [
        row[0]
        for event_id in event_ids
        for row in kind.rows("SELECT event FROM events WHERE event_id = ?", (event_id,))
    ]


async def answered(store: BotStore, event_id: str, chat_id: str = "c1") -> None:
    """Take ``event_id`` in and answer it, with its two turns."""
    (item,) = await store.commit_sync_batch(SyncToken(f"t{event_id}"), [new_item(event_id)])
    await store.finish_with_turns(
        item, "replied", EventID(f"$answer{event_id}"), chat_id,
        [("user", f"q{event_id}"), ("assistant", f"a{event_id}")],
    )  # fmt: skip


async def test_a_redaction_takes_an_answered_exchange_out_of_the_conversation(
    store: BotStore, kind: Kind
) -> None:
    await store.apply_chats([chat("c1", ROOM)])
    for event_id in ("$a", "$b", "$c"):
        await answered(store, event_id)

    fresh = await store.commit_sync_batch(SyncToken("s9"), [redaction("$x", "$b")])

    assert await store.conversation("c1") == [
        ("user", "q$a"), ("assistant", "a$a"), ("user", "q$c"), ("assistant", "a$c"),
    ]  # fmt: skip
    # Exactly-once still holds: the id and the outcome stay, and no body.
    assert await store.handled_outcome("$b") == "replied"
    assert bodies_of(kind, "$b") == [None]
    assert await store.commit_sync_batch(SyncToken("s10"), [new_item("$b")]) == []
    # Its answer may have to go too (the handler decides): the redaction waits in the
    # inbox, keeping only what it redacts.
    assert [(item.kind, item.event.content) for item in fresh] == [("redaction", {"redacts": "$b"})]
    assert await store.answer_to("$b") == "$answer$b"
    # A replay of the redaction does nothing again.
    assert await store.commit_sync_batch(SyncToken("s11"), [redaction("$x", "$b")]) == []


async def test_a_pending_message_redacted_is_handled_as_redacted_without_its_body(
    store: BotStore, kind: Kind
) -> None:
    (item,) = await store.commit_sync_batch(SyncToken("s1"), [new_item("$a", body="secret")])

    fresh = await store.commit_sync_batch(SyncToken("s2"), [redaction("$x", "$a")])

    assert store.is_redacted(item)
    assert await store.handled_outcome("$a") == "redacted"
    assert bodies_of(kind, "$a") == [None]
    assert [pending.event_id for pending in await store.pending()] == ["$x"]
    assert [f.event_id for f in fresh] == ["$x"]
    # The lane that holds it finishes it: still "redacted", and no turns are added.
    await store.finish_with_turns(item, "replied", EventID("$late"), "c1", [("user", "secret")])
    assert not store.is_redacted(item)
    assert await store.handled_outcome("$a") == "redacted"
    assert await store.conversation("c1") in (None, [])
    # An answer that went out anyway is known, for the operator's redact_answers.
    assert await store.answer_to("$a") == "$late"
    assert all(
        b"secret" not in bytes(body or b"") for (body,) in kind.rows("SELECT event FROM events")
    )


async def test_a_message_and_its_redaction_in_one_batch_are_never_handed_out(
    store: BotStore, kind: Kind
) -> None:
    fresh = await store.commit_sync_batch(
        SyncToken("s1"),
        [new_item("$a", body="secret"), redaction("$x", "$a"), new_item("$b")],
    )

    assert [(f.event_id, f.kind) for f in fresh] == [("$b", "message"), ("$x", "redaction")]
    assert await store.handled_outcome("$a") == "redacted"
    assert bodies_of(kind, "$a") == [None]
    assert [p.event_id for p in await store.pending()] == ["$b", "$x"]


async def test_a_redaction_survives_a_restart_before_the_message_was_handled(
    kind: Kind,
) -> None:
    store = await kind.open()
    await store.commit_sync_batch(SyncToken("s1"), [new_item("$a")])
    await store.commit_sync_batch(SyncToken("s2"), [redaction("$x", "$a")])
    await store.aclose()

    store = await kind.open()
    try:
        assert [p.event_id for p in await store.pending()] == ["$x"]
        assert await store.handled_outcome("$a") == "redacted"
    finally:
        await store.aclose()


async def test_redactions_of_what_the_store_does_not_know_change_nothing(
    store: BotStore, kind: Kind
) -> None:
    await store.apply_chats([chat("c1", ROOM)])
    await answered(store, "$a")
    (invite,) = await store.commit_sync_batch(
        SyncToken("s2"), [NewInboxItem(EventID("invite:!r:x"), RoomID("!r:x"), "invite",
                                       message("invite:!r:x"))]
    )  # fmt: skip
    encryption = RoomEvent(
        type="m.room.encryption", event_id=EventID("$enc"), sender=UserID(ALICE),
        origin_server_ts=1, content={"algorithm": "m.megolm.v1.aes-sha2"}, state_key="",
    )  # fmt: skip
    await store.commit_sync_batch(
        SyncToken("s3"), [NewInboxItem(EventID("$enc"), ROOM, "message", encryption)]
    )
    before = kind.rows("SELECT event_id, outcome FROM events ORDER BY seq")

    with capture_logs() as logs:
        fresh = await store.commit_sync_batch(
            SyncToken("s4"),
            [
                redaction("$r1", "$never-seen"),
                redaction("$r2", "$a", room_id=OTHER_ROOM),  # another room's event
                redaction("$r3", "invite:!r:x", room_id=RoomID("!r:x")),
                redaction("$r4", "$enc"),  # a state event: encryption stays on
                redaction("$r5", "$answer$a"),  # the bot's own answer
                *[redaction(f"$flood{n}", f"$nothing{n}") for n in range(500)],
            ],
        )

    assert fresh == []
    assert kind.rows("SELECT event_id, outcome FROM events ORDER BY seq") == before
    assert await store.conversation("c1") == [("user", "q$a"), ("assistant", "a$a")]
    assert [e for e in logs if e["event"] == "redactions_applied"] == [
        {"event": "redactions_applied", "applied": 0, "unanswered": 0, "unknown": 505,
         "log_level": "info"}
    ]  # fmt: skip
    assert store.sync_token == "s4"
    assert not store.is_redacted(invite)


async def test_a_message_redacted_twice_in_one_batch_is_redacted_once(store: BotStore) -> None:
    (item,) = await store.commit_sync_batch(SyncToken("s1"), [new_item("$a")])

    fresh = await store.commit_sync_batch(
        SyncToken("s2"), [redaction("$x", "$a"), redaction("$y", "$a")]
    )

    assert await store.handled_outcome("$a") == "redacted"
    assert store.is_redacted(item)
    # The second finds it handled without an answer: nothing waits for it.
    assert [f.event_id for f in fresh] == ["$x"]
    assert await store.handled_outcome("$y") == "ignored"


async def test_a_rebuilt_conversation_keeps_its_sources_for_later_redactions(
    store: BotStore,
) -> None:
    await store.apply_chats([chat("c1", ROOM)])
    await store.commit_sync_batch(SyncToken("s1"), [new_item("$a"), new_item("$b")])
    await store.replace_conversation(
        "c1",
        [("user", "qa"), ("assistant", "aa"), ("user", "qb"), ("assistant", "ab")],
        ["$a", "$a", "$b", "$b"],
    )
    for item in await store.pending():
        await store.finish(item, "replied", EventID(f"$answer{item.event_id}"))

    await store.commit_sync_batch(SyncToken("s2"), [redaction("$x", "$a")])

    assert await store.conversation("c1") == [("user", "qb"), ("assistant", "ab")]


# --- both stores: a conversation per thread (issue 23) -------------------------------------


async def answered_in(
    store: BotStore, event_id: str, thread: str | None, chat_id: str = "c1"
) -> None:
    """Take ``event_id`` in and answer it in ``thread`` (None: the main timeline)."""
    (item,) = await store.commit_sync_batch(SyncToken(f"t{event_id}"), [new_item(event_id)])
    await store.finish_with_turns(
        item, "replied", EventID(f"$answer{event_id}"), chat_id,
        [("user", f"q{event_id}"), ("assistant", f"a{event_id}")], thread=thread,
    )  # fmt: skip


def exchange(event_id: str) -> list[tuple[str, str]]:
    return [("user", f"q{event_id}"), ("assistant", f"a{event_id}")]


async def test_each_thread_is_a_conversation_of_its_own(store: BotStore) -> None:
    await answered_in(store, "$main1", None)
    await answered_in(store, "$t1", "$rootA")
    await answered_in(store, "$main2", None)
    await answered_in(store, "$t2", "$rootB")
    await answered_in(store, "$t3", "$rootA")
    await answered_in(store, "$other", "$rootA", chat_id="c2")  # another chat, same root id

    assert await store.conversation("c1") == exchange("$main1") + exchange("$main2")
    assert await store.conversation("c1", thread=None) == await store.conversation("c1")
    assert await store.conversation("c1", thread="$rootA") == exchange("$t1") + exchange("$t3")
    assert await store.conversation("c1", thread="$rootB") == exchange("$t2")
    assert await store.conversation("c2", thread="$rootA") == exchange("$other")
    # Known per (chat, thread): a thread never held is rebuilt from the room, though
    # the chat's main timeline (or another chat's thread of that id) is known.
    assert await store.conversation("c1", thread="$rootC") is None
    assert await store.conversation("c2") is None
    assert await store.conversation("c3", thread="$rootA") is None


async def test_a_thread_rebuilt_or_forgotten_leaves_the_other_conversations(
    store: BotStore,
) -> None:
    await answered_in(store, "$main", None)
    await answered_in(store, "$a", "$rootA")
    await answered_in(store, "$b", "$rootB")

    # A thread's first message: its conversation is built from the room.
    await store.replace_conversation(
        "c1", exchange("$root") + exchange("$c"), ["$root", "$root", "$c", "$c"], thread="$rootC"
    )
    # !forget in thread A.
    await store.replace_conversation("c1", [], thread="$rootA")

    assert await store.conversation("c1", thread="$rootA") == []  # known, and empty
    assert await store.conversation("c1", thread="$rootB") == exchange("$b")
    assert await store.conversation("c1", thread="$rootC") == exchange("$root") + exchange("$c")
    assert await store.conversation("c1") == exchange("$main")

    # !forget in the main timeline, then a new exchange in the forgotten thread.
    await store.replace_conversation("c1", [])
    await answered_in(store, "$a2", "$rootA")

    assert await store.conversation("c1") == []
    assert await store.conversation("c1", thread="$rootA") == exchange("$a2")
    assert await store.conversation("c1", thread="$rootB") == exchange("$b")


async def test_conversations_per_thread_survive_a_reopen(kind: Kind) -> None:
    store = await kind.open()
    await answered_in(store, "$main", None)
    await answered_in(store, "$a", "$rootA")
    await store.replace_conversation("c1", [], thread="$rootB")
    await store.aclose()

    store = await kind.open()
    try:
        assert await store.conversation("c1") == exchange("$main")
        assert await store.conversation("c1", thread="$rootA") == exchange("$a")
        assert await store.conversation("c1", thread="$rootB") == []
        assert await store.conversation("c1", thread="$rootC") is None
    finally:
        await store.aclose()


async def test_a_redaction_takes_turns_out_of_the_thread_that_holds_them(
    store: BotStore,
) -> None:
    await store.apply_chats([chat("c1", ROOM)])
    # The thread's root was a message answered in the main timeline; the thread's
    # conversation starts with it (its turns carry the root's id there too).
    await answered_in(store, "$root", None)
    await answered_in(store, "$main", None)
    await store.replace_conversation(
        "c1", exchange("$root"), ["$root", "$root"], thread="$root"
    )  # fmt: skip
    await answered_in(store, "$t1", "$root")
    await answered_in(store, "$t2", "$root")
    await answered_in(store, "$u1", "$rootB")

    await store.commit_sync_batch(SyncToken("r1"), [redaction("$x1", "$t1")])

    assert await store.conversation("c1", thread="$root") == exchange("$root") + exchange("$t2")
    assert await store.conversation("c1", thread="$rootB") == exchange("$u1")
    assert await store.conversation("c1") == exchange("$root") + exchange("$main")

    # The root redacted: it leaves both conversations that hold it.
    await store.commit_sync_batch(SyncToken("r2"), [redaction("$x2", "$root")])

    assert await store.conversation("c1", thread="$root") == exchange("$t2")
    assert await store.conversation("c1") == exchange("$main")
    assert await store.conversation("c1", thread="$rootB") == exchange("$u1")


async def test_a_message_redacted_while_answered_in_a_thread_adds_no_turns(
    store: BotStore,
) -> None:
    await store.apply_chats([chat("c1", ROOM)])
    (item,) = await store.commit_sync_batch(SyncToken("s1"), [new_item("$a", body="secret")])
    await store.commit_sync_batch(SyncToken("s2"), [redaction("$x", "$a")])

    await store.finish_with_turns(
        item, "replied", EventID("$late"), "c1", [("user", "secret")], thread="$root"
    )

    assert await store.conversation("c1", thread="$root") is None
    assert await store.handled_outcome("$a") == "redacted"


# Not a thread's root event id: '' (the main timeline is None, and '' must not
# silently be it), longer than an event id may be, or not UTF-8 text.
NOT_THREADS = [
    pytest.param("", id="empty"),
    pytest.param("$" + "x" * 9_999, id="10000-chars"),
    pytest.param("$" + random.Random(23).randbytes(4_000).hex(), id="8001-random-chars"),
    pytest.param("$" + "\u00e9" * 128, id="257-bytes"),
    pytest.param("$\ud800", id="lone-surrogate"),
]


@pytest.mark.parametrize("thread", NOT_THREADS)
async def test_what_is_no_thread_is_refused_and_nothing_is_written(
    store: BotStore, kind: Kind, thread: str
) -> None:
    await answered_in(store, "$main", None)
    (item,) = await store.commit_sync_batch(SyncToken("s1"), [new_item("$a")])
    before = kind.rows("SELECT chat_id, thread, role, content FROM turns ORDER BY seq")

    with pytest.raises(ValueError, match="thread"):
        await store.finish_with_turns(item, "replied", EventID("$r"), "c1", exchange("$a"),
                                      thread=thread)  # fmt: skip
    with pytest.raises(ValueError, match="thread"):
        await store.replace_conversation("c1", [], thread=thread)
    with pytest.raises(ValueError, match="thread"):
        await store.conversation("c1", thread=thread)

    # Nothing changed: the item is still pending, the main timeline whole.
    assert [pending.event_id for pending in await store.pending()] == ["$a"]
    assert kind.rows("SELECT chat_id, thread, role, content FROM turns ORDER BY seq") == before
    assert kind.rows("SELECT chat_id, thread FROM contexts") == [("c1", "")]
    assert await store.conversation("c1") == exchange("$main")


@pytest.mark.parametrize(
    "thread",
    [
        pytest.param("$" + "\u00e9" * 127, id="255-bytes"),
        # As long as an event id may be, and incompressible: still fits the index.
        pytest.param("$" + random.Random(23).randbytes(127).hex(), id="255-random-chars"),
        pytest.param("$x'); DROP TABLE turns; --", id="sql"),
        pytest.param("c2", id="another-chat-id"),
        pytest.param("$\u202e\U0001f600", id="unicode"),
    ],
)
async def test_any_event_id_is_a_thread_of_its_own(store: BotStore, thread: str) -> None:
    await answered_in(store, "$main", None)
    await answered_in(store, "$a", thread)

    assert await store.conversation("c1", thread=thread) == exchange("$a")
    assert await store.conversation("c1") == exchange("$main")
    assert await store.conversation(thread) is None


async def test_a_nul_character_in_a_thread_id_keeps_it_a_thread_of_its_own(
    store: BotStore, kind: Kind
) -> None:
    # A hostile server's root id with U+0000: PostgreSQL text cannot hold it and keeps
    # U+FFFD in its place (as for every string); the thread is still its own.
    hostile = "$root\x00evil"
    await answered_in(store, "$main", None)
    await answered_in(store, "$prefix", "$root")
    await answered_in(store, "$a", hostile)

    assert await store.conversation("c1", thread=hostile) == exchange("$a")
    assert await store.conversation("c1", thread="$root") == exchange("$prefix")
    assert await store.conversation("c1") == exchange("$main")
    look_alike = await store.conversation("c1", thread="$root\ufffdevil")
    assert look_alike == (exchange("$a") if kind.name == "postgresql" else None)

    await store.replace_conversation("c1", [], thread=hostile)

    assert await store.conversation("c1", thread=hostile) == []
    assert await store.conversation("c1", thread="$root") == exchange("$prefix")


async def test_one_conversation_is_read_through_its_index(store: BotStore, kind: Kind) -> None:
    assert kind.indexes("turns") == {"turns_by_conversation"}
    if isinstance(kind, SqliteKind):
        plan = " ".join(
            str(row[-1])
            for row in kind.rows(
                "EXPLAIN QUERY PLAN SELECT role, content FROM turns"
                " WHERE chat_id = ? AND thread = ? ORDER BY seq",
                ("c1", "$root"),
            )
        )
        assert "USING INDEX turns_by_conversation (chat_id=? AND thread=?)" in plan
        assert "TEMP B-TREE" not in plan  # in order from the index, no sort


def write_store_before_threads(kind: Kind) -> None:
    """A store as the bot left it before threads (SQLite schema 9, PostgreSQL 2): chat
    c1 with a conversation whose turns carry their message ids, chat c2 forgotten
    (known, empty), nothing for chat c3."""
    if isinstance(kind, SqliteKind):
        write_old_store(kind.path, 9)
        kind.rows("DELETE FROM turns")
    else:
        with psycopg.connect(kind.location, autocommit=True) as connection:
            connection.execute(b"CREATE TABLE bot_schema (version INTEGER NOT NULL)")
            connection.execute(b"INSERT INTO bot_schema(version) VALUES (2)")
            for script in PG_MIGRATIONS[:2]:
                connection.execute(script.encode())
        kind.rows("INSERT INTO meta(key, value) VALUES ('user_id', ?)", (BOT,))
        kind.rows(
            "INSERT INTO chats(chat_id, room_id, owner, title, created_ts)"
            " VALUES ('c1', ?, ?, 'a chat', 1000)",
            (ROOM, ALICE),
        )
        kind.rows("INSERT INTO contexts(chat_id) VALUES ('c1')")
    for role, content, event_id in [
        ("user", "q$a", "$a"), ("assistant", "a$a", "$a"), ("user", "rebuilt", None),
    ]:  # fmt: skip
        kind.rows(
            "INSERT INTO turns(chat_id, role, content, event_id) VALUES ('c1', ?, ?, ?)",
            (role, content, event_id),
        )
    kind.rows("INSERT INTO contexts(chat_id) VALUES ('c2')")
    assert kind.stored_version() == kind.schema_version - 1


async def test_a_store_from_before_threads_keeps_its_conversations_as_main_timelines(
    kind: Kind,
) -> None:
    write_store_before_threads(kind)
    old = [("user", "q$a"), ("assistant", "a$a"), ("user", "rebuilt")]

    store = await kind.open()
    try:
        assert kind.stored_version() == kind.schema_version
        assert await store.conversation("c1") == old
        assert await store.conversation("c2") == []
        assert await store.conversation("c3") is None
        assert await store.conversation("c1", thread="$a") is None
        assert kind.rows("SELECT chat_id, thread FROM contexts ORDER BY chat_id") == [
            ("c1", ""), ("c2", ""),
        ]  # fmt: skip
        assert kind.indexes("turns") == {"turns_by_conversation"}

        # It goes on: a thread beside the main timeline, and an old turn's redaction.
        await answered_in(store, "$t", "$a")
        await answered_in(store, "$b", None)
        await store.commit_sync_batch(
            SyncToken("r1"), [new_item("$a"), redaction("$x", "$a")]
        )  # fmt: skip

        assert await store.conversation("c1") == [("user", "rebuilt"), *exchange("$b")]
        assert await store.conversation("c1", thread="$a") == exchange("$t")
    finally:
        await store.aclose()


# --- PostgreSQL ----------------------------------------------------------------------------


@pytest.fixture
def pg(pg_server: PostgresServer) -> PostgresKind:
    return PostgresKind(pg_server)


def admin(kind: PostgresKind) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(kind.location, autocommit=True)


def store_backend(kind: PostgresKind) -> int:
    """The server process of the open store's connection."""
    ((pid,),) = kind.rows(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'surfaces-bot'"
        " AND datname = current_database()"
    )
    return int(pid)


def terminate(kind: PostgresKind) -> None:
    """Ends the open store's server process, and waits until it is gone."""
    assert kind.rows("SELECT pg_terminate_backend(?, 10000)", (store_backend(kind),)) == [(True,)]


async def test_a_connection_cut_mid_transaction_is_unavailable_and_loses_nothing(
    pg: PostgresKind,
) -> None:
    store = await pg.open()
    try:
        [old] = await store.commit_sync_batch(
            SyncToken("s1"), [new_item("$old")], crypto=[("account", "", "v1")]
        )
        with admin(pg) as blocker:
            # Holds the sync token's row: the batch below waits on its last statement,
            # with its events and crypto rows written, until its backend is ended.
            blocker.execute("BEGIN")
            blocker.execute("SELECT * FROM meta WHERE key = 'sync_token' FOR UPDATE")
            outcome: list[BaseException] = []

            async def batch() -> None:
                try:
                    await store.commit_sync_batch(
                        SyncToken("s2"),
                        [new_item("$new")],
                        crypto=[("account", "", "v2")],
                        encryption={OTHER_ROOM: "{}"},
                    )
                except StoreUnavailable as exc:
                    outcome.append(exc)

            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(batch)
                    while not pg.rows(  # noqa: ASYNC110 (the server's view, polled)
                        "SELECT 1 FROM pg_stat_activity WHERE application_name = 'surfaces-bot'"
                        " AND wait_event_type = 'Lock'"
                    ):
                        await trio.sleep(0.01)
                    terminate(pg)
            blocker.execute("ROLLBACK")

        assert len(outcome) == 1
        assert store.sync_token == "s1"
        assert store.room_encryption(OTHER_ROOM) is None
        # The next calls connect again and find everything as before the batch.
        assert await store.get_meta("sync_token") == "s1"
        assert await store.pending() == [old]
        assert await store.crypto_rows() == [("account", "", "v1")]

        # The same batch, fetched again, goes in whole.
        [new] = await store.commit_sync_batch(
            SyncToken("s2"), [new_item("$new")], crypto=[("account", "", "v2")]
        )
        assert [item.event_id for item in await store.pending()] == ["$old", "$new"]
        await store.finish(new, "replied", EventID("$r"))
    finally:
        await store.aclose()
    assert pg.rows("SELECT value FROM meta WHERE key = 'sync_token'") == [("s2",)]


async def test_an_idle_connection_cut_fails_one_call_and_the_next_reconnects(
    pg: PostgresKind,
) -> None:
    store = await pg.open()
    try:
        [item] = await store.commit_sync_batch(SyncToken("s1"), [new_item("$a")])
        terminate(pg)

        with pytest.raises(StoreUnavailable, match=r"terminat|closed|lost"):
            await store.finish(item, "replied", EventID("$r"))
        assert await store.pending() == [item]
        await store.finish(item, "replied", EventID("$r"))
        assert await store.handled_outcome("$a") == "replied"
    finally:
        await store.aclose()


class CommitAnswerDropper:
    """A TCP proxy to the server that, once armed, passes a COMMIT on and then cuts
    that connection before its answer comes back: the commit happened, the client
    cannot know. `partition` cuts the client off while the server keeps its end open,
    as a network partition does until the server's keepalives notice."""

    def __init__(self, port: int) -> None:
        self._target = ("127.0.0.1", port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.armed = threading.Event()
        self.refusing = threading.Event()  # new connections closed at once
        self._sockets: list[socket.socket] = []
        self._clients: list[socket.socket] = []
        self._kept: set[socket.socket] = set()  # server ends a partition left open
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.refusing.is_set():
                client.close()
                continue
            server = socket.create_connection(self._target)
            self._sockets += [client, server]
            self._clients.append(client)
            cut = threading.Event()
            for source, sink, upstream in ((client, server, True), (server, client, False)):
                thread = threading.Thread(
                    target=self._pump, args=(source, sink, upstream, cut), daemon=True
                )
                self._threads.append(thread)
                thread.start()

    def _pump(
        self, source: socket.socket, sink: socket.socket, upstream: bool, cut: threading.Event
    ) -> None:
        try:
            while (data := source.recv(65536)) and not cut.is_set():
                committing = upstream and self.armed.is_set() and b"COMMIT\x00" in data
                if committing:
                    cut.set()  # before the COMMIT goes: its answer is never passed back
                    self.armed.clear()
                sink.sendall(data)
                if committing:
                    time.sleep(0.3)  # the server commits meanwhile
                    break
        except OSError:
            pass
        for end in (source, sink):
            if end in self._kept:
                continue  # the server is not told
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def partition(self) -> None:
        """Cuts every connection so far off from its client; new ones work."""
        self._kept.update(end for end in self._sockets if end not in self._clients)
        for client in self._clients:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        for end in [self._listener, *self._sockets]:  # wakes the threads blocked on them
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=10)
        for end in [self._listener, *self._sockets]:
            end.close()


async def test_a_commit_whose_answer_is_lost_is_found_committed(
    pg: PostgresKind, pg_server: PostgresServer
) -> None:
    proxy = CommitAnswerDropper(pg_server.port)
    url = pg.location.replace(f":{pg_server.port}/", f":{proxy.port}/")
    store = await PostgresStore.open(url, BOT)
    try:
        await store.commit_sync_batch(SyncToken("s1"), [])
        proxy.armed.set()

        with capture_logs() as logs:
            fresh = await store.commit_sync_batch(SyncToken("s2"), [new_item("$a")])

        assert not proxy.armed.is_set()  # the COMMIT went through the proxy
        assert [item.event_id for item in fresh] == ["$a"]
        assert store.sync_token == "s2"
        assert [e["status"] for e in logs if e["event"] == "store_commit_in_doubt"] == ["committed"]
        assert await store.pending() == fresh
    finally:
        await store.aclose()
        proxy.close()


async def test_a_batch_whose_commit_could_not_be_looked_up_is_handed_out_when_it_comes_again(
    pg: PostgresKind, pg_server: PostgresServer
) -> None:
    proxy = CommitAnswerDropper(pg_server.port)
    url = pg.location.replace(f":{pg_server.port}/", f":{proxy.port}/")
    store = await PostgresStore.open(url, BOT)
    try:
        [old] = await store.commit_sync_batch(SyncToken("s1"), [new_item("$old")])
        proxy.armed.set()
        proxy.refusing.set()  # nor can the store connect again to ask

        with pytest.raises(StoreUnavailable, match="lost at commit"):
            await store.commit_sync_batch(SyncToken("s2"), [new_item("$a"), new_item("$b")])
        assert store.sync_token == "s1"
        # It did commit: the sync loop fetches the same batch again.
        assert pg.rows("SELECT value FROM meta WHERE key = 'sync_token'") == [("s2",)]
        proxy.refusing.clear()

        fresh = await store.commit_sync_batch(
            SyncToken("s2"), [new_item("$old"), new_item("$a"), new_item("$b"), new_item("$c")]
        )

        assert [item.event_id for item in fresh] == ["$a", "$b", "$c"]
        assert store.sync_token == "s2"
        assert await store.pending() == [old, *fresh]
        # Handed out once only.
        assert await store.commit_sync_batch(SyncToken("s3"), [new_item("$a")]) == []
    finally:
        await store.aclose()
        proxy.close()


async def test_an_answer_retried_after_a_commit_that_could_not_be_looked_up_is_kept_once(
    pg: PostgresKind, pg_server: PostgresServer
) -> None:
    proxy = CommitAnswerDropper(pg_server.port)
    url = pg.location.replace(f":{pg_server.port}/", f":{proxy.port}/")
    store = await PostgresStore.open(url, BOT)
    try:
        [item] = await store.commit_sync_batch(SyncToken("s1"), [new_item("$a")])
        proxy.armed.set()
        proxy.refusing.set()
        turns = [("user", "hi"), ("assistant", "hello")]

        with pytest.raises(StoreUnavailable, match="lost at commit"):
            await store.finish_with_turns(item, "replied", EventID("$r"), "c1", turns)
        proxy.refusing.clear()
        # The dispatcher retries the job; the server de-duplicates the reply.
        await store.finish_with_turns(item, "replied", EventID("$r"), "c1", turns)

        assert await store.conversation("c1") == turns
        assert await store.handled_outcome("$a") == "replied"
    finally:
        await store.aclose()
        proxy.close()


async def test_events_pending_at_open_are_pendings_not_a_batchs(pg: PostgresKind) -> None:
    store = await pg.open()
    await store.commit_sync_batch(SyncToken("s1"), [new_item("$a")])
    await store.aclose()

    reopened = await pg.open()
    try:
        # The server replays $a before the runtime reads the inbox: not handed out twice.
        assert await reopened.commit_sync_batch(SyncToken("s2"), [new_item("$a")]) == []
        assert [item.event_id for item in await reopened.pending()] == ["$a"]
    finally:
        await reopened.aclose()


async def test_after_a_partition_the_store_ends_its_own_lost_session_and_goes_on(
    pg: PostgresKind, pg_server: PostgresServer
) -> None:
    proxy = CommitAnswerDropper(pg_server.port)
    url = pg.location.replace(f":{pg_server.port}/", f":{proxy.port}/")
    store = await PostgresStore.open(url, BOT)
    try:
        [item] = await store.commit_sync_batch(SyncToken("s1"), [new_item("$a")])
        lost = store_backend(pg)
        proxy.partition()
        with pytest.raises(StoreUnavailable):
            await store.finish(item, "replied", EventID("$r"))
        # The server still has the lost session, with the store's lock.
        assert store_backend(pg) == lost

        await store.finish(item, "replied", EventID("$r"))

        assert store_backend(pg) != lost
        assert await store.handled_outcome("$a") == "replied"
    finally:
        await store.aclose()
        proxy.close()


async def test_a_commit_that_dies_with_its_connection_is_unavailable(pg: PostgresKind) -> None:
    # A deferred trigger ends the store's own backend inside COMMIT: not committed.
    pg.rows(
        "CREATE FUNCTION die() RETURNS trigger LANGUAGE plpgsql AS"
        " $$ BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NULL; END $$"
    )
    store = await pg.open()
    try:
        pg.rows(
            "CREATE CONSTRAINT TRIGGER die_at_commit AFTER INSERT ON meta"
            " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.key = 'doomed')"
            " EXECUTE FUNCTION die()"
        )
        with pytest.raises(StoreUnavailable):
            await store.set_meta("doomed", "x")
        assert await store.get_meta("doomed") is None
        await store.set_meta("fine", "y")
        assert await store.get_meta("fine") == "y"
    finally:
        await store.aclose()


async def test_a_store_another_bot_holds_is_refused_until_it_lets_go(pg: PostgresKind) -> None:
    first = await pg.open()
    holder = store_backend(pg)
    try:
        with pytest.raises(StoreError, match=f"held by another bot \\(server process {holder}\\)"):
            await pg.open()
    finally:
        await first.aclose()
    second = await pg.open()
    await second.aclose()


async def test_opening_waits_for_the_holder_to_let_go(pg: PostgresKind) -> None:
    first = await pg.open()

    async def close_soon() -> None:
        await trio.sleep(0.3)
        await first.aclose()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(close_soon)
            second = await PostgresStore.open(pg.location, BOT, lock_wait_s=15)
    await second.aclose()


async def test_a_store_that_lost_its_lock_to_another_bot_writes_nothing(
    pg: PostgresKind,
) -> None:
    deposed = await pg.open()
    try:
        [item] = await deposed.commit_sync_batch(SyncToken("s1"), [new_item("$a")])
        terminate(pg)
        successor = await pg.open()  # takes the store while the first is cut off
        try:
            for _ in range(2):  # the lost connection, then the lock held by the other
                with pytest.raises(StoreUnavailable):
                    await deposed.finish(item, "replied", EventID("$r"))
            with pytest.raises(StoreUnavailable, match="held by another bot"):
                await deposed.commit_sync_batch(SyncToken("s2"), [])
            assert await successor.pending() == [item]
            assert successor.sync_token == "s1"
        finally:
            await successor.aclose()
    finally:
        await deposed.aclose()


async def test_a_store_another_bot_opened_meanwhile_is_deposed_for_good(
    pg: PostgresKind,
) -> None:
    deposed = await pg.open()
    try:
        [item] = await deposed.commit_sync_batch(SyncToken("s1"), [new_item("$a")])
        terminate(pg)
        successor = await pg.open()  # takes over, handles $a, and stops
        await successor.finish(item, "replied", EventID("$by-successor"))
        await successor.commit_sync_batch(SyncToken("s2"), [])
        await successor.aclose()

        with pytest.raises(StoreUnavailable):  # the lost connection
            await deposed.commit_sync_batch(SyncToken("s1-stale"), [new_item("$b")])
        for _ in range(2):  # connecting again, it finds it was replaced; then at once
            with pytest.raises(StoreDeposed, match="another bot"):
                await deposed.finish(item, "failed")
        with pytest.raises(StoreDeposed):
            await deposed.commit_sync_batch(SyncToken("s1-stale"), [new_item("$b")])
    finally:
        await deposed.aclose()

    assert pg.rows("SELECT value FROM meta WHERE key = 'sync_token'") == [("s2",)]
    assert pg.rows("SELECT event_id, outcome, reply_event_id FROM events") == [
        ("$a", "replied", "$by-successor")
    ]
    again = await pg.open()  # the deposed one let go of the lock
    await again.aclose()


_HOLD_THE_STORE = """
import sys, trio
from bot.store import NewInboxItem
from bot.store_postgres import PostgresStore
from matrix_api.models import SyncToken

async def main() -> None:
    store = await PostgresStore.open(sys.argv[1], "@bot:example.org")
    await store.commit_sync_batch(SyncToken("s-active"), [])
    print("ready", flush=True)
    await trio.sleep_forever()

trio.run(main)
"""


async def test_a_standby_gets_the_store_as_soon_as_the_active_process_dies(
    pg: PostgresKind,
) -> None:
    active = await trio.lowlevel.open_process(
        [sys.executable, "-c", _HOLD_THE_STORE, pg.location], stdout=subprocess.PIPE
    )
    try:
        assert active.stdout is not None
        said = b""
        with trio.fail_after(30):
            while not said.endswith(b"\n"):
                chunk = await active.stdout.receive_some()
                assert chunk, f"the active bot ended: {said!r}"
                said += chunk
        assert said == b"ready\n"
        taken: list[PostgresStore] = []

        async def standby() -> None:
            taken.append(await PostgresStore.open(pg.location, BOT, lock_wait_s=60))

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(standby)
                await trio.sleep(0.5)
                assert taken == []  # waiting: the active one holds it
                active.kill()  # kill -9: no goodbye to the server
                killed = trio.current_time()
                while not taken:  # noqa: ASYNC110 (the standby's task sets it)
                    await trio.sleep(0.005)
                print(f"standby took the store {trio.current_time() - killed:.3f} s after kill -9")
        try:
            assert taken[0].sync_token == "s-active"
        finally:
            await taken[0].aclose()
    finally:
        active.kill()
        with trio.move_on_after(10):
            await active.wait()
        if active.stdout is not None:
            await active.stdout.aclose()


def pg_snapshot(kind: PostgresKind) -> dict[str, list[tuple[Any, ...]]]:
    return {
        table: kind.rows(f'SELECT * FROM "{table}" ORDER BY 1')  # noqa: S608 (our own names)
        for table in sorted(kind.tables())
    }


def foreign_tables(kind: PostgresKind) -> None:
    kind.rows("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    kind.rows("INSERT INTO notes VALUES (1, 'keep me')")


def foreign_meta_table(kind: PostgresKind) -> None:
    kind.rows("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    kind.rows("INSERT INTO meta VALUES ('user_id', '@bot:example.org')")


def bot_schema_without_its_tables(kind: PostgresKind) -> None:
    kind.rows("CREATE TABLE bot_schema (version INTEGER NOT NULL)")
    kind.rows("INSERT INTO bot_schema VALUES (1)")


async def pg_newer_schema(kind: PostgresKind) -> None:
    await (await kind.open()).aclose()
    kind.rows("UPDATE bot_schema SET version = 99")


async def pg_other_users_store(kind: PostgresKind) -> None:
    store = await kind.open("@someone-else:example.org")
    await store.apply_chats(put=[chat("c1", "!a:x")])
    await store.aclose()


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (foreign_tables, "holds tables of something else \\(notes\\)"),
        (foreign_meta_table, "holds tables of something else \\(meta\\)"),
        (bot_schema_without_its_tables, "not a bot store \\(no chats, contexts"),
        (pg_newer_schema, "schema version 99 is newer than this bot understands"),
        (pg_other_users_store, "belongs to @someone-else:example.org, not @bot:example.org"),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
async def test_an_unusable_database_is_refused_and_left_untouched(
    pg: PostgresKind, make: Any, says: str
) -> None:
    made = make(pg)
    if made is not None:
        await made
    before = pg_snapshot(pg)

    with pytest.raises(StoreError) as caught:
        await pg.open()

    assert re.search(says, str(caught.value))
    assert pg.location.partition("?")[0] in str(caught.value)
    assert pg_snapshot(pg) == before


async def test_a_schema_of_its_own_in_a_shared_database(pg_server: PostgresServer) -> None:
    pg = PostgresKind(pg_server, own_database=True)
    foreign_tables(pg)  # another application's tables in the default schema
    pg.rows("CREATE SCHEMA bot")
    url = f"{pg.location}?options=-csearch_path%3Dbot"

    store = await PostgresStore.open(url, BOT)
    try:
        await store.commit_sync_batch(SyncToken("s1"), [new_item("$a")])
    finally:
        await store.aclose()
    assert pg.rows("SELECT event_id FROM bot.events") == [("$a",)]
    assert pg.tables() == {"notes"}

    missing = f"{pg.location}?options=-csearch_path%3Dnowhere"
    with pytest.raises(StoreError, match="no schema to create the tables in"):
        await PostgresStore.open(missing, BOT)


async def test_the_url_password_is_never_in_an_error(pg: PostgresKind) -> None:
    url = pg.location.replace("postgresql://postgres@", "postgresql://postgres:hunter2secret@")
    url = url.rsplit("/", 1)[0] + "/no_such_database"

    with pytest.raises(StoreError) as caught:
        await PostgresStore.open(url, BOT)

    assert "no_such_database" in str(caught.value)
    assert "hunter2secret" not in str(caught.value)


async def test_a_read_only_server_is_unavailable_and_keeps_the_item_pending(
    pg_server: PostgresServer,
) -> None:
    pg = PostgresKind(pg_server, own_database=True)
    store = await pg.open()
    try:
        (item,) = await store.commit_sync_batch(SyncToken("s1"), [new_item("$e1")])
        # What a standby answers (25006): the same call may work on the primary later.
        pg.rows(
            "ALTER DATABASE "
            + pg.location.rsplit("/", 1)[1]
            + " SET default_transaction_read_only = on"
        )
        terminate(pg)
        with pytest.raises(StoreUnavailable):
            await store.finish(item, "replied")  # the cut connection
        with pytest.raises(StoreUnavailable, match="read-only"):
            await store.finish(item, "replied", EventID("$reply"))
        assert [pending.event_id for pending in await store.pending()] == ["$e1"]
    finally:
        await store.aclose()


async def test_a_broken_statement_is_a_bug_not_an_unavailable_postgres_store(
    pg: PostgresKind,
) -> None:
    store = await pg.open()
    try:
        with pytest.raises(psycopg.errors.UndefinedColumn):
            await store._run(lambda db: db.execute("SELECT no_such_column FROM events"))
        # The connection is still good.
        assert await store.counts() == {
            "chats": 0,
            "inbox": 0,
            "handled": 0,
            "spaces": 0,
            "encrypted_rooms": 0,
        }
    finally:
        await store.aclose()


async def test_a_postgres_commit_that_fails_leaves_no_transaction_open(pg: PostgresKind) -> None:
    store = await pg.open()
    try:
        pg.rows("CREATE TABLE parent(id INTEGER PRIMARY KEY)")
        pg.rows(
            "CREATE TABLE child(parent_id INTEGER REFERENCES parent(id)"
            " DEFERRABLE INITIALLY DEFERRED)"
        )
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            await store._run(
                store._transaction(lambda db: db.execute("INSERT INTO child VALUES (1)"))
            )
        await store.commit_sync_batch(SyncToken("s1"), [new_item("$e1")])
        assert store.sync_token == "s1"
    finally:
        await store.aclose()
    assert pg.rows("SELECT value FROM meta WHERE key = 'sync_token'") == [("s1",)]


async def test_a_closed_store_refuses_calls(pg: PostgresKind) -> None:
    store = await pg.open()
    await store.aclose()

    with pytest.raises(StoreError, match="closed"):
        await store.get_meta("user_id")


# --- choosing a store -----------------------------------------------------------------------


async def test_open_store_chooses_by_location(tmp_path: Path, pg: PostgresKind) -> None:
    for location in (
        tmp_path / "a.sqlite3",
        str(tmp_path / "b.sqlite3"),
        f"sqlite:///{tmp_path}/c.sqlite3",
    ):
        store = await open_store(location, BOT)
        assert isinstance(store, Store)
        await store.aclose()
    assert {p.name for p in tmp_path.glob("*.sqlite3")} == {"a.sqlite3", "b.sqlite3", "c.sqlite3"}

    store = await open_store(pg.location, BOT)
    assert isinstance(store, PostgresStore)
    await store.aclose()


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("bot.sqlite3", Path("bot.sqlite3")),
        ("sqlite:///var/lib/bot.sqlite3", Path("/var/lib/bot.sqlite3")),
        ("sqlite:relative.sqlite3", Path("relative.sqlite3")),
        ("SQLITE:///x", Path("/x")),
    ],
)
def test_sqlite_locations(location: str, expected: Path) -> None:
    assert sqlite_path(location) == expected


@pytest.mark.parametrize("location", ["sqlite://host/x", "sqlite:", ""])
def test_sqlite_locations_that_name_no_file(location: str) -> None:
    with pytest.raises(ValueError, match=r"SQLite URL has no host|no file named"):
        sqlite_path(location)


def test_postgres_urls_are_told_apart() -> None:
    assert is_postgres_url("postgresql://u@h/db")
    assert is_postgres_url("POSTGRES://h/db")
    assert not is_postgres_url("/srv/postgresql://x")
    assert not is_postgres_url("sqlite:///x")


_ENV = {
    "MATRIX_HOMESERVER": "https://example.org",
    "MATRIX_USER_ID": BOT,
    "MATRIX_ACCESS_TOKEN": "token",
}


@pytest.mark.parametrize(
    ("environ", "location"),
    [
        ({}, Path("surfaces-bot.sqlite3")),
        ({"BOT_STORE_PATH": "/srv/bot.sqlite3"}, Path("/srv/bot.sqlite3")),
        ({"BOT_STORE_URL": "sqlite:///srv/bot.sqlite3"}, Path("/srv/bot.sqlite3")),
        (
            {"BOT_STORE_URL": "sqlite:///srv/bot.sqlite3", "BOT_STORE_PATH": "/srv/bot.sqlite3"},
            Path("/srv/bot.sqlite3"),
        ),
        ({"BOT_STORE_URL": "/srv/bot.sqlite3"}, Path("/srv/bot.sqlite3")),
        ({"BOT_STORE_URL": "postgresql://bot:pw@db/bot"}, "postgresql://bot:pw@db/bot"),
    ],
)
def test_the_store_setting_names_one_store(environ: dict[str, str], location: Any) -> None:
    settings = load_settings(None, {**_ENV, **environ})

    assert settings.store_location == location
    assert "pw@" not in repr(settings)


@pytest.mark.parametrize(
    ("environ", "says"),
    [
        (
            {"BOT_STORE_URL": "sqlite:///a.sqlite3", "BOT_STORE_PATH": "b.sqlite3"},
            "name two different stores",
        ),
        ({"BOT_STORE_URL": "sqlite://user:secret@host/x"}, "has no host"),
    ],
)
def test_a_store_setting_that_cannot_be_used_is_a_problem(
    environ: dict[str, str], says: str
) -> None:
    with pytest.raises(ConfigError, match=says) as caught:
        load_settings(None, {**_ENV, **environ})
    assert "secret" not in str(caught.value)


async def test_the_store_session_asks_the_server_to_notice_a_lost_client_soon(
    pg: PostgresKind,
) -> None:
    # Else a partitioned session, with the store's lock, lives on for the OS's 2 hours.
    store = await pg.open()
    try:
        shown = await store._run(
            lambda db: db.execute(
                "SELECT current_setting('tcp_keepalives_idle'),"
                " current_setting('tcp_keepalives_count'), current_setting('tcp_user_timeout')"
            ).fetchone()
        )
    finally:
        await store.aclose()
    assert shown == ("10", "3", "30000")
