"""What both stores keep in memory, and how a chat row reads.

The SQLite and the PostgreSQL store hold the chats, the Spaces, the encrypted rooms'
settings and the sync token in memory as well (loaded at open, kept in step with
every write), so that routing a message costs no I/O. The maps and their rules are
the same for both; only when a store updates them differs (SQLite after its call,
PostgreSQL inside the call's turn), and that stays in each store.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec

from matrix_api.models import RoomID, SyncToken

from .chats import Chat

__all__ = ["SELECT_CHATS", "StoreCache", "chats_from_rows"]

# Every chat, in the column order `chats_from_rows` reads (the same SQL for both stores).
SELECT_CHATS = (
    "SELECT chat_id, room_id, owner, title, created_ts, archived, space_id, successor, settings"
    " FROM chats"
)

_settings_decoder = msgspec.json.Decoder(dict[str, str])


def chats_from_rows(rows: Iterable[Sequence[Any]]) -> list[Chat]:
    """Chats from the rows of `SELECT_CHATS` (either store's driver types)."""
    return [
        Chat(
            chat_id=chat_id,
            room_id=RoomID(room_id),
            owner=owner,
            title=title,
            created_ts=created_ts,
            archived=bool(archived),
            space_id=RoomID(space_id) if space_id is not None else None,
            successor=successor,
            settings=_settings_decoder.decode(settings),
        )
        for (
            chat_id,
            room_id,
            owner,
            title,
            created_ts,
            archived,
            space_id,
            successor,
            settings,
        ) in rows
    ]


class StoreCache:
    """The in-memory maps of a store and the reads the runtime makes of them."""

    def __init__(self) -> None:
        self._chats_by_room: dict[RoomID, Chat] = {}
        self._chats_by_id: dict[str, Chat] = {}
        self._sync_token: SyncToken | None = None
        self._spaces: dict[str, RoomID] = {}
        self._encrypted_rooms: dict[RoomID, str] = {}

    @property
    def sync_token(self) -> SyncToken | None:
        return self._sync_token

    # --- chats ----------------------------------------------------------------------

    def chat_for_room(self, room_id: str) -> Chat | None:
        return self._chats_by_room.get(RoomID(room_id))

    def chat_by_id(self, chat_id: str) -> Chat | None:
        return self._chats_by_id.get(chat_id)

    def chats(self) -> list[Chat]:
        return list(self._chats_by_id.values())

    def _remember(self, chat: Chat) -> None:
        """``chat`` replaces whatever held its chat id or its room before."""
        self._forget(chat.chat_id)
        stale = self._chats_by_room.get(chat.room_id)
        if stale is not None:
            self._forget(stale.chat_id)
        self._chats_by_room[chat.room_id] = chat
        self._chats_by_id[chat.chat_id] = chat

    def _forget(self, chat_id: str) -> None:
        old = self._chats_by_id.pop(chat_id, None)
        if old is not None and self._chats_by_room.get(old.room_id) == old:
            del self._chats_by_room[old.room_id]

    # --- spaces ---------------------------------------------------------------------

    def space_for(self, owner: str) -> RoomID | None:
        return self._spaces.get(owner)

    def spaces(self) -> dict[str, RoomID]:
        return dict(self._spaces)

    def is_space(self, room_id: str) -> bool:
        return room_id in self._spaces.values()

    def _remember_spaces(self, put: Mapping[str, RoomID], removed: Iterable[str]) -> None:
        """After ``apply_spaces``: a Space belongs to one owner at a time."""
        for owner in removed:
            self._spaces.pop(owner, None)
        for owner, room_id in put.items():
            for other, held in list(self._spaces.items()):
                if held == room_id and other != owner:
                    del self._spaces[other]
            self._spaces[owner] = room_id

    # --- encrypted rooms ------------------------------------------------------------

    def room_encryption(self, room_id: str) -> str | None:
        return self._encrypted_rooms.get(RoomID(room_id))
