"""Reading incoming messages and shaping the bot's replies.

Bots answer with ``m.notice`` and never answer one (that is how two bots in a room
avoid talking to each other forever). A reply is a rich reply: ``m.in_reply_to``
points at the message it answers, which is also how the bot can tell, from the room
alone, which messages it has already answered.

A message in a thread (``m.relates_to`` with ``rel_type: m.thread``) is answered in
that thread, with the reply fallback the spec gives for clients that do not show
threads: ``is_falling_back`` and ``m.in_reply_to`` the message answered.
"""

from __future__ import annotations

import hashlib
import html
from dataclasses import dataclass
from typing import Any, TypeGuard

from matrix_api.models import EventID, RoomEvent

from .attachments import ATTACHMENT_MSGTYPES, Attachment, describe, parse_attachment

__all__ = [
    "IncomingMessage",
    "in_reply_to",
    "is_actionable",
    "is_encryption_event",
    "is_event_id",
    "malformed",
    "mentions",
    "notice",
    "parse_incoming",
    "reply_txn_id",
    "strip_reply_fallback",
    "thread_root",
]

# Text message types a person sends; notices are bots talking and are never answered.
_ANSWERED_MSGTYPES = frozenset({"m.text", "m.emote"})
MAX_BODY = 64 * 1024
# The spec's bound on an event id, in bytes.
MAX_EVENT_ID = 255


@dataclass(frozen=True, slots=True)
class IncomingMessage:
    event_id: EventID
    sender: str
    body: str
    origin_server_ts: int
    attachment: Attachment | None = None
    """An image or a file (``body`` then describes it: `bot.attachments.describe`)."""
    thread_root: EventID | None = None
    """The thread the message is in (its root event), None in the main timeline."""


class _BadThread(ValueError):
    """A thread relation without an event id for its root."""


def is_event_id(value: object) -> TypeGuard[str]:
    """Whether ``value`` can be an event id: a ``$`` string of at most `MAX_EVENT_ID`
    bytes of UTF-8 (a lone surrogate is no event's id, and no store takes it)."""
    if not isinstance(value, str) or not value.startswith("$"):
        return False
    try:
        return len(value.encode()) <= MAX_EVENT_ID
    except UnicodeEncodeError:
        return False


def _thread_root(content: dict[str, Any]) -> EventID | None:
    """The root of the thread ``content`` is in; raises `_BadThread` for a thread
    relation whose root is not an event id."""
    relates = content.get("m.relates_to")
    if not isinstance(relates, dict) or relates.get("rel_type") != "m.thread":
        return None
    root = relates.get("event_id")
    if not is_event_id(root):
        raise _BadThread("m.thread relation without an event id for its root")
    return EventID(root)


def thread_root(event: RoomEvent) -> EventID | None:
    """The thread ``event`` is in (its root's event id), None for the main timeline
    and for a thread relation that names no event (`malformed` reports that)."""
    try:
        return _thread_root(event.content)
    except _BadThread:
        return None


def strip_reply_fallback(body: str) -> str:
    """Drop the legacy ``> <@user> quoted text`` lines that older clients prepend."""
    lines = body.split("\n")
    if not lines or not lines[0].startswith("> "):
        return body
    index = 0
    while index < len(lines) and lines[index].startswith(">"):
        index += 1
    if index < len(lines) and lines[index] == "":
        index += 1
    return "\n".join(lines[index:])


def in_reply_to(event: RoomEvent) -> str | None:
    """The event id ``event`` replies to, if it is a rich reply."""
    relates = event.content.get("m.relates_to")
    if not isinstance(relates, dict):
        return None
    target = relates.get("m.in_reply_to")
    if not isinstance(target, dict):
        return None
    event_id = target.get("event_id")
    return event_id if isinstance(event_id, str) else None


def malformed(event: RoomEvent, bot_user_id: str) -> str | None:
    """Why ``event``, a message from someone else, breaks the spec's shape; None if not.

    Such a message is quarantined rather than silently passed over: it is junk from a
    server that validates less than it should, and the operator should see it.
    """
    if event.type != "m.room.message" or event.sender == bot_user_id or event.is_redacted:
        return None
    content = event.content
    for key in ("msgtype", "body"):
        value = content.get(key)
        if value is not None and not isinstance(value, str):
            return f"m.room.message {key} is a {type(value).__name__}, not a string"
    relates = content.get("m.relates_to")
    if relates is not None and not isinstance(relates, dict):
        return f"m.room.message m.relates_to is a {type(relates).__name__}, not an object"
    try:
        _thread_root(content)
    except _BadThread as exc:
        return str(exc)
    return None


def parse_incoming(event: RoomEvent, bot_user_id: str) -> IncomingMessage | None:
    """The message to answer in ``event``, or None when the bot must not answer it.

    Not answered: the bot's own events, notices (other bots), edits (``m.replace``:
    the original was answered), redacted events, anything without a text body that
    is not an image, a file, audio or video (`bot.attachments`), and a thread
    relation without a root (`malformed`).
    """
    if event.type != "m.room.message" or event.sender == bot_user_id or event.is_redacted:
        return None
    content = event.content
    msgtype = content.get("msgtype")
    # Content is whatever the sending server let through: any JSON type anywhere.
    if not isinstance(msgtype, str) or (
        msgtype not in _ANSWERED_MSGTYPES and msgtype not in ATTACHMENT_MSGTYPES
    ):
        return None
    relates = content.get("m.relates_to")
    if isinstance(relates, dict) and relates.get("rel_type") == "m.replace":
        return None
    try:
        thread = _thread_root(content)
    except _BadThread:
        return None
    if msgtype in ATTACHMENT_MSGTYPES:
        # Answered even when unreadable: the user gets a notice saying what is read.
        attachment = parse_attachment(content)
        return IncomingMessage(
            event_id=event.event_id,
            sender=event.sender,
            body=describe(attachment)[:MAX_BODY],
            origin_server_ts=event.origin_server_ts,
            attachment=attachment,
            thread_root=thread,
        )
    body = content.get("body")
    if not isinstance(body, str):
        return None
    if in_reply_to(event) is not None:
        body = strip_reply_fallback(body)
    return IncomingMessage(
        event_id=event.event_id,
        sender=event.sender,
        body=body[:MAX_BODY],
        origin_server_ts=event.origin_server_ts,
        thread_root=thread,
    )


def notice(
    body: str,
    *,
    reply_to: EventID | None = None,
    formatted_body: str | None = None,
    mention: str | None = None,
    thread: EventID | None = None,
) -> dict[str, Any]:
    """An ``m.notice`` content, as a rich reply when ``reply_to`` is given, in the
    thread whose root is ``thread`` when one is given (with ``reply_to`` as the reply
    fallback for clients without threads).

    ``formatted_body`` must already be safe HTML; without it the plain ``body`` is
    all there is (no HTML is derived from user text here). ``mention`` is a user id
    the notice is meant to notify; without one, ``m.mentions`` is empty, so the notice
    notifies no one, whatever its body holds (a reply's sender included).
    """
    content: dict[str, Any] = {"msgtype": "m.notice", "body": body, "m.mentions": mentions(mention)}
    if formatted_body is not None:
        content["format"] = "org.matrix.custom.html"
        content["formatted_body"] = formatted_body
    if thread is not None:
        relation: dict[str, Any] = {"rel_type": "m.thread", "event_id": thread}
        if reply_to is not None:
            relation["is_falling_back"] = True
            relation["m.in_reply_to"] = {"event_id": reply_to}
        content["m.relates_to"] = relation
    elif reply_to is not None:
        content["m.relates_to"] = {"m.in_reply_to": {"event_id": reply_to}}
    return content


def mentions(*user_ids: str | None) -> dict[str, Any]:
    """The ``m.mentions`` of an event the bot sends: the users it means to notify, or
    ``{}``. Every message the bot sends carries one: without it a client falls back to
    the body, and a user id or display name in an answer would notify that user."""
    named = [user_id for user_id in user_ids if user_id is not None]
    return {"user_ids": named} if named else {}


def escape(text: str) -> str:
    """HTML-escape user text for a ``formatted_body``."""
    return html.escape(text, quote=True)


def reply_txn_id(source_event_id: str, purpose: str = "reply") -> str:
    """The transaction id of the bot's answer to ``source_event_id``.

    Derived from the source event, so a re-send after a crash reuses it and the
    server (which scopes transaction ids to the device) returns the first event
    instead of posting a second one.
    """
    digest = hashlib.sha256(f"{purpose}\0{source_event_id}".encode()).hexdigest()[:40]
    return f"sb.{purpose}.{digest}"


def is_encryption_event(event: RoomEvent, bot_user_id: str) -> bool:
    """An encrypted message, or encryption being turned on, by someone else."""
    if event.sender == bot_user_id:
        return False
    return event.type == "m.room.encrypted" or (
        event.type == "m.room.encryption" and event.state_key == ""
    )


def is_actionable(event: RoomEvent, bot_user_id: str) -> bool:
    """Whether ``event`` needs handling: a message to answer or an encryption notice."""
    return parse_incoming(event, bot_user_id) is not None or is_encryption_event(event, bot_user_id)
