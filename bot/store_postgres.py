"""The bot's state in PostgreSQL: the same tables and rules as `bot.store` (SQLite).

Use it when the state must outlive the machine the bot runs on: a database that is
replicated and backed up, shared by instances that take over from one another (the
active/standby lease is issue 22's next step). The invariants are `bot.store`'s:

* a sync batch's events (and the crypto rows and encrypted rooms it brings) enter the
  inbox in the transaction that advances the sync token;
* an event leaves the inbox only in the transaction that records it as handled;
* an event already handled is never taken in again, whatever the server replays.

What differs from SQLite, and why:

* Every call is a round trip to a server, so each runs in a worker thread, one at a
  time on the store's one connection (a `trio.Lock`, first come first served).
  psycopg's async API needs asyncio's event loop (under trio it fails with "no
  running event loop"), so it is its blocking API, off the trio thread. As in
  `bot.store`, a cancellation lands before a call or not at all. Unlike SQLite's,
  a call lets other tasks run while it waits: the calls still commit in the order
  they were made (the lock is fair), and the in-memory maps change in that order too.
* A lost connection (the server restarted, a failover, ``pg_terminate_backend``, a
  network cut found by TCP keepalives) is `StoreUnavailable`: the transaction was
  rolled back, and the next call connects again. A COMMIT whose answer was lost is
  resolved on a new connection by its transaction id (``pg_xact_status``), so a
  committed batch is not reported as failed. When even that cannot be asked (no new
  connection), it is reported as failed, and the writes make that safe: the batch,
  fetched again, hands out its events that this store never returned, and
  `finish_with_turns` appends its turns only to a pending item.
* "One process per store": instead of ``flock`` on a file beside it, the store's
  connection holds a session advisory lock (per database and schema) while the store
  is open. The server lets go when the connection ends, however the process ended. A
  store that reconnects takes it again first (ending its own lost session if the
  server still keeps it, as after a partition), and if another bot holds it by then,
  every call is `StoreUnavailable`. Each opening counts itself in meta ``holder``; a
  store that gets the lock back and finds another count there was replaced meanwhile
  (its memory may be stale): `StoreDeposed` from then on, and it writes nothing.

The lease (issue 22, `bot.lease`) builds on that lock: a standby is a bot whose
`open` waits for it (a long ``lock_wait_s``: it gets the store within the 0.1 s poll
of a kill -9 of the active process, see the tests); the runtime then starts as after
a restart. A cut connection hands the store over once the server drops the lost
session (at once for ``pg_terminate_backend``; a partition within the keepalive
bound, about 30 s). A store that reconnects and finds another bot's session holding
the lock is `StoreDeposed` at once (that bot opened it); `check_lease` is the cheap
call the runtime makes to find out, and `lock_holder` is what ``doctor`` shows.
* PostgreSQL text cannot hold U+0000: every string parameter has it replaced by
  U+FFFD (a hostile server's event id, a message that holds one), the same way for a
  write and for the lookup that finds it again. Stored events are bytes, unchanged.
* The schema's version is a row in ``bot_schema``; the tables live in the connection's
  current schema (``?options=-csearch_path%3Dbot`` in the URL picks another). A schema
  that holds other tables and no ``bot_schema`` is refused, untouched.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import msgspec
import psycopg
import structlog
import trio
from psycopg import conninfo
from psycopg.abc import Buffer
from psycopg.types.string import StrDumperUnknown

from matrix_api.models import EventID, RoomID, SyncToken

from .chats import Chat
from .quarantine import log_quarantined
from .store import (
    HANDLED_KEEP_MS,
    SELECT_PENDING,
    CryptoRow,
    InboxItem,
    NewInboxItem,
    Outcome,
    Provisioned,
    Quarantined,
    RedactionTarget,
    StoreError,
    StoreUnavailable,
    log_redactions,
    pending_from_rows,
    redaction_action,
    redaction_target,
    redaction_waits,
    thread_key,
)
from .store_cache import SELECT_CHATS, StoreCache, chats_from_rows

if TYPE_CHECKING:
    from .store import Store
    from .store_api import BotStore

__all__ = ["PG_SCHEMA_VERSION", "PostgresStore", "StoreDeposed"]

T = TypeVar("T")
Connection = psycopg.Connection[tuple[Any, ...]]

log = structlog.get_logger("bot.store")

_MIGRATIONS: list[str] = [
    # 1: the SQLite store's schema 8 (the same tables and columns).
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE chats (
        chat_id    TEXT PRIMARY KEY,
        room_id    TEXT NOT NULL UNIQUE,
        owner      TEXT NOT NULL,
        title      TEXT NOT NULL,
        created_ts BIGINT NOT NULL,
        archived   BOOLEAN NOT NULL DEFAULT false,
        space_id   TEXT,
        successor  TEXT,
        settings   TEXT NOT NULL DEFAULT '{}'
    );
    CREATE TABLE spaces (
        owner   TEXT PRIMARY KEY,
        room_id TEXT NOT NULL UNIQUE
    );
    -- The inbox and the record of what was handled: pending while outcome is NULL.
    CREATE TABLE events (
        seq            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        event_id       TEXT NOT NULL UNIQUE,
        room_id        TEXT NOT NULL,
        kind           TEXT NOT NULL,
        event          BYTEA,
        attempts       INTEGER NOT NULL DEFAULT 0,
        received_ts    BIGINT NOT NULL,
        reply_event_id TEXT,
        provisioned    TEXT,
        outcome        TEXT,
        handled_ts     BIGINT,
        reason         TEXT
    );
    CREATE TABLE turns (
        seq     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        chat_id TEXT NOT NULL,
        role    TEXT NOT NULL,
        content TEXT NOT NULL
    );
    CREATE INDEX turns_by_chat ON turns(chat_id, seq);
    CREATE TABLE contexts (chat_id TEXT PRIMARY KEY);
    CREATE TABLE crypto (
        kind  TEXT NOT NULL,
        key   TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (kind, key)
    );
    CREATE TABLE encrypted_rooms (room_id TEXT PRIMARY KEY, content TEXT NOT NULL);
    """,
    # 2: the SQLite store's 9: each turn names the message it came from.
    """
    ALTER TABLE turns ADD COLUMN event_id TEXT;
    """,
    # 3: the SQLite store's 10: a conversation per (chat, thread), '' the main
    # timeline, which is what a store held so far. (A constant default: no rewrite.)
    """
    ALTER TABLE turns ADD COLUMN thread TEXT NOT NULL DEFAULT '';
    DROP INDEX turns_by_chat;
    CREATE INDEX turns_by_conversation ON turns(chat_id, thread, seq);
    ALTER TABLE contexts ADD COLUMN thread TEXT NOT NULL DEFAULT '';
    ALTER TABLE contexts DROP CONSTRAINT contexts_pkey;
    ALTER TABLE contexts ADD PRIMARY KEY (chat_id, thread);
    """,
]
PG_SCHEMA_VERSION = len(_MIGRATIONS)
_TABLES = frozenset(
    {"meta", "chats", "spaces", "events", "turns", "contexts", "crypto", "encrypted_rooms"}
)

# The store's advisory lock: two int4 keys, this program and the schema the tables
# are in (two bots may share a database, each in a schema of its own).
_TRY_LOCK = (
    "SELECT pg_try_advisory_lock(hashtext('surfaces-bot store'), hashtext(current_schema()))"
)
_LOCK_HOLDER = (
    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND classid::int = hashtext('surfaces-bot store')"
    " AND objid::int = hashtext(current_schema())"
)
# Who holds it: the server process and the session's client address (doctor).
_HOLDER_SESSION = (
    "SELECT l.pid, host(a.client_addr), a.application_name FROM pg_locks l"
    " LEFT JOIN pg_stat_activity a ON a.pid = l.pid"
    " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND l.classid::int = hashtext('surfaces-bot store')"
    " AND l.objid::int = hashtext(current_schema())"
)
_LOCK_POLL_S = 0.1
_STANDBY_FIRST_S = 3 * _LOCK_POLL_S
_THIS_PROCESS = f"{socket.gethostname()} pid {os.getpid()}"
# Settings the URL does not give: a dead peer is found in about 30 s, not the OS's
# two hours, so a partitioned call ends (`StoreUnavailable`) instead of hanging.
_CONNECT_DEFAULTS = {
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",
    "application_name": "surfaces-bot",
}
_NEXT_HOLDER = (
    "INSERT INTO meta(key, value) VALUES ('holder', '1') ON CONFLICT (key)"
    " DO UPDATE SET value = (meta.value::bigint + 1)::text RETURNING value"
)
_SERVER_KEEPALIVES = (
    "SELECT set_config('tcp_keepalives_idle', '10', false),"
    " set_config('tcp_keepalives_interval', '5', false),"
    " set_config('tcp_keepalives_count', '3', false),"
    " set_config('tcp_user_timeout', '30000', false)"
)
# SQLSTATE classes of a server that may work again unchanged: connection exception,
# insufficient resources (disk full, out of memory, too many connections), operator
# intervention (shutdown, crash, recovery), system error (I/O), transaction rollback
# (serialization, deadlock); and a lock timeout and a read-only server (a standby).
_TRANSIENT_CLASSES = frozenset({"08", "53", "57", "58", "40"})
_TRANSIENT_STATES = frozenset({"55P03", "25006"})
# How long a transaction whose COMMIT lost its answer may stay "in progress" (its
# backend still ending) before it counts as not committed.
_IN_DOUBT_WAIT_S = 2.0
# How long a reconnecting store waits for its own lost session to end and let go of
# the store's lock.
_OLD_SESSION_WAIT_S = 5.0
_SESSION = "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
# Ends the store's own earlier session, found by its process and start time (a
# process id alone may have been reused), which the server may not yet know is lost.
_END_OLD_SESSION = (
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = %s AND backend_start = %s"
)

_provisioned_decoder = msgspec.json.Decoder(Provisioned)


class _TextWithoutNul(StrDumperUnknown):
    """A str parameter with U+0000 (which PostgreSQL text refuses) as U+FFFD."""

    def dump(self, obj: str) -> Buffer | None:
        return super().dump(obj.replace("\x00", "\ufffd") if "\x00" in obj else obj)


class StoreDeposed(StoreUnavailable):
    """Another bot opened this store while this one's connection was lost: whatever
    this one still holds in memory may be stale, so it writes nothing any more (every
    call raises this). A StoreUnavailable, so a store call's caller backs off as for
    any outage; the runtime's lease watch (`bot.lease`) stops the bot on it."""


class _StoreHeld(Exception):
    def __init__(self, pid: int | None) -> None:
        super().__init__(f"held by another bot (server process {pid})")
        self.pid = pid


class _InDoubt(Exception):
    """A COMMIT failed with the connection: whether it happened is asked later."""

    def __init__(self, xid: str, result: object) -> None:
        super().__init__(xid)
        self.xid = xid
        self.result = result


def _is_transient(exc: psycopg.Error) -> bool:
    if isinstance(exc, psycopg.OperationalError) and exc.sqlstate is None:
        return True  # libpq's own: the connection is lost or closed
    state = exc.sqlstate or ""
    return state[:2] in _TRANSIENT_CLASSES or state in _TRANSIENT_STATES


def _now_ms() -> int:
    return int(time.time() * 1000)


def _shown(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        params = conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unreadable URL)"
    user = f"{params['user']}@" if params.get("user") else ""
    port = f":{params['port']}" if params.get("port") else ""
    return f"postgresql://{user}{params.get('host', '')}{port}/{params.get('dbname', '')}"


def _record_handled(
    db: Connection,
    seq: int,
    outcome: Outcome,
    reply_event_id: EventID | None,
    reason: str | None = None,
) -> None:
    """Take inbox item ``seq`` out of the inbox and remember it as handled (only its
    id stays, to drop a later delivery). An item redacted meanwhile stays "redacted";
    only the id of a reply that went out anyway is added (`bot.store`)."""
    # One statement (SET reads the row as it was): one more per answer would cost
    # every message a little of the pipeline's time for a rare case.
    db.execute(
        "UPDATE events SET"
        " reply_event_id = CASE WHEN outcome IS NULL THEN %s"
        " ELSE coalesce(reply_event_id, %s) END,"
        " handled_ts = CASE WHEN outcome IS NULL THEN %s ELSE handled_ts END,"
        " reason = CASE WHEN outcome IS NULL THEN %s ELSE reason END,"
        " outcome = coalesce(outcome, %s), event = NULL, provisioned = NULL"
        " WHERE seq = %s AND (outcome IS NULL OR outcome = 'redacted')",
        (reply_event_id, reply_event_id, _now_ms(), reason, outcome, seq),
    )


def _record_quarantined(db: Connection, entry: Quarantined, now: int) -> None:
    db.execute(
        "INSERT INTO events(event_id, room_id, kind, received_ts, outcome, handled_ts, reason)"
        " VALUES (%s, %s, 'message', %s, 'quarantined', %s, %s)"
        " ON CONFLICT (event_id) DO NOTHING",
        (entry.event_id, entry.room_id, now, now, entry.reason),
    )


def _write_crypto(db: Connection, rows: Sequence[CryptoRow]) -> None:
    for kind, key, value in rows:
        if value is None:
            db.execute("DELETE FROM crypto WHERE kind = %s AND key = %s", (kind, key))
        else:
            db.execute(
                "INSERT INTO crypto(kind, key, value) VALUES (%s, %s, %s)"
                " ON CONFLICT (kind, key) DO UPDATE SET value = EXCLUDED.value",
                (kind, key, value),
            )


def _write_encryption(db: Connection, rooms: Mapping[RoomID, str]) -> None:
    for room_id, content in rooms.items():
        db.execute(
            "INSERT INTO encrypted_rooms(room_id, content) VALUES (%s, %s)"
            " ON CONFLICT (room_id) DO UPDATE SET content = EXCLUDED.content",
            (room_id, content),
        )


def _put_meta(db: Connection, key: str, value: str) -> None:
    db.execute(
        "INSERT INTO meta(key, value) VALUES (%s, %s)"
        " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
        (key, value),
    )


class PostgresStore(StoreCache):
    """The bot's state in PostgreSQL; open with `PostgresStore.open`, close with
    `aclose`. The same public methods, with the same meaning, as `bot.store.Store`.

    Chats, Spaces and encrypted rooms are also held in memory (loaded at open, kept in
    step with every write), so routing a message costs no round trip.
    """

    def __init__(self, url: str) -> None:
        self._url = url
        self.where = _shown(url)
        self._db: Connection | None = None
        # The server process and start time of the store's session.
        self._session: tuple[Any, ...] | None = None
        self._calls = trio.Lock()
        # Its own limiter, not trio's default one that all threaded work shares: a
        # store call never waits for a token behind other work (one call at a time).
        self._thread = trio.CapacityLimiter(1)
        self._closed = False
        super().__init__()
        # Which opening of the store this is (meta 'holder'), and whether another
        # bot has opened it since (then every call is StoreDeposed).
        self._holder: str | None = None
        self._deposed = False
        # The highest inbox seq returned by `commit_sync_batch` or there at open.
        self._handed_out = 0
        self._watchers = trio.lowlevel.ParkingLot()
        # Items handed out pending that a redaction took out since (`is_redacted`).
        self._redacted: set[int] = set()

    # --- opening ------------------------------------------------------------------

    @classmethod
    async def open(cls, url: str, user_id: str, *, lock_wait_s: float = 0.0) -> PostgresStore:
        """Open (creating and migrating as needed) the store of ``user_id`` in the
        database at ``url``, held by this process until `aclose`.

        Raises `StoreError` for a store another bot holds (after waiting up to
        ``lock_wait_s`` for it to let go), a schema holding something else, a schema
        newer than this code, or another Matrix user's store; `StoreUnavailable` (a
        StoreError) when the server cannot be reached or refuses for now. A store
        refused at open is left exactly as it was found.
        """
        store = cls(url)
        deadline = trio.current_time() + lock_wait_s
        try:
            while True:
                try:
                    await trio.to_thread.run_sync(store._open_sync, user_id)
                    break
                except _StoreHeld as exc:
                    if trio.current_time() >= deadline:
                        raise StoreError(
                            f"{store.where}: {exc}: stop that bot first, "
                            "or give this one a database or schema of its own"
                        ) from exc
                await trio.sleep(_LOCK_POLL_S)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(store._disconnect)
            raise
        return store

    def _connect(self) -> Connection:
        """A new connection holding the store's advisory lock (`_StoreHeld` if another
        bot has it); StoreUnavailable / StoreError when none can be made."""
        try:
            db: Connection = psycopg.connect(self._conninfo(), autocommit=True)
        except psycopg.Error as exc:
            if _is_transient(exc):
                raise StoreUnavailable(f"{self.where}: cannot connect: {exc}") from exc
            raise StoreError(f"{self.where}: cannot connect: {exc}") from exc
        try:
            db.adapters.register_dumper(str, _TextWithoutNul)
            schema = db.execute("SELECT current_schema()").fetchone()
            if schema is None or schema[0] is None:
                raise StoreError(
                    f"{self.where}: no schema to create the tables in (the search_path "
                    "names none that exists)"
                )
            # The server's side of the same bound: a partitioned session (holding the
            # store's lock) is dropped within about 30 s, not the OS's two hours.
            db.execute(_SERVER_KEEPALIVES)
            row = db.execute(_TRY_LOCK).fetchone()
            if row is None or not row[0]:
                holder = db.execute(_LOCK_HOLDER).fetchone()
                raise _StoreHeld(holder[0] if holder else None)
            self._session = db.execute(_SESSION).fetchone()
        except BaseException:
            db.close()
            raise
        return db

    def _conninfo(self) -> str:
        try:
            params = {**_CONNECT_DEFAULTS, **conninfo.conninfo_to_dict(self._url)}
        except psycopg.ProgrammingError as exc:
            raise StoreError(f"{self.where}: not a usable PostgreSQL URL: {exc}") from exc
        return conninfo.make_conninfo("", **params)

    def _reconnect(self) -> Connection:
        """A new connection after the last one was lost. The lost session may still
        hold the store's lock (the server has not noticed, or it is still ending): it
        is ended and waited for, up to a few seconds. Another bot's session is not."""
        old, self._session = self._session, None
        self._disconnect()
        if old is not None:
            # A standby waiting for the store gets the first go (a few of its polls):
            # of two instances, the one whose connection was just cut is the suspect.
            time.sleep(_STANDBY_FIRST_S)
        deadline = time.monotonic() + _OLD_SESSION_WAIT_S
        while True:
            try:
                db = self._db = self._connect()
            except _StoreHeld as held:
                if old is not None and held.pid == old[0] and time.monotonic() >= deadline:
                    self._session = old  # still ours: asked to end again next time
                    raise
                if old is None or held.pid != old[0]:
                    if held.pid is None:
                        raise  # let go between the two questions: try again later
                    # Another bot's session holds it: that bot opened the store (a
                    # standby took over), so this one's memory may be stale.
                    self._deposed = True
                    raise StoreDeposed(
                        f"{self.where}: the connection was lost and the store is now {held}; "
                        "this one writes nothing more"
                    ) from held
                with psycopg.connect(self._conninfo(), autocommit=True) as other:
                    other.execute(_END_OLD_SESSION, old)
                time.sleep(0.05)
                continue
            row = db.execute("SELECT value FROM meta WHERE key = 'holder'").fetchone()
            if row is None or row[0] != self._holder:
                self._deposed = True
                self._disconnect()  # the lock goes back to whoever is active now
                raise StoreDeposed(
                    f"{self.where}: another bot opened this store while this one's "
                    "connection was lost; this one writes nothing more"
                )
            log.info("store_reconnected", store=self.where)
            return db

    def _open_sync(self, user_id: str) -> None:
        db = self._db = self._connect()
        try:
            # One opener at a time checks and migrates: it holds the store's lock.
            with db.transaction():
                self._check_and_migrate(db, user_id)
                _put_meta_if_absent(db, "user_id", user_id)
                # Which host and process holds the store now (`lock_holder`, doctor).
                _put_meta(db, "holder_process", _THIS_PROCESS)
                # Each opening is a new holder: a store that reconnects finds out
                # whether another bot held the store meanwhile (`StoreDeposed`).
                row = db.execute(_NEXT_HOLDER).fetchone()
                self._holder = row[0] if row else None
                # Handled events are remembered to drop the server's replays, which
                # come within minutes; a month keeps the table from growing forever.
                db.execute(
                    "DELETE FROM events WHERE handled_ts < %s", (_now_ms() - HANDLED_KEEP_MS,)
                )
            self._load(db)
        except psycopg.Error as exc:
            if _is_transient(exc):
                raise StoreUnavailable(f"{self.where}: {exc}") from exc
            raise StoreError(f"{self.where}: cannot be used as the bot's store: {exc}") from exc

    def _check_and_migrate(self, db: Connection, user_id: str) -> None:
        tables = {
            name
            for (name,) in db.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            )
        }
        version = 0
        if "bot_schema" in tables:
            row = db.execute("SELECT version FROM bot_schema").fetchone()
            version = row[0] if row else 0
            if version > PG_SCHEMA_VERSION:
                raise StoreError(
                    f"{self.where}: schema version {version} is newer than this bot "
                    f"understands ({PG_SCHEMA_VERSION}); upgrade the bot or use another store"
                )
            missing = _TABLES - tables if version else set()
            if missing:
                raise StoreError(
                    f"{self.where}: not a bot store (no {', '.join(sorted(missing))} table)"
                )
            if version:
                owner = db.execute("SELECT value FROM meta WHERE key = 'user_id'").fetchone()
                if owner is not None and owner[0] != user_id:
                    raise StoreError(
                        f"{self.where}: this store belongs to {owner[0]}, not {user_id}; "
                        "use another database or schema"
                    )
        elif tables:
            shown = ", ".join(sorted(tables)[:5])
            raise StoreError(
                f"{self.where}: its schema holds tables of something else ({shown}); "
                "give the bot a database or schema of its own"
            )
        else:
            db.execute("CREATE TABLE bot_schema (version INTEGER NOT NULL)")
            db.execute("INSERT INTO bot_schema(version) VALUES (0)")
        # In the opening transaction: the schema and its version move together.
        for number in range(version, PG_SCHEMA_VERSION):
            db.execute(_MIGRATIONS[number].encode())
            db.execute("UPDATE bot_schema SET version = %s", (number + 1,))

    def _load(self, db: Connection) -> None:
        row = db.execute("SELECT value FROM meta WHERE key = 'sync_token'").fetchone()
        self._sync_token = SyncToken(row[0]) if row else None
        # What is in the inbox now is `pending`'s; `commit_sync_batch` hands out the rest.
        row = db.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()
        self._handed_out = int(row[0]) if row else 0
        self._chats_by_room.clear()
        self._chats_by_id.clear()
        for chat in self._select_chats(db):
            self._remember(chat)
        self._spaces = {
            owner: RoomID(room_id)
            for owner, room_id in db.execute("SELECT owner, room_id FROM spaces")
        }
        self._encrypted_rooms = {
            RoomID(room_id): content
            for room_id, content in db.execute("SELECT room_id, content FROM encrypted_rooms")
        }

    @staticmethod
    def _select_chats(db: Connection) -> list[Chat]:
        return chats_from_rows(db.execute(SELECT_CHATS).fetchall())

    # --- lifetime -------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the connection, which lets go of the store's lock."""
        self._closed = True
        async with self._calls:  # after a call in progress, never during it
            await trio.to_thread.run_sync(self._disconnect)

    def _disconnect(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()

    async def checkpoint_every(self, interval_s: float) -> NoReturn:
        """Nothing to do: the server checkpoints its own log (`bot.store`'s SQLite
        store copies its log here). Sleeps, so the runtime's task is the same."""
        await trio.sleep_forever()

    @property
    def deposed(self) -> bool:
        """Whether another bot took this store over (every call is `StoreDeposed`)."""
        return self._deposed

    async def check_lease(self) -> None:
        """One round trip on the store's connection: returns while this store still
        holds the lock; `StoreDeposed` once another bot took the store over (found
        here at the latest one keepalive bound after the connection was cut);
        `StoreUnavailable` when the server cannot tell now."""
        await self._run(lambda db: db.execute("SELECT 1").fetchone())

    async def lock_holder(self) -> tuple[int, str | None, str | None] | None:
        """The server process holding the store's lock, that session's client address,
        and the host and process id of the bot that opened the store (None: nobody
        holds it). Asked on a connection of its own, without taking the lock."""
        return await trio.to_thread.run_sync(self._lock_holder_sync, limiter=self._thread)

    def _lock_holder_sync(self) -> tuple[int, str | None, str | None] | None:
        try:
            with psycopg.connect(self._conninfo(), autocommit=True) as db:
                row = db.execute(_HOLDER_SESSION).fetchone()
                if row is None:
                    return None
                opener = db.execute(
                    "SELECT value FROM meta WHERE key = 'holder_process'"
                ).fetchone()
        except psycopg.Error as exc:
            raise StoreUnavailable(f"{self.where}: cannot ask: {exc}") from exc
        pid, address, _name = row
        return int(pid), None if address is None else str(address), opener[0] if opener else None

    async def wait_for_change(self) -> None:
        """Return after the next store call ends (it may have written something)."""
        await self._watchers.park()

    async def _run(
        self, fn: Callable[[Connection], T], then: Callable[[T], None] | None = None
    ) -> T:
        """Run ``fn`` on the connection in a worker thread, calls one at a time; then,
        once it succeeded, ``then`` (the in-memory maps kept in step) on the trio
        thread, still in turn: the maps change in the order the writes committed.

        A cancellation lands while waiting for the lock or not at all: once ``fn`` has
        started, its caller sees its result. The errors are mapped here, once:
        StoreUnavailable for what may pass, StoreError after `aclose`; anything else
        (a bug, a value the driver cannot send) is raised as it is.
        """
        try:
            async with self._calls:
                if self._closed:
                    raise StoreError(f"{self.where}: the store is closed")
                if self._deposed:
                    raise StoreDeposed(
                        f"{self.where}: taken over (held by another bot since this one's "
                        "connection was lost); this one writes nothing more"
                    )
                result = await trio.to_thread.run_sync(self._call, fn, limiter=self._thread)
                if then is not None:
                    then(result)
                return result
        finally:
            if self._watchers:
                self._watchers.unpark_all()

    def _call(self, fn: Callable[[Connection], T]) -> T:
        try:
            db = self._db
            if db is None or db.closed or db.broken:
                try:
                    db = self._reconnect()
                except _StoreHeld as exc:
                    raise StoreUnavailable(
                        f"{self.where}: the connection was lost and the store is now {exc}"
                    ) from exc
            return fn(db)
        except _InDoubt as doubt:
            if self._committed(doubt.xid):
                return doubt.result  # type: ignore[return-value]
            raise StoreUnavailable(
                f"{self.where}: the connection was lost at commit: {doubt.__cause__}"
            ) from doubt.__cause__
        except psycopg.Error as exc:
            if _is_transient(exc):
                if self._db is not None and (self._db.broken or self._db.closed):
                    self._disconnect()
                raise StoreUnavailable(f"{self.where}: {exc}") from exc
            raise

    def _committed(self, xid: str) -> bool:
        """Whether transaction ``xid``, whose COMMIT lost its answer, committed: asked
        on a new connection (which takes the store's lock again)."""
        try:
            db = self._reconnect()
            deadline = time.monotonic() + _IN_DOUBT_WAIT_S
            while True:
                row = db.execute("SELECT pg_xact_status(%s::xid8)", (xid,)).fetchone()
                status = row[0] if row else None
                if status != "in progress" or time.monotonic() >= deadline:
                    log.warning("store_commit_in_doubt", store=self.where, status=status)
                    return status == "committed"
                time.sleep(0.05)
        except (psycopg.Error, StoreError, _StoreHeld):
            # Not known: reported as not committed, the caller's "nothing changed".
            # The store's rules make that safe to retry (each write is idempotent
            # or re-finds what it wrote).
            self._disconnect()
            return False

    def _transaction(self, body: Callable[[Connection], T]) -> Callable[[Connection], T]:
        def run(db: Connection) -> T:
            finished = False
            xid = ""
            try:
                # In a pipeline the statements go out together, and a result is waited
                # for only when it is read: a transaction costs two round trips (its
                # statements, then COMMIT), not one per statement plus BEGIN. Measured
                # on loopback (bench/store.py) the pipeline costs about 0.3 ms more CPU
                # per message; it wins once the server is 0.15 ms or more away.
                with db.pipeline(), db.transaction():
                    asked = db.execute("SELECT pg_current_xact_id()::text")
                    result = body(db)
                    row = asked.fetchone()
                    xid = row[0] if row else ""
                    finished = True
            except psycopg.OperationalError as exc:
                if finished and xid and _is_transient(exc):
                    raise _InDoubt(xid, result) from exc
                raise
            return result

        return run

    # --- meta -----------------------------------------------------------------------

    async def get_meta(self, key: str) -> str | None:
        def read(db: Connection) -> str | None:
            row = db.execute("SELECT value FROM meta WHERE key = %s", (key,)).fetchone()
            return row[0] if row else None

        return await self._run(read)

    async def set_meta(self, key: str, value: str) -> None:
        await self._run(self._transaction(lambda db: _put_meta(db, key, value)))

    # --- chats ----------------------------------------------------------------------

    async def apply_chats(self, put: Sequence[Chat] = (), remove: Iterable[str] = ()) -> None:
        """Insert or replace ``put`` and delete the chats ``remove`` in one transaction.

        A chat replaces whatever held its chat id or its room before.
        """
        removed = list(remove)

        def write(db: Connection) -> None:
            for chat_id in removed:
                db.execute("DELETE FROM chats WHERE chat_id = %s", (chat_id,))
            for chat in put:
                # SQLite's INSERT OR REPLACE: whatever holds the id or the room goes.
                db.execute(
                    "DELETE FROM chats WHERE room_id = %s OR chat_id = %s",
                    (chat.room_id, chat.chat_id),
                )
                db.execute(
                    "INSERT INTO chats(chat_id, room_id, owner, title, created_ts, archived,"
                    " space_id, successor, settings) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    (
                        chat.chat_id,
                        chat.room_id,
                        chat.owner,
                        chat.title,
                        chat.created_ts,
                        chat.archived,
                        chat.space_id,
                        chat.successor,
                        msgspec.json.encode(chat.settings).decode(),
                    ),
                )

        def remember(_: None) -> None:
            for chat_id in removed:
                self._forget(chat_id)
            for chat in put:
                self._remember(chat)

        await self._run(self._transaction(write), remember)

    # --- spaces ---------------------------------------------------------------------

    async def apply_spaces(
        self, put: dict[str, RoomID] | None = None, remove: Iterable[str] = ()
    ) -> None:
        """Record each owner's Space in ``put`` and forget those of ``remove``."""
        put = put or {}
        removed = list(remove)

        def write(db: Connection) -> None:
            for owner in removed:
                db.execute("DELETE FROM spaces WHERE owner = %s", (owner,))
            for owner, room_id in put.items():
                db.execute("DELETE FROM spaces WHERE room_id = %s OR owner = %s", (room_id, owner))
                db.execute("INSERT INTO spaces(owner, room_id) VALUES (%s, %s)", (owner, room_id))

        await self._run(self._transaction(write), lambda _: self._remember_spaces(put, removed))

    # --- the inbox ------------------------------------------------------------------

    async def commit_sync_batch(
        self,
        next_token: SyncToken,
        items: Sequence[NewInboxItem],
        quarantined: Sequence[Quarantined] = (),
        *,
        crypto: Sequence[CryptoRow] = (),
        encryption: Mapping[RoomID, str] | None = None,
    ) -> list[InboxItem]:
        """Take a batch's events into the inbox and advance the sync token, atomically
        (`bot.store.Store.commit_sync_batch`: the same rules, redactions included)."""
        encryption = encryption or {}
        redacted: set[int] = set()

        def write(db: Connection) -> list[InboxItem]:
            fresh: list[InboxItem] = []
            received = _now_ms()
            redacted.clear()  # a transaction tried again starts over
            _write_crypto(db, crypto)
            _write_encryption(db, encryption)
            for entry in quarantined:
                _record_quarantined(db, entry, received)
            inserted: list[tuple[NewInboxItem, psycopg.Cursor[tuple[Any, ...]]]] = []
            redactions = [item for item in items if item.kind == "redaction"]
            for item in items:
                if item.kind == "redaction":
                    continue
                try:
                    encoded = msgspec.json.encode(item.event)
                except (TypeError, ValueError, RecursionError) as exc:
                    reason = f"cannot be stored: {type(exc).__name__}"
                    _record_quarantined(
                        db, Quarantined(item.event_id, item.room_id, reason), received
                    )
                    log_quarantined(item.room_id, item.event_id, item.event.sender, reason)
                    continue
                # An event pending or handled already has its row: ignored.
                cursor = db.execute(
                    "INSERT INTO events(event_id, room_id, kind, event, received_ts)"
                    " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (event_id) DO NOTHING"
                    " RETURNING seq",
                    (item.event_id, item.room_id, item.kind, encoded, received),
                )
                inserted.append((item, cursor))
            _put_meta(db, "sync_token", next_token)
            # Read after all are sent (one round trip in the transaction's pipeline).
            taken: dict[str, NewInboxItem] = {}
            for item, cursor in inserted:
                row = cursor.fetchone()
                if row is not None:
                    fresh.append(
                        InboxItem(row[0], item.event_id, item.room_id, item.kind, item.event)
                    )
                    taken[item.event_id] = item
            if len(taken) < len(inserted):
                fresh += self._never_handed_out(db, inserted, taken)
            if redactions:
                fresh = self._apply_redactions(db, redactions, fresh, redacted, received)
            return sorted(fresh, key=lambda pending: pending.seq)

        def remember(fresh: list[InboxItem]) -> None:
            self._sync_token = next_token
            self._encrypted_rooms.update(encryption)
            self._redacted |= redacted
            if fresh:
                self._handed_out = max(self._handed_out, fresh[-1].seq)

        return await self._run(self._transaction(write), remember)

    def _apply_redactions(
        self,
        db: Connection,
        redactions: Sequence[NewInboxItem],
        fresh: list[InboxItem],
        redacted: set[int],
        received: int,
    ) -> list[InboxItem]:
        """`commit_sync_batch`'s redactions (`bot.store.Store._apply_redactions`): the
        targets are read in one round trip, then each is applied in order."""
        targets: dict[str, RedactionTarget] = {
            event_id: RedactionTarget(seq, room_id, kind, event, outcome, reply)
            for seq, event_id, room_id, kind, event, outcome, reply in db.execute(
                "SELECT seq, event_id, room_id, kind, event, outcome, reply_event_id"
                " FROM events WHERE event_id = ANY(%s)",
                ([redaction_target(item) for item in redactions],),
            )
        }
        in_batch = {item.seq for item in fresh}
        dropped: set[int] = set()
        applied = forgotten = unknown = 0
        for item in redactions:
            target_id = redaction_target(item)
            target = targets.get(target_id)
            action = redaction_action(target, item.room_id)
            if action == "unknown" or target is None:
                unknown += 1
                continue
            waits = redaction_waits(action, target)
            row = db.execute(
                "INSERT INTO events(event_id, room_id, kind, event, received_ts, outcome,"
                " handled_ts) VALUES (%s, %s, 'redaction', %s, %s, %s, %s)"
                " ON CONFLICT (event_id) DO NOTHING RETURNING seq",
                (
                    item.event_id,
                    item.room_id,
                    msgspec.json.encode(item.event) if waits else None,
                    received,
                    None if waits else "ignored",
                    None if waits else received,
                ),
            ).fetchone()
            if row is None:
                continue  # a redaction seen before: applied then
            applied += 1
            if action == "pending":
                forgotten += 1
                _record_handled(db, target.seq, "redacted", None)
                (dropped if target.seq in in_batch else redacted).add(target.seq)
                # A second redaction of it in this batch finds it handled.
                targets[target_id] = RedactionTarget(
                    target.seq, target.room_id, target.kind, None, "redacted", None
                )
            chat = self._chats_by_room.get(RoomID(target.room_id))
            if chat is not None:
                # Whichever of the chat's conversations (threads) holds them.
                db.execute(
                    "DELETE FROM turns WHERE chat_id = %s AND event_id = %s",
                    (chat.chat_id, target_id),
                )
            if waits:
                fresh.append(InboxItem(row[0], item.event_id, item.room_id, item.kind, item.event))
        log_redactions(applied, forgotten, unknown)
        return [item for item in fresh if item.seq not in dropped]

    def is_redacted(self, item: InboxItem) -> bool:
        """Whether ``item``, handed out pending, has been redacted since (no I/O)."""
        return item.seq in self._redacted

    def _never_handed_out(
        self,
        db: Connection,
        inserted: Sequence[tuple[NewInboxItem, Any]],
        taken: Mapping[str, NewInboxItem],
    ) -> list[InboxItem]:
        """The batch's events already pending that this store never returned: taken
        in by a commit whose answer was lost and could not be looked up (reported as
        failed, so the same batch comes again). Without this they would wait in the
        inbox for the next start."""
        others = {item.event_id: item for item, _ in inserted if item.event_id not in taken}
        rows = db.execute(
            "SELECT seq, event_id FROM events"
            " WHERE event_id = ANY(%s) AND outcome IS NULL AND seq > %s",
            (list(others), self._handed_out),
        ).fetchall()
        return [
            InboxItem(seq, others[event_id].event_id, others[event_id].room_id,
                      others[event_id].kind, others[event_id].event)
            for seq, event_id in rows
            if event_id in others
        ]  # fmt: skip

    # --- end-to-end encryption --------------------------------------------------------

    async def set_room_encryption(self, rooms: Mapping[RoomID, str]) -> None:
        if not rooms:
            return
        await self._run(
            self._transaction(lambda db: _write_encryption(db, rooms)),
            lambda _: self._encrypted_rooms.update(rooms),
        )

    async def apply_crypto(self, rows: Sequence[CryptoRow]) -> None:
        """Write the crypto layer's changes (one transaction)."""
        if rows:
            await self._run(self._transaction(lambda db: _write_crypto(db, rows)))

    async def crypto_rows(self) -> list[tuple[str, str, str]]:
        """The crypto layer's whole state, as it was written."""

        def read(db: Connection) -> list[tuple[str, str, str]]:
            return [
                (kind, key, value)
                for kind, key, value in db.execute("SELECT kind, key, value FROM crypto")
            ]

        return await self._run(read)

    async def pending(self) -> list[InboxItem]:
        """Everything still in the inbox, oldest first (read once, at start-up); a
        stored event that no longer reads is quarantined."""

        def read(db: Connection) -> tuple[list[InboxItem], list[tuple[int, str]]]:
            return pending_from_rows(db.execute(SELECT_PENDING).fetchall())

        items, unreadable = await self._run(read)
        if unreadable:

            def write(db: Connection) -> None:
                for seq, reason in unreadable:
                    _record_handled(db, seq, "quarantined", None, reason)

            await self._run(self._transaction(write))
        return items

    async def finish(
        self,
        item: InboxItem,
        outcome: Outcome,
        reply_event_id: EventID | None = None,
        *,
        reason: str | None = None,
    ) -> None:
        """Record ``item`` as handled and take it out of the inbox, atomically.

        ``reason``: why it failed or was quarantined (never its content).
        """
        await self._run(
            self._transaction(
                lambda db: _record_handled(db, item.seq, outcome, reply_event_id, reason)
            ),
            lambda _: self._redacted.discard(item.seq),
        )

    async def finish_with_turns(
        self,
        item: InboxItem,
        outcome: Outcome,
        reply_event_id: EventID | None,
        chat_id: str,
        turns: Sequence[tuple[str, str]],
        *,
        thread: str | None = None,
    ) -> None:
        """`finish` and append ``turns`` (role, content) to the conversation of the
        chat's ``thread`` (None: its main timeline; see `bot.store.thread_key`), in
        one transaction: a crash never records the answer twice or loses it. An item
        already finished (a retry after a commit whose answer was lost and could not
        be looked up, or redacted while it was answered) appends nothing. The turns
        carry the item's event id."""
        key = thread_key(thread)

        def write(db: Connection) -> None:
            pending = db.execute(
                "SELECT 1 FROM events WHERE seq = %s AND outcome IS NULL", (item.seq,)
            ).fetchone()
            _record_handled(db, item.seq, outcome, reply_event_id)
            if pending is not None:
                _append_turns(db, chat_id, key, turns, [item.event_id] * len(turns))

        await self._run(self._transaction(write), lambda _: self._redacted.discard(item.seq))

    async def answer_to(self, event_id: str) -> EventID | None:
        """The bot's answer to ``event_id`` (its first event), if it sent one."""

        def read(db: Connection) -> EventID | None:
            row = db.execute(
                "SELECT reply_event_id FROM events WHERE event_id = %s"
                " AND outcome IN ('replied', 'redacted')",
                (event_id,),
            ).fetchone()
            return EventID(row[0]) if row and row[0] else None

        return await self._run(read)

    async def set_started_reply(self, item: InboxItem, reply_event_id: EventID) -> None:
        """Remember the reply being streamed for ``item``, for a re-run to complete."""

        def write(db: Connection) -> None:
            db.execute(
                "UPDATE events SET reply_event_id = %s WHERE seq = %s AND outcome IS NULL",
                (reply_event_id, item.seq),
            )

        await self._run(self._transaction(write))

    async def started_reply(self, item: InboxItem) -> EventID | None:
        def read(db: Connection) -> EventID | None:
            row = db.execute(
                "SELECT reply_event_id FROM events WHERE seq = %s AND outcome IS NULL",
                (item.seq,),
            ).fetchone()
            return EventID(row[0]) if row and row[0] else None

        return await self._run(read)

    async def set_provisioned(self, event_id: str, made: Provisioned) -> None:
        """Remember what handling ``event_id`` made, so that a re-run after a crash
        finishes it instead of making another. Forgotten with the inbox item."""

        def write(db: Connection) -> None:
            db.execute(
                "UPDATE events SET provisioned = %s WHERE event_id = %s AND outcome IS NULL",
                (msgspec.json.encode(made).decode(), event_id),
            )

        await self._run(self._transaction(write))

    async def provisioned(self, event_id: str) -> Provisioned:
        """What `set_provisioned` recorded for ``event_id`` while it is in the inbox."""

        def read(db: Connection) -> Provisioned:
            row = db.execute(
                "SELECT provisioned FROM events WHERE event_id = %s AND outcome IS NULL",
                (event_id,),
            ).fetchone()
            return _provisioned_decoder.decode(row[0]) if row and row[0] else Provisioned()

        return await self._run(read)

    # --- conversations ----------------------------------------------------------------

    async def conversation(
        self, chat_id: str, *, thread: str | None = None
    ) -> list[tuple[str, str]] | None:
        """The turns (role, content) of the chat's ``thread`` (None: the main
        timeline), oldest first; None when the store has never held that conversation
        (`bot.store.Store.conversation`)."""
        key = thread_key(thread)

        def read(db: Connection) -> list[tuple[str, str]] | None:
            known = db.execute(
                "SELECT 1 FROM contexts WHERE chat_id = %s AND thread = %s", (chat_id, key)
            ).fetchone()
            if not known:
                return None
            rows = db.execute(
                "SELECT role, content FROM turns WHERE chat_id = %s AND thread = %s ORDER BY seq",
                (chat_id, key),
            ).fetchall()
            return [(role, content) for role, content in rows]

        return await self._run(read)

    async def replace_conversation(
        self,
        chat_id: str,
        turns: Sequence[tuple[str, str]],
        event_ids: Sequence[str | None] = (),
        *,
        thread: str | None = None,
    ) -> None:
        """Set the whole conversation of the chat's ``thread`` (None: the main
        timeline), after a rebuild, or empty for ``!forget``; the chat's other
        conversations stay as they are."""
        key = thread_key(thread)

        def write(db: Connection) -> None:
            db.execute("DELETE FROM turns WHERE chat_id = %s AND thread = %s", (chat_id, key))
            _append_turns(db, chat_id, key, turns, event_ids)

        await self._run(self._transaction(write))

    async def discard(self, item: InboxItem) -> None:
        """Take ``item`` out of the inbox without recording it (invites: the server
        shows a pending invite again at every full sync, so none is lost)."""

        def write(db: Connection) -> None:
            db.execute("DELETE FROM events WHERE seq = %s AND outcome IS NULL", (item.seq,))

        await self._run(self._transaction(write))

    async def count_resumption(self, item: InboxItem) -> int:
        """Note that this run takes up ``item``, which an earlier run left unfinished;
        returns how many runs have done so, this one included."""

        def write(db: Connection) -> int:
            row = db.execute(
                "UPDATE events SET attempts = attempts + 1 WHERE seq = %s AND outcome IS NULL"
                " RETURNING attempts",
                (item.seq,),
            ).fetchone()
            return int(row[0]) if row else 0

        return await self._run(self._transaction(write))

    async def handled_outcome(self, event_id: str) -> str | None:
        def read(db: Connection) -> str | None:
            row = db.execute(
                "SELECT outcome FROM events WHERE event_id = %s", (event_id,)
            ).fetchone()
            return row[0] if row else None

        return await self._run(read)

    async def quarantined(self) -> dict[str, str]:
        """The quarantined events still remembered, by event id, with their reasons."""

        def read(db: Connection) -> dict[str, str]:
            rows = db.execute(
                "SELECT event_id, reason FROM events WHERE outcome = 'quarantined'"
            ).fetchall()
            return {event_id: reason or "" for event_id, reason in rows}

        return await self._run(read)

    async def counts(self) -> dict[str, int]:
        """How many chats, Spaces, encrypted rooms, pending and handled events the
        store holds (for diagnostics and tests)."""

        def read(db: Connection) -> dict[str, int]:
            row = db.execute(
                "SELECT (SELECT count(*) FROM chats), (SELECT count(*) FROM spaces),"
                " (SELECT count(*) FROM encrypted_rooms),"
                " count(*) - count(outcome), count(outcome) FROM events"
            ).fetchone()
            assert row is not None  # an aggregate always has its row
            chats, spaces, encrypted, inbox, handled = row
            return {
                "chats": chats,
                "inbox": inbox,
                "handled": handled,
                "spaces": spaces,
                "encrypted_rooms": encrypted,
            }

        return await self._run(read)


def _put_meta_if_absent(db: Connection, key: str, value: str) -> None:
    db.execute(
        "INSERT INTO meta(key, value) VALUES (%s, %s) ON CONFLICT (key) DO NOTHING", (key, value)
    )


def _append_turns(
    db: Connection,
    chat_id: str,
    thread: str,
    turns: Sequence[tuple[str, str]],
    event_ids: Sequence[str | None] = (),
) -> None:
    """Append ``turns`` to the conversation of (``chat_id``, ``thread``, a
    `bot.store.thread_key`), which the store now holds."""
    ids = [*event_ids, *[None] * (len(turns) - len(event_ids))]
    for (role, content), event_id in zip(turns, ids, strict=False):
        db.execute(
            "INSERT INTO turns(chat_id, thread, role, content, event_id)"
            " VALUES (%s, %s, %s, %s, %s)",
            (chat_id, thread, role, content, event_id),
        )
    db.execute(
        "INSERT INTO contexts(chat_id, thread) VALUES (%s, %s)"
        " ON CONFLICT (chat_id, thread) DO NOTHING",
        (chat_id, thread),
    )


if TYPE_CHECKING:
    # Both stores are what the runtime sees (checked by mypy, never run).
    def _conforms(sqlite: Store, postgres: PostgresStore) -> tuple[BotStore, BotStore]:
        return sqlite, postgres
