"""Driving the bot's commands as a person would: ask, read the answer, follow its link.

Builds on `bot_harness.Person`; everything runs against the real Synapse with the
real clock.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

from bot.invites import GREETING
from bot_harness import Person, replies_to
from matrix_api import MatrixClient, new_txn_id
from matrix_api.models import EventID, RoomEvent, RoomID
from matrix_api.testing.synapse import RegisteredUser, SynapseServer

__all__ = [
    "ask",
    "bot_client",
    "linked_room",
    "pending_invites",
    "reply_to",
    "send_and_wait",
    "start_chat",
]

# The bot's links: https://matrix.to/#/<room id>?via=<server>
_MATRIX_TO = re.compile(r"https://matrix\.to/#/(![^?\s\"'<>]+)\?via=([^\s\"'<>&]+)")
_fresh_timeouts = itertools.count(1)
_HREF = re.compile(r'<a href="(https://matrix\.to/#/[^"]+)">')


def bot_client(synapse: SynapseServer, bot_user: RegisteredUser) -> MatrixClient:
    """A second client acting as the bot (to read its account data); caller closes it."""
    return MatrixClient(
        synapse.base_url, access_token=bot_user.access_token, user_id=bot_user.user_id
    )


def reply_to(person: Person, room_id: RoomID, bot_id: str, event_id: str) -> RoomEvent | None:
    """The bot's notice answering ``event_id``, if the person has seen it."""
    for notice in person.bot_notices(room_id, bot_id):
        if event_id in replies_to([notice]):
            return notice
    return None


async def send_and_wait(
    person: Person,
    room_id: RoomID,
    bot_id: str,
    content: dict[str, Any],
    *,
    event_type: str = "m.room.message",
    timeout: float = 20.0,
) -> tuple[EventID, RoomEvent]:
    """Send one event and wait for the bot's rich reply to it."""
    event_id = await person.client.send_event(room_id, event_type, content, new_txn_id())
    await person.wait_until(
        lambda: reply_to(person, room_id, bot_id, event_id) is not None,
        timeout=timeout,
        what=f"the bot's answer to {content!r}"[:200],
    )
    reply = reply_to(person, room_id, bot_id, event_id)
    assert reply is not None
    return event_id, reply


async def ask(person: Person, room_id: RoomID, bot_id: str, body: str) -> RoomEvent:
    """Send ``body`` as ``m.text`` and return the bot's answer to it."""
    _, reply = await send_and_wait(person, room_id, bot_id, {"msgtype": "m.text", "body": body})
    return reply


def linked_room(reply: RoomEvent) -> RoomID:
    """The room a reply links to, read from its HTML ``<a href>``.

    Also checks that the plain body carries the same link, so a client without HTML
    shows it too.
    """
    html = reply.content.get("formatted_body")
    assert reply.content.get("format") == "org.matrix.custom.html", reply.content
    assert isinstance(html, str), reply.content
    href = _HREF.search(html)
    assert href is not None, f"no matrix.to link in {html!r}"
    match = _MATRIX_TO.fullmatch(href.group(1))
    assert match is not None, href.group(1)
    body_match = _MATRIX_TO.search(reply.content["body"])
    assert body_match is not None, reply.content["body"]
    assert body_match.group(1) == match.group(1)
    return RoomID(match.group(1))


async def pending_invites(person: Person) -> set[RoomID]:
    """Rooms the person is invited to (a fresh full sync; Person's own cursor untouched)."""
    # Without ``since`` the server answers at once whatever the timeout, but the
    # timeout is part of Synapse's key for replaying a recent identical /sync from
    # its cache: a fresh value makes sure the answer is not an old one.
    response = await person.client.sync(timeout_ms=next(_fresh_timeouts))
    return set(response.rooms.invite)


async def start_chat(person: Person, bot_id: str, name: str = "chat") -> RoomID:
    """A room the person creates and invites the bot to, once the bot has greeted."""
    room_id = await person.client.create_room(name=name, invite=[bot_id], preset="private_chat")
    await person.wait_until(
        lambda: any(e.content.get("body") == GREETING for e in person.bot_notices(room_id, bot_id)),
        what="the bot's greeting",
    )
    return room_id
