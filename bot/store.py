"""The local SQLite state: sync token, chats, the inbox, and what was handled.

The store is a cache of the server's chat markers plus what only the bot knows:
where it is in the sync stream and which events it has handled. The invariants
that make restarts safe live here:

* a sync batch's events enter the inbox in the same transaction that advances the
  sync token, so a crash can never skip events;
* an event leaves the inbox only in the transaction that records it as handled, so
  a crash re-handles it (and the reply's transaction id makes the re-send a no-op);
* an event already handled is never taken into the inbox again, whatever the
  server replays.

The inbox and the record of what was handled are one table, ``events``: a row per
event taken in, keyed by its id, pending while it has no ``outcome``. Recording an
event as handled sets its outcome, in place, which is the one write most messages
cost; the row is kept for a month to drop late deliveries.

One process at a time: the store is locked while it is open (`bot.store_lock`).
One connection, used on the trio thread. In WAL mode with ``synchronous=NORMAL`` a
commit writes to the log without waiting for the disk (a killed process loses
nothing; only a power cut may lose the last commits, all of a transaction or none),
so a call costs tens of microseconds: less than handing it to a worker thread and
back, which measured about 130 microseconds of CPU per call. What may take
milliseconds runs in a worker thread: opening (with its integrity check), and
copying the log into the database file (`Store.checkpoint_every`, on a connection of
its own), which SQLite would otherwise do inside whichever commit crossed its
threshold.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar

import msgspec
import structlog
import trio

from matrix_api.models import EventID, RoomEvent, RoomID, SyncToken

from .chats import Chat
from .file_modes import private_umask
from .messages import MAX_EVENT_ID
from .quarantine import log_quarantined
from .store_cache import SELECT_CHATS, StoreCache, chats_from_rows
from .store_lock import StoreLock, StoreLockHeld

__all__ = [
    "SCHEMA_VERSION",
    "SELECT_PENDING",
    "CryptoRow",
    "InboxItem",
    "Outcome",
    "Provisioned",
    "ProvisionedRoom",
    "Quarantined",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "pending_from_rows",
    "thread_key",
]

T = TypeVar("T")

# "quarantined": not handled, for a reason recorded with it (see `Quarantined`).
# "redacted": its sender deleted it before the bot answered (`Store.commit_sync_batch`).
Outcome = Literal["replied", "ignored", "failed", "notified", "quarantined", "redacted"]
# "redaction": an m.room.redaction of an event the store knows (see `redaction_item`).
InboxKind = Literal["message", "invite", "redaction"]
# One row of the crypto layer's state: (kind, key, value); a value of None deletes it.
CryptoRow = tuple[str, str, str | None]

log = structlog.get_logger("bot.store")

# SQLite's own checkpoint runs inside a commit once the log reaches this many pages
# (its default is 1,000); `Store.checkpoint_every` normally gets there first.
_AUTOCHECKPOINT_PAGES = 10_000

_MIGRATIONS: list[str] = [
    # 1: the first schema.
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE chats (
        chat_id    TEXT PRIMARY KEY,
        room_id    TEXT NOT NULL UNIQUE,
        owner      TEXT NOT NULL,
        title      TEXT NOT NULL,
        created_ts INTEGER NOT NULL,
        archived   INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE inbox (
        seq         INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id    TEXT NOT NULL UNIQUE,
        room_id     TEXT NOT NULL,
        kind        TEXT NOT NULL,
        event       BLOB NOT NULL,
        attempts    INTEGER NOT NULL DEFAULT 0,
        received_ts INTEGER NOT NULL
    );
    CREATE TABLE handled (
        event_id       TEXT PRIMARY KEY,
        room_id        TEXT NOT NULL,
        outcome        TEXT NOT NULL,
        reply_event_id TEXT,
        handled_ts     INTEGER NOT NULL
    );
    """,
    # 2: each user's Space, restored from its marker like the chats.
    """
    CREATE TABLE spaces (
        owner   TEXT PRIMARY KEY,
        room_id TEXT NOT NULL UNIQUE
    );
    """,
    # 3: a chat's Space, its successor, and its backend settings (JSON).
    """
    ALTER TABLE chats ADD COLUMN space_id TEXT;
    ALTER TABLE chats ADD COLUMN successor TEXT;
    ALTER TABLE chats ADD COLUMN settings TEXT NOT NULL DEFAULT '{}';
    """,
    # 4: each chat's conversation for the backend, and a streamed reply in progress.
    """
    CREATE TABLE turns (
        seq     INTEGER PRIMARY KEY AUTOINCREMENT,
        chat_id TEXT NOT NULL,
        role    TEXT NOT NULL,
        content TEXT NOT NULL
    );
    CREATE INDEX turns_by_chat ON turns(chat_id, seq);
    CREATE TABLE contexts (chat_id TEXT PRIMARY KEY);
    ALTER TABLE inbox ADD COLUMN reply_event_id TEXT;
    """,
    # 5: what handling an inbox item has made (a Space, a chat room), until it is finished.
    """
    ALTER TABLE inbox ADD COLUMN provisioned TEXT;
    """,
    # 6: inbox and handled become one table: an event is taken in once (its id is
    # unique, whatever the server replays) and finishing it updates its one row in
    # place. Deleting from one table and inserting into another wrote four b-trees
    # per handled message, about three times the CPU of the update.
    """
    CREATE TABLE events (
        seq            INTEGER PRIMARY KEY,
        event_id       TEXT NOT NULL UNIQUE,
        room_id        TEXT NOT NULL,
        kind           TEXT NOT NULL,
        event          BLOB,
        attempts       INTEGER NOT NULL DEFAULT 0,
        received_ts    INTEGER NOT NULL,
        reply_event_id TEXT,
        provisioned    TEXT,
        outcome        TEXT,
        handled_ts     INTEGER
    );
    INSERT INTO events(event_id, room_id, kind, received_ts, reply_event_id, outcome, handled_ts)
        SELECT event_id, room_id, 'message', handled_ts, reply_event_id, outcome, handled_ts
        FROM handled ORDER BY handled_ts;
    INSERT OR IGNORE INTO events(
        event_id, room_id, kind, event, attempts, received_ts, reply_event_id, provisioned
    )
        SELECT event_id, room_id, kind, event, attempts, received_ts, reply_event_id, provisioned
        FROM inbox ORDER BY seq;
    DROP TABLE inbox;
    DROP TABLE handled;
    """,
    # 7: why an event was quarantined (never its content).
    """
    ALTER TABLE events ADD COLUMN reason TEXT;
    """,
    # 8: end-to-end encryption: the crypto layer's state (its own kinds and keys; the
    # pickles in it are encrypted by the crypto layer), and the rooms that are
    # encrypted, with their m.room.encryption content.
    """
    CREATE TABLE crypto (
        kind  TEXT NOT NULL,
        key   TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (kind, key)
    ) WITHOUT ROWID;
    CREATE TABLE encrypted_rooms (room_id TEXT PRIMARY KEY, content TEXT NOT NULL);
    """,
    # 9: each turn names the message it came from (both turns of an exchange carry the
    # user's message's id), so a redaction of that message takes the exchange out.
    """
    ALTER TABLE turns ADD COLUMN event_id TEXT;
    """,
    # 10: a conversation per (chat, thread): a thread's root event id, or '' for the
    # chat's main timeline ('' and not NULL, so that it can be part of a primary key).
    # What a store held so far is the main timeline's.
    """
    ALTER TABLE turns ADD COLUMN thread TEXT NOT NULL DEFAULT '';
    DROP INDEX turns_by_chat;
    CREATE INDEX turns_by_conversation ON turns(chat_id, thread, seq);
    ALTER TABLE contexts RENAME TO contexts_by_chat;
    CREATE TABLE contexts (
        chat_id TEXT NOT NULL,
        thread  TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (chat_id, thread)
    ) WITHOUT ROWID;
    INSERT INTO contexts(chat_id, thread) SELECT chat_id, '' FROM contexts_by_chat;
    DROP TABLE contexts_by_chat;
    """,
]
SCHEMA_VERSION = len(_MIGRATIONS)
# The tables a store of each schema version must have, to tell ours from others'.
_TABLES_BY_VERSION = {
    1: frozenset({"meta", "chats", "inbox", "handled"}),
    2: frozenset({"meta", "chats", "inbox", "handled", "spaces"}),
    3: frozenset({"meta", "chats", "inbox", "handled", "spaces"}),
    4: frozenset({"meta", "chats", "inbox", "handled", "spaces", "turns", "contexts"}),
    5: frozenset({"meta", "chats", "inbox", "handled", "spaces", "turns", "contexts"}),
    6: frozenset({"meta", "chats", "events", "spaces", "turns", "contexts"}),
    7: frozenset({"meta", "chats", "events", "spaces", "turns", "contexts"}),
    8: frozenset(
        {"meta", "chats", "events", "spaces", "turns", "contexts", "crypto", "encrypted_rooms"}
    ),
    9: frozenset(
        {"meta", "chats", "events", "spaces", "turns", "contexts", "crypto", "encrypted_rooms"}
    ),
    10: frozenset(
        {"meta", "chats", "events", "spaces", "turns", "contexts", "crypto", "encrypted_rooms"}
    ),
}

HANDLED_KEEP_MS = 30 * 24 * 3600 * 1000
# A thread's key is its root's event id.
MAX_THREAD_ID = MAX_EVENT_ID
_event_decoder = msgspec.json.Decoder(RoomEvent)


class StoreError(Exception):
    """The store cannot be used: at open, a file that is corrupt, foreign, from a
    newer bot or held by another bot (left exactly as it was found)."""


class StoreUnavailable(StoreError):
    """A read or write the store could not do for now (the disk full, an I/O error,
    the file made read-only): nothing changed, and the same call may work later."""


# SQLite's primary result codes for a store that may work again unchanged:
# BUSY, LOCKED, NOMEM, READONLY, IOERR, FULL, CANTOPEN.
_TRANSIENT_SQLITE_CODES = frozenset({5, 6, 7, 8, 10, 13, 14})


@dataclass(frozen=True, slots=True)
class InboxItem:
    """An event waiting to be handled; ``seq`` orders the inbox.

    ``attempts``: how many runs of the bot took it up again after an earlier one
    left it unfinished (`Store.count_resumption`).
    """

    seq: int
    event_id: EventID
    room_id: RoomID
    kind: InboxKind
    event: RoomEvent
    attempts: int = 0


class ProvisionedRoom(msgspec.Struct, frozen=True):
    """A chat room made for an inbox item, and the identity its chat was given."""

    room_id: RoomID
    chat_id: str
    created_ts: int


class Provisioned(msgspec.Struct, frozen=True, omit_defaults=True):
    """What handling one inbox item has made on the server so far."""

    space_id: RoomID | None = None
    room: ProvisionedRoom | None = None


_provisioned_decoder = msgspec.json.Decoder(Provisioned)


# The inbox, oldest first, in the column order `pending_from_rows` reads (both stores).
SELECT_PENDING = (
    "SELECT seq, event_id, room_id, kind, event, attempts FROM events"
    " WHERE outcome IS NULL ORDER BY seq"
)


def pending_from_rows(
    rows: Iterable[Sequence[Any]],
) -> tuple[list[InboxItem], list[tuple[int, str]]]:
    """The inbox items of `SELECT_PENDING` rows, and (seq, reason) of each stored event
    that no longer reads (an older bot's, or damaged: one row must not stop the start;
    the caller quarantines them)."""
    items: list[InboxItem] = []
    unreadable: list[tuple[int, str]] = []
    for seq, event_id, room_id, kind, event, attempts in rows:
        try:
            decoded = _event_decoder.decode(event)
        except (msgspec.DecodeError, RecursionError, TypeError) as exc:
            unreadable.append((seq, f"stored event unreadable: {type(exc).__name__}"))
            log_quarantined(room_id, event_id, None, unreadable[-1][1])
            continue
        items.append(InboxItem(seq, EventID(event_id), RoomID(room_id), kind, decoded, attempts))
    return items, unreadable


@dataclass(frozen=True, slots=True)
class NewInboxItem:
    event_id: EventID
    room_id: RoomID
    kind: InboxKind
    event: RoomEvent


@dataclass(frozen=True, slots=True)
class Quarantined:
    """An event the bot could not take in, and why: recorded as handled, so it is
    neither handled nor retried, and its id drops a later delivery."""

    event_id: str
    room_id: str
    reason: str
    sender: str | None = None  # for the log line; not stored


# What a redaction takes out of the inbox: the events the bot would answer.
_REDACTABLE_TYPES = frozenset({"m.room.message", "m.room.encrypted"})


class _Shape(msgspec.Struct):
    type: str = ""
    state_key: str | None = None


_shape_decoder = msgspec.json.Decoder(_Shape)


def thread_key(thread: str | None) -> str:
    """The stored key of a conversation's thread (both stores): ``thread`` (its root
    event id) as it is, and '' for None, the chat's main timeline.

    Raises ValueError, before anything is read or written, for what is no thread root's
    event id: '' (it would silently be the main timeline; pass None for that), one
    longer than an event id can be (`MAX_THREAD_ID` bytes; a 10,000-character key
    would not fit PostgreSQL's index), or a lone surrogate (no UTF-8 text). The
    caller (`bot.messages`) quarantines a message whose thread names no event id, so
    this never happens for a message the bot takes in. U+0000 is kept (in PostgreSQL
    as U+FFFD, like every other string: there ``$a\x00`` and ``$a\ufffd`` are one
    thread).
    """
    if thread is None:
        return ""
    if not isinstance(thread, str):
        raise TypeError(f"a thread is its root's event id (a str), not {type(thread).__name__}")
    if not thread:
        raise ValueError("'' is no thread; the main timeline is thread=None")
    try:
        size = len(thread.encode())
    except UnicodeEncodeError:
        raise ValueError("a thread's event id must be UTF-8 text") from None
    if size > MAX_THREAD_ID:
        raise ValueError(f"a thread's event id has at most {MAX_THREAD_ID} bytes, not {size}")
    return thread


def redaction_item(
    redaction_id: EventID, room_id: RoomID, sender: str, origin_server_ts: int, target: EventID
) -> NewInboxItem:
    """The inbox entry for an m.room.redaction of ``target``. Only the target's id is
    kept: the redaction's ``reason`` is the user's own words."""
    event = RoomEvent(
        type="m.room.redaction",
        event_id=redaction_id,
        sender=sender,  # type: ignore[arg-type]  # a user id from the event
        origin_server_ts=origin_server_ts,
        content={"redacts": target},
        room_id=room_id,
    )
    return NewInboxItem(redaction_id, room_id, "redaction", event)


def redaction_target(item: NewInboxItem | InboxItem) -> str:
    """The event a `redaction_item` redacts."""
    target = item.event.content.get("redacts")
    return target if isinstance(target, str) else ""


@dataclass(frozen=True, slots=True)
class RedactionTarget:
    """The stored row of a redaction's target."""

    seq: int
    room_id: str
    kind: str
    event: bytes | None
    outcome: str | None
    reply_event_id: str | None


RedactionAction = Literal["unknown", "pending", "handled"]


def redaction_action(target: RedactionTarget | None, room_id: str) -> RedactionAction:
    """What a redaction in ``room_id`` does to its stored ``target``.

    "unknown": nothing (an event the bot never took in: its own, a state event,
    another room's, an invite). "pending": the message leaves the inbox unanswered,
    recorded as "redacted", its body dropped. "handled": its turns leave the
    conversation; its outcome stays, so exactly-once still holds. The server
    accepted the redaction, so it is authorised (the sender, or a moderator).
    """
    if target is None or target.room_id != room_id or target.kind != "message":
        return "unknown"
    if target.outcome is not None:
        return "handled"
    if target.event is not None:
        try:
            shape = _shape_decoder.decode(target.event)
        except (msgspec.DecodeError, RecursionError, TypeError):
            return "pending"  # unreadable: it goes, as its sender wants
        if shape.type not in _REDACTABLE_TYPES or shape.state_key is not None:
            return "unknown"  # encryption turned on: a redaction does not undo it
    return "pending"


def redaction_waits(action: RedactionAction, target: RedactionTarget) -> bool:
    """Whether the redaction goes to its room's lane: the target's answer, sent or
    perhaps under way, may have to be redacted too (`bot.handler`)."""
    if action == "pending":
        return True
    return target.reply_event_id is not None and target.outcome in ("replied", "redacted")


def log_redactions(applied: int, forgotten: int, unknown: int) -> None:
    """One line per batch, whatever its size."""
    if applied or unknown:
        log.info("redactions_applied", applied=applied, unanswered=forgotten, unknown=unknown)


def _record_handled(
    db: sqlite3.Connection,
    seq: int,
    outcome: Outcome,
    reply_event_id: EventID | None,
    reason: str | None = None,
) -> bool:
    """Take inbox item ``seq`` out of the inbox and remember it as handled, in one
    statement; False when it was not pending.

    The event itself and what handling it made are no longer needed: only its id
    stays, to drop a later delivery. An item redacted meanwhile stays "redacted";
    only the id of a reply that went out anyway is added.
    """
    cursor = db.execute(
        "UPDATE events SET outcome = ?, reply_event_id = ?, handled_ts = ?, event = NULL,"
        " provisioned = NULL, reason = ? WHERE seq = ? AND outcome IS NULL",
        (outcome, reply_event_id, _now_ms(), reason, seq),
    )
    if cursor.rowcount:
        return True
    if reply_event_id is not None:
        db.execute(
            "UPDATE events SET reply_event_id = coalesce(reply_event_id, ?)"
            " WHERE seq = ? AND outcome = 'redacted'",
            (reply_event_id, seq),
        )
    return False


def _record_quarantined(db: sqlite3.Connection, entry: Quarantined, now: int) -> None:
    db.execute(
        "INSERT OR IGNORE INTO events(event_id, room_id, kind, received_ts, outcome, handled_ts,"
        " reason) VALUES (?, ?, 'message', ?, 'quarantined', ?, ?)",
        (entry.event_id, entry.room_id, now, now, entry.reason),
    )


def _write_crypto(db: sqlite3.Connection, rows: Sequence[CryptoRow]) -> None:
    for kind, key, value in rows:
        if value is None:
            db.execute("DELETE FROM crypto WHERE kind = ? AND key = ?", (kind, key))
        else:
            db.execute(
                "INSERT OR REPLACE INTO crypto(kind, key, value) VALUES (?, ?, ?)",
                (kind, key, value),
            )


def _write_encryption(db: sqlite3.Connection, rooms: Mapping[RoomID, str]) -> None:
    db.executemany(
        "INSERT OR REPLACE INTO encrypted_rooms(room_id, content) VALUES (?, ?)", rooms.items()
    )


def _now_ms() -> int:
    return int(time.time() * 1000)


class Store(StoreCache):
    """The bot's SQLite state; open with `Store.open`, close with `aclose`.

    Chats are also held in memory (loaded at open, kept in step with every write),
    so routing a message costs no I/O.
    """

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._db = connection
        self.path = path
        super().__init__()
        self._checkpointer: sqlite3.Connection | None = None
        self._lock: StoreLock | None = None
        self._watchers = trio.lowlevel.ParkingLot()
        # Items handed out pending that a redaction took out since (`is_redacted`);
        # one leaves the set when its handling finishes it.
        self._redacted: set[int] = set()

    # --- opening ------------------------------------------------------------------

    @classmethod
    async def open(cls, path: Path, user_id: str, *, lock_wait_s: float = 0.0) -> Store:
        """Open (creating and migrating as needed) the store of ``user_id`` at ``path``,
        held by this process until `aclose` (see `bot.store_lock`).

        Raises `StoreError` for a store another process holds (after waiting up to
        ``lock_wait_s`` for it to let go), a file that is not a SQLite database, has
        a schema newer than this code, or belongs to another Matrix user.
        """
        try:
            lock = await StoreLock.acquire(path, wait_s=lock_wait_s)
        except StoreLockHeld as exc:
            raise StoreError(
                f"{exc}: stop that bot first, or give this one a store of its own"
            ) from exc
        except OSError as exc:  # no such directory can be made, or no rights in it
            raise StoreError(f"{path}: cannot be used as the bot's store: {exc}") from exc
        try:
            store = await trio.to_thread.run_sync(cls._open_sync, path, user_id)
        except BaseException:
            lock.release()
            raise
        store._lock = lock
        return store

    @classmethod
    def _open_sync(cls, path: Path, user_id: str) -> Store:
        # The directory exists: taking the store's lock (in `open`) made it.
        existed = path.exists() and path.stat().st_size > 0
        try:
            # Read-only probe first: nothing is written to a file we may refuse.
            if existed:
                cls._check_without_leftovers(path, user_id)
            # A database SQLite creates here (at connect) is 0600 (bot.file_modes); its
            # -wal and -shm get the database file's mode from SQLite, whenever made.
            with private_umask():
                connection = sqlite3.connect(
                    path, check_same_thread=False, isolation_level=None, timeout=5.0
                )
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{path}: not a usable SQLite database: {exc}") from exc
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute("PRAGMA foreign_keys=ON")
            # What a redaction or a handled event drops is overwritten, not left in the
            # file's free space for anyone who reads the file (`commit_sync_batch`).
            connection.execute("PRAGMA secure_delete=ON")
            # A safety net only: `checkpoint_every` keeps the log far shorter.
            connection.execute(f"PRAGMA wal_autocheckpoint={_AUTOCHECKPOINT_PAGES}")
            cls._migrate(connection)
            store = cls(connection, path)
            store._load(user_id)
        except sqlite3.Error as exc:
            connection.close()
            raise StoreError(f"{path}: cannot be used as the bot's store: {exc}") from exc
        except BaseException:
            connection.close()
            raise
        return store

    @classmethod
    def _check_without_leftovers(cls, path: Path, user_id: str) -> None:
        """`_check_existing`, removing the WAL files the probe itself created when the
        file is refused: a refused store is left exactly as it was found."""
        sidecars = [Path(f"{path}{suffix}") for suffix in ("-wal", "-shm")]
        before = {sidecar for sidecar in sidecars if sidecar.exists()}
        try:
            cls._check_existing(path, user_id)
        except (StoreError, sqlite3.DatabaseError):
            for sidecar in sidecars:
                if sidecar not in before:
                    sidecar.unlink(missing_ok=True)
            raise

    @staticmethod
    def _check_existing(path: Path, user_id: str) -> None:
        # As a URI (escaped: a '#' or '?' in the path must not cut it short), read-only.
        probe = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            (version,) = probe.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{path}: schema version {version} is newer than this bot "
                    f"understands ({SCHEMA_VERSION}); upgrade the bot or use another store"
                )
            tables = {row[0] for row in probe.execute("SELECT name FROM sqlite_master")}
            if version == 0 and tables:
                raise StoreError(f"{path}: a SQLite file of something else, not a bot store")
            if version > 0:
                missing = _TABLES_BY_VERSION[version] - tables
                if missing:
                    raise StoreError(
                        f"{path}: not a bot store (no {', '.join(sorted(missing))} table)"
                    )
                row = probe.execute("SELECT value FROM meta WHERE key = 'user_id'").fetchone()
                if row is not None and row[0] != user_id:
                    raise StoreError(
                        f"{path}: this store belongs to {row[0]}, not {user_id}; "
                        "use another store_path"
                    )
            (check,) = probe.execute("PRAGMA quick_check").fetchone()
            if check != "ok":
                raise StoreError(f"{path}: database is corrupt: {check}")
        finally:
            probe.close()

    @staticmethod
    def _migrate(connection: sqlite3.Connection) -> None:
        (version,) = connection.execute("PRAGMA user_version").fetchone()
        for number in range(version, SCHEMA_VERSION):
            # One transaction per step: the schema and its version number move together.
            script = f"BEGIN;\n{_MIGRATIONS[number]}\nPRAGMA user_version = {number + 1};\nCOMMIT;"
            try:
                connection.executescript(script)
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise

    def _load(self, user_id: str) -> None:
        db = self._db

        def claim_and_prune(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('user_id', ?)", (user_id,))
            # Handled events are remembered to drop the server's replays and re-deliveries,
            # which come within minutes; a month keeps the table from growing forever.
            db.execute("DELETE FROM events WHERE handled_ts < ?", (_now_ms() - HANDLED_KEEP_MS,))

        self._transaction(claim_and_prune)()
        row = db.execute("SELECT value FROM meta WHERE key = 'sync_token'").fetchone()
        self._sync_token = SyncToken(row[0]) if row else None
        for chat in self._select_chats():
            self._remember(chat)
        for owner, room_id in db.execute("SELECT owner, room_id FROM spaces"):
            self._spaces[owner] = RoomID(room_id)
        for room_id, content in db.execute("SELECT room_id, content FROM encrypted_rooms"):
            self._encrypted_rooms[RoomID(room_id)] = content

    def _select_chats(self) -> list[Chat]:
        return chats_from_rows(self._db.execute(SELECT_CHATS))

    async def aclose(self) -> None:
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None:
            checkpointer.close()
        try:
            await self._run(self._db.close)
        finally:
            if self._lock is not None:
                self._lock.release()

    async def checkpoint_every(self, interval_s: float) -> NoReturn:
        """Copy the write-ahead log into the database file every ``interval_s``.

        Runs in a worker thread on a second connection, so commits on the trio
        thread never wait for it; a failure is logged and tried again next time.
        """
        while True:
            await trio.sleep(interval_s)
            try:
                await trio.to_thread.run_sync(self._checkpoint)
            except sqlite3.Error as exc:
                log.warning("store_checkpoint_failed", path=str(self.path), error=str(exc))

    def _checkpoint(self) -> None:
        if self._checkpointer is None:
            self._checkpointer = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=5.0
            )
        # PASSIVE: copies what no reader still needs, never blocks the writer.
        self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")

    async def _run(self, fn: Callable[[], T]) -> T:
        # A cancellation lands before the call or not at all: once ``fn`` has
        # committed, its caller sees the result (as with a worker thread). No
        # yield to the scheduler otherwise: that would cost more than most calls.
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF in _TRANSIENT_SQLITE_CODES:
                raise StoreUnavailable(f"{self.path}: {exc}") from exc
            raise
        finally:
            if self._watchers:
                self._watchers.unpark_all()

    async def wait_for_change(self) -> None:
        """Return after the next store call ends (it may have written something).

        For whatever wants to see the store move without polling it: look, and if
        what you want is not there yet, wait for this and look again (nothing runs
        between a look and this wait, on trio's one thread).
        """
        await self._watchers.park()

    def _transaction(self, body: Callable[[sqlite3.Connection], T]) -> Callable[[], T]:
        def run() -> T:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = body(self._db)
                self._db.execute("COMMIT")
            except BaseException:
                # A COMMIT that failed (the disk full) may leave the transaction
                # open, and every later BEGIN would fail: end it.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            return result

        return run

    # --- meta -----------------------------------------------------------------------

    async def get_meta(self, key: str) -> str | None:
        def read() -> str | None:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            return row[0] if row else None

        return await self._run(read)

    async def set_meta(self, key: str, value: str) -> None:
        def write(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

        await self._run(self._transaction(write))

    # --- chats ----------------------------------------------------------------------

    async def apply_chats(self, put: Sequence[Chat] = (), remove: Iterable[str] = ()) -> None:
        """Insert or replace ``put`` and delete the chats ``remove`` in one transaction.

        A chat replaces whatever held its chat id or its room before.
        """
        removed = list(remove)

        def write(db: sqlite3.Connection) -> None:
            db.executemany("DELETE FROM chats WHERE chat_id = ?", [(c,) for c in removed])
            for chat in put:
                db.execute(
                    "DELETE FROM chats WHERE room_id = ? AND chat_id != ?",
                    (chat.room_id, chat.chat_id),
                )
                db.execute(
                    "INSERT OR REPLACE INTO chats(chat_id, room_id, owner, title, created_ts,"
                    " archived, space_id, successor, settings)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        chat.chat_id,
                        chat.room_id,
                        chat.owner,
                        chat.title,
                        chat.created_ts,
                        int(chat.archived),
                        chat.space_id,
                        chat.successor,
                        msgspec.json.encode(chat.settings),
                    ),
                )

        await self._run(self._transaction(write))
        for chat_id in removed:
            self._forget(chat_id)
        for chat in put:
            self._remember(chat)

    # --- spaces ---------------------------------------------------------------------

    async def apply_spaces(
        self, put: dict[str, RoomID] | None = None, remove: Iterable[str] = ()
    ) -> None:
        """Record each owner's Space in ``put`` and forget those of ``remove``."""
        put = put or {}
        removed = list(remove)

        def write(db: sqlite3.Connection) -> None:
            db.executemany("DELETE FROM spaces WHERE owner = ?", [(o,) for o in removed])
            for owner, room_id in put.items():
                db.execute("DELETE FROM spaces WHERE room_id = ? AND owner != ?", (room_id, owner))
                db.execute(
                    "INSERT OR REPLACE INTO spaces(owner, room_id) VALUES (?, ?)", (owner, room_id)
                )

        await self._run(self._transaction(write))
        self._remember_spaces(put, removed)

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
        """Take a batch's events into the inbox and advance the sync token, atomically.

        Events already in the inbox or already handled are dropped (the server may
        deliver an event twice). ``quarantined`` events are recorded with their
        reason, as is an item that cannot be stored. Returns the items that are new.

        A ``redaction`` item (`redaction_item`) is applied here, after the batch's
        other events: a redacted message still pending (taken in earlier, or in this
        batch) is recorded as "redacted" with no body and is not returned; the turns
        of one already answered leave its conversation (whichever thread holds them).
        The redaction is returned (for its room's lane) only when an answer may have
        to be redacted too (`redaction_waits`); one of an event the store does not
        know is not kept.
        ``crypto`` (the crypto layer's changes from the batch's to-device events) and
        ``encryption`` (rooms whose encryption the batch turned on, with the content)
        are written in the same transaction: the server re-delivers to-device events
        until the token moves, so what they changed must be stored by then.
        """
        encryption = encryption or {}
        redacted: set[int] = set()

        def write(db: sqlite3.Connection) -> list[InboxItem]:
            fresh: list[InboxItem] = []
            received = _now_ms()
            _write_crypto(db, crypto)
            _write_encryption(db, encryption)
            for entry in quarantined:
                _record_quarantined(db, entry, received)
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
                    "INSERT OR IGNORE INTO events(event_id, room_id, kind, event, received_ts)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (item.event_id, item.room_id, item.kind, encoded, received),
                )
                if cursor.rowcount and cursor.lastrowid is not None:
                    fresh.append(
                        InboxItem(
                            cursor.lastrowid, item.event_id, item.room_id, item.kind, item.event
                        )
                    )
            if redactions:
                fresh = self._apply_redactions(db, redactions, fresh, redacted, received)
            db.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('sync_token', ?)", (next_token,)
            )
            return fresh

        fresh = await self._run(self._transaction(write))
        self._sync_token = next_token
        self._encrypted_rooms.update(encryption)
        self._redacted |= redacted
        return fresh

    def _apply_redactions(
        self,
        db: sqlite3.Connection,
        redactions: Sequence[NewInboxItem],
        fresh: list[InboxItem],
        redacted: set[int],
        received: int,
    ) -> list[InboxItem]:
        """`commit_sync_batch`'s redactions, in its transaction; returns ``fresh``
        without the messages redacted and with the redactions that wait. ``redacted``
        gets the items handed out earlier that are redacted now (`is_redacted`)."""
        in_batch = {item.seq for item in fresh}
        dropped: set[int] = set()
        applied = forgotten = unknown = 0
        for item in redactions:
            row = db.execute(
                "SELECT seq, room_id, kind, event, outcome, reply_event_id FROM events"
                " WHERE event_id = ?",
                (redaction_target(item),),
            ).fetchone()
            target = RedactionTarget(*row) if row is not None else None
            action = redaction_action(target, item.room_id)
            if action == "unknown" or target is None:
                unknown += 1
                continue
            waits = redaction_waits(action, target)
            cursor = db.execute(
                "INSERT OR IGNORE INTO events(event_id, room_id, kind, event, received_ts,"
                " outcome, handled_ts) VALUES (?, ?, 'redaction', ?, ?, ?, ?)",
                (
                    item.event_id,
                    item.room_id,
                    msgspec.json.encode(item.event) if waits else None,
                    received,
                    None if waits else "ignored",
                    None if waits else received,
                ),
            )
            if not cursor.rowcount:
                continue  # a redaction seen before: applied then
            applied += 1
            if action == "pending":
                forgotten += 1
                _record_handled(db, target.seq, "redacted", None)
                (dropped if target.seq in in_batch else redacted).add(target.seq)
            chat = self._chats_by_room.get(RoomID(target.room_id))
            if chat is not None:
                # Whichever of the chat's conversations (threads) holds them.
                db.execute(
                    "DELETE FROM turns WHERE chat_id = ? AND event_id = ?",
                    (chat.chat_id, redaction_target(item)),
                )
            if waits and cursor.lastrowid is not None:
                fresh.append(
                    InboxItem(cursor.lastrowid, item.event_id, item.room_id, item.kind, item.event)
                )
        log_redactions(applied, forgotten, unknown)
        return [item for item in fresh if item.seq not in dropped]

    def is_redacted(self, item: InboxItem) -> bool:
        """Whether ``item``, handed out pending, has been redacted since (no I/O): its
        handling stops where it is; the store already recorded it."""
        return item.seq in self._redacted

    # --- end-to-end encryption --------------------------------------------------------

    async def set_room_encryption(self, rooms: Mapping[RoomID, str]) -> None:
        if not rooms:
            return
        await self._run(self._transaction(lambda db: _write_encryption(db, rooms)))
        self._encrypted_rooms.update(rooms)

    async def apply_crypto(self, rows: Sequence[CryptoRow]) -> None:
        """Write the crypto layer's changes (one transaction)."""
        if rows:
            await self._run(self._transaction(lambda db: _write_crypto(db, rows)))

    async def crypto_rows(self) -> list[tuple[str, str, str]]:
        """The crypto layer's whole state, as it was written."""

        def read() -> list[tuple[str, str, str]]:
            return list(self._db.execute("SELECT kind, key, value FROM crypto"))

        return await self._run(read)

    async def pending(self) -> list[InboxItem]:
        """Everything still in the inbox, oldest first.

        Read once, at start-up. It scans the month of handled events too (about 15 ms
        per 100,000): an index of the pending ones would cost every message two more
        b-tree writes.
        """

        def read() -> tuple[list[InboxItem], list[tuple[int, str]]]:
            return pending_from_rows(self._db.execute(SELECT_PENDING).fetchall())

        items, unreadable = await self._run(read)
        if unreadable:

            def write(db: sqlite3.Connection) -> None:
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

        ``reason``: why it failed or was quarantined (never its content). An item
        redacted meanwhile stays "redacted" (see `_record_handled`).
        """
        # One statement is a transaction of its own (two for a redacted item's reply).
        await self._run(
            lambda: _record_handled(self._db, item.seq, outcome, reply_event_id, reason)
        )
        self._redacted.discard(item.seq)

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
        chat's ``thread`` (None: its main timeline; see `thread_key`), in one
        transaction: a crash never records the answer twice or loses it. The turns
        carry the item's event id (a redaction of it takes them out); an item no longer
        pending (redacted while it was answered) appends none."""
        key = thread_key(thread)

        def write(db: sqlite3.Connection) -> None:
            if not _record_handled(db, item.seq, outcome, reply_event_id):
                return
            db.executemany(
                "INSERT INTO turns(chat_id, thread, role, content, event_id)"
                " VALUES (?, ?, ?, ?, ?)",
                [(chat_id, key, role, content, item.event_id) for role, content in turns],
            )
            db.execute(
                "INSERT OR IGNORE INTO contexts(chat_id, thread) VALUES (?, ?)", (chat_id, key)
            )

        await self._run(self._transaction(write))
        self._redacted.discard(item.seq)

    async def answer_to(self, event_id: str) -> EventID | None:
        """The bot's answer to ``event_id`` (its first event), if it sent one: replied,
        or sent while the message was being redacted."""

        def read() -> EventID | None:
            row = self._db.execute(
                "SELECT reply_event_id FROM events WHERE event_id = ?"
                " AND outcome IN ('replied', 'redacted')",
                (event_id,),
            ).fetchone()
            return EventID(row[0]) if row and row[0] else None

        return await self._run(read)

    async def set_started_reply(self, item: InboxItem, reply_event_id: EventID) -> None:
        """Remember the reply being streamed for ``item``, for a re-run to complete."""

        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE events SET reply_event_id = ? WHERE seq = ? AND outcome IS NULL",
                (reply_event_id, item.seq),
            )

        await self._run(self._transaction(write))

    async def started_reply(self, item: InboxItem) -> EventID | None:
        def read() -> EventID | None:
            row = self._db.execute(
                "SELECT reply_event_id FROM events WHERE seq = ? AND outcome IS NULL",
                (item.seq,),
            ).fetchone()
            return EventID(row[0]) if row and row[0] else None

        return await self._run(read)

    async def set_provisioned(self, event_id: str, made: Provisioned) -> None:
        """Remember what handling ``event_id`` made, so that a re-run after a crash
        finishes it instead of making another (room creation has no transaction id).
        Forgotten with the inbox item."""

        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE events SET provisioned = ? WHERE event_id = ? AND outcome IS NULL",
                (msgspec.json.encode(made), event_id),
            )

        await self._run(self._transaction(write))

    async def provisioned(self, event_id: str) -> Provisioned:
        """What `set_provisioned` recorded for ``event_id`` while it is in the inbox."""

        def read() -> Provisioned:
            row = self._db.execute(
                "SELECT provisioned FROM events WHERE event_id = ? AND outcome IS NULL",
                (event_id,),
            ).fetchone()
            return _provisioned_decoder.decode(row[0]) if row and row[0] else Provisioned()

        return await self._run(read)

    # --- conversations ----------------------------------------------------------------

    async def conversation(
        self, chat_id: str, *, thread: str | None = None
    ) -> list[tuple[str, str]] | None:
        """The turns (role, content) of the chat's ``thread`` (its root event id; None:
        the main timeline, see `thread_key`), oldest first; None when the store has
        never held that conversation (rebuild it from the room). Each thread is a
        conversation of its own, and the main timeline another."""
        key = thread_key(thread)

        def read() -> list[tuple[str, str]] | None:
            known = self._db.execute(
                "SELECT 1 FROM contexts WHERE chat_id = ? AND thread = ?", (chat_id, key)
            ).fetchone()
            if not known:
                return None
            rows = self._db.execute(
                "SELECT role, content FROM turns WHERE chat_id = ? AND thread = ? ORDER BY seq",
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
        conversations stay as they are.

        ``event_ids``: the message each turn came from, when known (a rebuild knows).
        """
        key = thread_key(thread)
        ids = [*event_ids, *[None] * (len(turns) - len(event_ids))]

        def write(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM turns WHERE chat_id = ? AND thread = ?", (chat_id, key))
            db.executemany(
                "INSERT INTO turns(chat_id, thread, role, content, event_id)"
                " VALUES (?, ?, ?, ?, ?)",
                [
                    (chat_id, key, role, content, event_id)
                    for (role, content), event_id in zip(turns, ids, strict=False)
                ],
            )
            db.execute(
                "INSERT OR IGNORE INTO contexts(chat_id, thread) VALUES (?, ?)", (chat_id, key)
            )

        await self._run(self._transaction(write))

    async def discard(self, item: InboxItem) -> None:
        """Take ``item`` out of the inbox without recording it (invites: the server
        shows a pending invite again at every full sync, so none is lost)."""

        def write(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM events WHERE seq = ? AND outcome IS NULL", (item.seq,))

        await self._run(self._transaction(write))
        self._redacted.discard(item.seq)

    async def count_resumption(self, item: InboxItem) -> int:
        """Note that this run takes up ``item``, which an earlier run left unfinished;
        returns how many runs have done so, this one included."""

        def write(db: sqlite3.Connection) -> int:
            db.execute(
                "UPDATE events SET attempts = attempts + 1 WHERE seq = ? AND outcome IS NULL",
                (item.seq,),
            )
            row = db.execute(
                "SELECT attempts FROM events WHERE seq = ? AND outcome IS NULL", (item.seq,)
            ).fetchone()
            return int(row[0]) if row else 0

        return await self._run(self._transaction(write))

    async def handled_outcome(self, event_id: str) -> str | None:
        def read() -> str | None:
            row = self._db.execute(
                "SELECT outcome FROM events WHERE event_id = ?", (event_id,)
            ).fetchone()
            return row[0] if row else None

        return await self._run(read)

    async def quarantined(self) -> dict[str, str]:
        """The quarantined events still remembered, by event id, with their reasons."""

        def read() -> dict[str, str]:
            rows = self._db.execute(
                "SELECT event_id, reason FROM events WHERE outcome = 'quarantined'"
            ).fetchall()
            return {event_id: reason or "" for event_id, reason in rows}

        return await self._run(read)

    async def counts(self) -> dict[str, int]:
        """How many chats, Spaces, encrypted rooms, pending and handled events the
        store holds (for diagnostics and tests)."""

        def read() -> dict[str, int]:
            ((chats, spaces, encrypted, inbox, handled),) = self._db.execute(
                "SELECT (SELECT count(*) FROM chats), (SELECT count(*) FROM spaces),"
                " (SELECT count(*) FROM encrypted_rooms),"
                " count(*) - count(outcome), count(outcome) FROM events"
            ).fetchall()
            return {
                "chats": chats,
                "inbox": inbox,
                "handled": handled,
                "spaces": spaces,
                "encrypted_rooms": encrypted,
            }

        return await self._run(read)
