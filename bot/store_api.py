"""The store as the rest of the bot sees it, and the one place that picks a store.

Two implementations keep the same state under the same rules (see `bot.store`):
`bot.store.Store` in a SQLite file, for one bot on one machine, and
`bot.store_postgres.PostgresStore` in a PostgreSQL database, for a database that is
replicated and backed up, and (issue 22, next step) instances that take over from
one another. Whatever differs lives in the two modules; `BotStore` is what callers
may rely on, and `open_store` chooses by the configured location:

* ``postgresql://...`` or ``postgres://...``: PostgreSQL (a libpq URL);
* ``sqlite:///path`` or a plain file path: SQLite.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NoReturn, Protocol

from matrix_api.models import EventID, RoomID, SyncToken

from .chats import Chat
from .store import CryptoRow, InboxItem, NewInboxItem, Outcome, Provisioned, Quarantined, Store
from .store_location import is_postgres_url, sqlite_path

__all__ = ["BotStore", "is_postgres_url", "open_store", "sqlite_path"]


async def open_store(location: str | Path, user_id: str, *, lock_wait_s: float = 0.0) -> BotStore:
    """Open the store of ``user_id`` at ``location`` (see the module docstring),
    creating and migrating it as needed; close it with ``aclose``.

    Raises `bot.store.StoreError` for a store that cannot be used (held by another
    bot after ``lock_wait_s``, foreign, newer, another user's; for PostgreSQL
    `bot.store.StoreUnavailable`, a kind of StoreError, when the server cannot be
    reached now).
    """
    if isinstance(location, str) and is_postgres_url(location):
        # Imported here: a SQLite bot never loads the PostgreSQL driver.
        from .store_postgres import PostgresStore

        return await PostgresStore.open(location, user_id, lock_wait_s=lock_wait_s)
    return await Store.open(sqlite_path(location), user_id, lock_wait_s=lock_wait_s)


class BotStore(Protocol):
    """The bot's durable state: the sync token, chats and Spaces (also in memory, so
    routing costs no I/O), the inbox and what was handled, conversations, and the
    crypto layer's rows. Every ``async`` method is one transaction; a cancellation
    lands before it or not at all. `bot.store.StoreUnavailable`: nothing changed, the
    same call may work later."""

    # --- lifetime
    async def aclose(self) -> None: ...
    async def checkpoint_every(self, interval_s: float) -> NoReturn: ...
    async def wait_for_change(self) -> None: ...

    # --- meta
    @property
    def sync_token(self) -> SyncToken | None: ...
    async def get_meta(self, key: str) -> str | None: ...
    async def set_meta(self, key: str, value: str) -> None: ...

    # --- chats and Spaces
    def chat_for_room(self, room_id: str) -> Chat | None: ...
    def chat_by_id(self, chat_id: str) -> Chat | None: ...
    def chats(self) -> list[Chat]: ...
    async def apply_chats(self, put: Sequence[Chat] = (), remove: Iterable[str] = ()) -> None: ...
    def space_for(self, owner: str) -> RoomID | None: ...
    def spaces(self) -> dict[str, RoomID]: ...
    def is_space(self, room_id: str) -> bool: ...
    async def apply_spaces(
        self, put: dict[str, RoomID] | None = None, remove: Iterable[str] = ()
    ) -> None: ...

    # --- the inbox
    async def commit_sync_batch(
        self,
        next_token: SyncToken,
        items: Sequence[NewInboxItem],
        quarantined: Sequence[Quarantined] = (),
        *,
        crypto: Sequence[CryptoRow] = (),
        encryption: Mapping[RoomID, str] | None = None,
    ) -> list[InboxItem]: ...
    async def pending(self) -> list[InboxItem]: ...
    async def finish(
        self,
        item: InboxItem,
        outcome: Outcome,
        reply_event_id: EventID | None = None,
        *,
        reason: str | None = None,
    ) -> None: ...
    async def finish_with_turns(
        self,
        item: InboxItem,
        outcome: Outcome,
        reply_event_id: EventID | None,
        chat_id: str,
        turns: Sequence[tuple[str, str]],
        *,
        thread: str | None = None,
    ) -> None: ...
    def is_redacted(self, item: InboxItem) -> bool: ...
    async def answer_to(self, event_id: str) -> EventID | None: ...
    async def set_started_reply(self, item: InboxItem, reply_event_id: EventID) -> None: ...
    async def started_reply(self, item: InboxItem) -> EventID | None: ...
    async def set_provisioned(self, event_id: str, made: Provisioned) -> None: ...
    async def provisioned(self, event_id: str) -> Provisioned: ...
    async def discard(self, item: InboxItem) -> None: ...
    async def count_resumption(self, item: InboxItem) -> int: ...
    async def handled_outcome(self, event_id: str) -> str | None: ...
    async def quarantined(self) -> dict[str, str]: ...
    async def counts(self) -> dict[str, int]: ...

    # --- conversations: one per (chat, thread); thread None is the main timeline, a
    # thread's root event id that thread ('' and what is no event id: ValueError,
    # see `bot.store.thread_key`)
    async def conversation(
        self, chat_id: str, *, thread: str | None = None
    ) -> list[tuple[str, str]] | None: ...
    async def replace_conversation(
        self,
        chat_id: str,
        turns: Sequence[tuple[str, str]],
        event_ids: Sequence[str | None] = (),
        *,
        thread: str | None = None,
    ) -> None: ...

    # --- end-to-end encryption
    def room_encryption(self, room_id: str) -> str | None: ...
    async def set_room_encryption(self, rooms: Mapping[RoomID, str]) -> None: ...
    async def apply_crypto(self, rows: Sequence[CryptoRow]) -> None: ...
    async def crypto_rows(self) -> list[tuple[str, str, str]]: ...
