"""Which logical chat a room's message belongs to. Pure: no I/O, no side effects."""

from __future__ import annotations

from typing import Protocol

from .chats import Chat

__all__ = ["UNREGISTERED", "ChatLookup", "is_unregistered", "resolve_chat_id"]

UNREGISTERED = "unregistered:"


class ChatLookup(Protocol):
    def chat_for_room(self, room_id: str) -> Chat | None: ...


def resolve_chat_id(store: ChatLookup, room_id: str, sender: str) -> str:
    """The chat id of ``room_id``, or ``unregistered:{room_id}`` when it has none.

    One managed room holds exactly one chat, so the sender does not change the
    answer; it is part of the signature so that routing rules that do depend on it
    (several people in one room) stay a change of this function alone.
    """
    del sender
    chat = store.chat_for_room(room_id)
    return chat.chat_id if chat is not None else f"{UNREGISTERED}{room_id}"


def is_unregistered(chat_id: str) -> bool:
    return chat_id.startswith(UNREGISTERED)
