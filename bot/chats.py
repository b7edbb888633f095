"""The chat model and the markers that record it on the homeserver.

A chat is one logical conversation held in exactly one managed room. The server is
the source of truth: when the bot takes a room on, it writes a marker into its own
room account data (private to the bot, writable whatever the room's power levels,
and delivered by the initial /sync, so reconciliation needs no request per room).
"""

from __future__ import annotations

import secrets
import time
import unicodedata
from dataclasses import dataclass, field, replace
from typing import Any

from matrix_api import MatrixClient
from matrix_api.models import RoomID

__all__ = [
    "CHAT_MARKER",
    "MARKER_VERSION",
    "MAX_TITLE",
    "SPACE_MARKER",
    "Chat",
    "MarkerError",
    "chat_from_marker",
    "created_now_ms",
    "marker_content",
    "new_chat_id",
    "safe_title",
    "space_marker_content",
    "space_owner_from_marker",
    "title_problem",
    "write_marker",
]

CHAT_MARKER = "org.surfaces_bot.chat"
"""Room account data type of the chat marker."""
SPACE_MARKER = "org.surfaces_bot.space"
"""Room account data type of the marker of a user's Space."""
MARKER_VERSION = 1
MAX_TITLE = 255
"""Longest chat title, in characters (room names longer than this are unwieldy)."""

# What a title may not hold, by Unicode category: characters that are invisible or
# change how the text around them reads (bidi overrides, zero-width spaces, tag
# characters), control characters, line breaks, and code points with no meaning.
_REFUSED_IN_TITLE = {
    "Cc": "a control character",
    "Cf": "an invisible format character",
    "Co": "a private-use character",
    "Cs": "a surrogate",
    "Cn": f"unassigned in Unicode {unicodedata.unidata_version}",
    "Zl": "a line separator",
    "Zp": "a paragraph separator",
}
# Unicode's Bidi_Control characters: they reorder the text around them unseen.
_BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)
# The one exception: ZWNJ and ZWJ are part of the spelling of words (Persian, Indic
# scripts) and of emoji sequences. Between two visible characters they only shape
# the text; anywhere else (an edge, next to a space, doubled) they are refused.
_JOINERS = frozenset("\u200c\u200d")


def _visible(char: str) -> bool:
    return not char.isspace() and unicodedata.category(char) not in _REFUSED_IN_TITLE


def _refusal(title: str, index: int) -> str | None:
    """Why ``title[index]`` may not be in a title; None when it may."""
    char = title[index]
    what = _REFUSED_IN_TITLE.get(unicodedata.category(char))
    if what is None:
        return None
    if char in _BIDI_CONTROLS:
        return "an invisible direction-changing character"
    if (
        char in _JOINERS
        and 0 < index < len(title) - 1
        and _visible(title[index - 1])
        and _visible(title[index + 1])
    ):
        return None
    return what


def title_problem(title: str) -> str | None:
    """What is wrong with the characters of ``title`` (the first offender, named by
    its code point, never shown raw), or None when every character may be in a title."""
    for index, char in enumerate(title):
        what = _refusal(title, index)
        if what is not None:
            name = unicodedata.name(char, "")
            named = f"U+{ord(char):04X} {name}" if name else f"U+{ord(char):04X}"
            return f"{named} ({what})"
    return None


def safe_title(raw: str) -> str:
    """``raw`` as a title the bot can show, for titles it did not check itself (a
    marker's): refused characters dropped (line breaks and tabs become spaces),
    whitespace collapsed, at most `MAX_TITLE` characters. Never raises; may return ""
    (a chat without a title)."""
    title = unicodedata.normalize("NFC", raw)
    for _ in range(3):  # dropping one character can leave a joiner at an edge
        kept = "".join(
            char if _refusal(title, i) is None else " " if char.isspace() else ""
            for i, char in enumerate(title)
        )
        kept = " ".join(kept.split())[:MAX_TITLE].rstrip()
        if kept == title:
            break
        title = kept
    return title if title_problem(title) is None else ""


@dataclass(frozen=True, slots=True)
class Chat:
    chat_id: str
    room_id: RoomID
    owner: str
    title: str
    created_ts: int
    archived: bool = False
    space_id: RoomID | None = None
    """The owner's Space this room is a child of (None: not in a Space)."""
    successor: str | None = None
    """The chat that replaces this one (an encrypted room's unencrypted way out)."""
    settings: dict[str, str] = field(default_factory=dict, hash=False)
    """Per-chat backend settings (``!model``, ``!system``), kept in the marker."""

    def with_title(self, title: str) -> Chat:
        return replace(self, title=title)

    def changeable_by(self, user_id: str, admins: frozenset[str]) -> bool:
        """Whether ``user_id`` may change this chat (rename, archive, settings,
        ``!forget``): its owner and the bot's ``admins`` only. The one rule for live
        commands and for a conversation rebuilt from the room's history."""
        return user_id == self.owner or user_id in admins


class MarkerError(ValueError):
    """A marker exists but is not one this bot can read."""


def new_chat_id() -> str:
    """A fresh, unguessable chat id; never derived from a room id."""
    return "c_" + secrets.token_urlsafe(12)


def now_ms() -> int:
    return int(time.time() * 1000)


def created_now_ms(client: MatrixClient) -> int:
    """A ``created_ts`` for a chat the bot takes on now.

    Messages older than ``created_ts`` are history, not for the bot to answer, and
    their ``origin_server_ts`` is the homeserver's clock: so is this wherever the
    server's answers told it (`MatrixClient.server_time_ms`). This machine's clock
    running ahead would otherwise make a user's first messages look like history.
    """
    server_now = client.server_time_ms()
    return server_now if server_now is not None else now_ms()


def marker_content(chat: Chat) -> dict[str, Any]:
    content: dict[str, Any] = {
        "version": MARKER_VERSION,
        "chat_id": chat.chat_id,
        "owner": chat.owner,
        "title": chat.title,
        "created_ts": chat.created_ts,
        "archived": chat.archived,
    }
    # Optional fields only when set: older markers simply lack them.
    if chat.space_id is not None:
        content["space_id"] = chat.space_id
    if chat.successor is not None:
        content["successor"] = chat.successor
    if chat.settings:
        content["settings"] = dict(chat.settings)
    return content


def chat_from_marker(room_id: RoomID, content: dict[str, Any]) -> Chat:
    """Read a marker's content; `MarkerError` says what is wrong with it.

    The title is made safe (`safe_title`) rather than refused: a marker may have been
    written by another version of the bot or by hand, and a chat is worth more than
    the characters of its title.
    """
    version = content.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise MarkerError("no version")
    if version > MARKER_VERSION:
        raise MarkerError(f"marker version {version} is newer than this bot ({MARKER_VERSION})")
    chat_id = content.get("chat_id")
    owner = content.get("owner")
    title = content.get("title", "")
    created_ts = content.get("created_ts", 0)
    archived = content.get("archived", False)
    if not isinstance(chat_id, str) or not chat_id:
        raise MarkerError("chat_id missing or not a string")
    if not isinstance(owner, str) or not owner.startswith("@"):
        raise MarkerError("owner missing or not a user id")
    if not isinstance(title, str):
        raise MarkerError("title is not a string")
    if not isinstance(created_ts, int) or isinstance(created_ts, bool):
        raise MarkerError("created_ts is not an integer")
    if not isinstance(archived, bool):
        raise MarkerError("archived is not a boolean")
    space_id = content.get("space_id")
    successor = content.get("successor")
    settings = content.get("settings", {})
    if space_id is not None and not isinstance(space_id, str):
        raise MarkerError("space_id is not a string")
    if successor is not None and not isinstance(successor, str):
        raise MarkerError("successor is not a string")
    if not isinstance(settings, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in settings.items()
    ):
        raise MarkerError("settings is not an object of strings")
    return Chat(
        chat_id=chat_id,
        room_id=room_id,
        owner=owner,
        title=safe_title(title),
        created_ts=created_ts,
        archived=archived,
        space_id=RoomID(space_id) if space_id is not None else None,
        successor=successor,
        settings=settings,
    )


async def write_marker(client: MatrixClient, chat: Chat) -> None:
    """Record ``chat`` on the server (idempotent: a PUT of the whole marker)."""
    await client.put_room_account_data(chat.room_id, CHAT_MARKER, marker_content(chat))


def space_marker_content(owner: str) -> dict[str, Any]:
    return {"version": MARKER_VERSION, "owner": owner}


def space_owner_from_marker(content: dict[str, Any]) -> str:
    """The owner a Space marker names; `MarkerError` if it is not one."""
    version = content.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version > MARKER_VERSION:
        raise MarkerError("missing or unknown version")
    owner = content.get("owner")
    if not isinstance(owner, str) or not owner.startswith("@"):
        raise MarkerError("owner missing or not a user id")
    return owner
