"""bot.router: a room's chat id, or the marker of an unregistered room."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.chats import Chat
from bot.router import UNREGISTERED, is_unregistered, resolve_chat_id
from bot.store import Store
from matrix_api.models import RoomID

ROOM = RoomID("!known:example.org")
CHAT = Chat("c_known", ROOM, "@alice:example.org", "t", 1)


class Lookup:
    def __init__(self, *chats: Chat) -> None:
        self._by_room = {chat.room_id: chat for chat in chats}
        self.asked: list[str] = []

    def chat_for_room(self, room_id: str) -> Chat | None:
        self.asked.append(room_id)
        return self._by_room.get(RoomID(room_id))


def test_a_known_room_resolves_to_its_chat_id() -> None:
    assert resolve_chat_id(Lookup(CHAT), ROOM, "@alice:example.org") == "c_known"


def test_an_unknown_room_is_unregistered() -> None:
    lookup = Lookup(CHAT)

    chat_id = resolve_chat_id(lookup, "!other:example.org", "@alice:example.org")

    assert chat_id == "unregistered:!other:example.org"
    assert chat_id == f"{UNREGISTERED}!other:example.org"
    assert is_unregistered(chat_id)
    assert lookup.asked == ["!other:example.org"]


@pytest.mark.parametrize("sender", ["@alice:example.org", "@bob:other.org", "@bot:example.org"])
def test_the_sender_does_not_change_the_answer(sender: str) -> None:
    assert resolve_chat_id(Lookup(CHAT), ROOM, sender) == "c_known"
    assert resolve_chat_id(Lookup(CHAT), "!x:y", sender) == "unregistered:!x:y"


@pytest.mark.parametrize(
    ("chat_id", "unregistered"),
    [
        ("unregistered:!r:x", True),
        ("c_abc", False),
        ("", False),
        ("Unregistered:!r:x", False),
        ("!r:x", False),
    ],
)
def test_is_unregistered(chat_id: str, unregistered: bool) -> None:
    assert is_unregistered(chat_id) is unregistered


async def test_the_store_is_a_chat_lookup(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "bot.sqlite3", "@bot:example.org")
    try:
        await store.apply_chats(put=[CHAT])

        assert resolve_chat_id(store, ROOM, "@alice:example.org") == "c_known"
        assert is_unregistered(resolve_chat_id(store, "!new:example.org", "@alice:example.org"))
    finally:
        await store.aclose()
