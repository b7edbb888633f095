"""Creating rooms and Spaces for users. The only place the bot creates anything.

Called from commands (``!new``) and from the encrypted-room way out, never from
reconciliation or repair. Every created room is marked on the server before it is
announced, so a lost store finds it again.

``createRoom`` has no transaction id, so a re-run of the same message after a crash
would make a second room (or Space). Each room made (a chat with the id and time
it is given) is recorded with the inbox item as soon as the server answers, and a
re-run finishes that room instead. What is left is a crash while ``createRoom``
itself is under way: the server may then have made a room the bot never heard of
(an ordinary room it is in, reported as a skip at the next start).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import msgspec
import structlog

from matrix_api import MatrixAPIError, MatrixClient, StateEventSpec
from matrix_api.models import EventID, RoomID

from .chats import (
    SPACE_MARKER,
    Chat,
    created_now_ms,
    new_chat_id,
    space_marker_content,
    write_marker,
)
from .store import Provisioned, ProvisionedRoom
from .store_api import BotStore

__all__ = ["create_chat", "ensure_space", "link_to_space", "matrix_to", "unlink_from_space"]

log = structlog.get_logger("bot.provisioning")


def matrix_to(room_id: str, server_name: str) -> str:
    """A link any Matrix client opens (``via`` tells it which server can join it)."""
    return f"https://matrix.to/#/{room_id}?via={server_name}"


async def ensure_space(
    client: MatrixClient, store: BotStore, owner: str, *, request: EventID | None = None
) -> RoomID:
    """The owner's Space, created (and marked, and the owner invited) on first need.

    ``request``: as for `create_chat`.
    """
    existing = store.space_for(owner)
    if existing is not None:
        return existing
    made = await store.provisioned(request) if request is not None else Provisioned()
    space_id = made.space_id
    if space_id is None:
        name = await _display_name(client, owner)
        space_id = await client.create_space(name=f"{name}'s chats", invite=[owner])
        if request is not None:
            await store.set_provisioned(request, msgspec.structs.replace(made, space_id=space_id))
    else:
        log.info("space_creation_resumed", owner=owner, space_id=space_id)
    await client.put_room_account_data(space_id, SPACE_MARKER, space_marker_content(owner))
    await store.apply_spaces(put={owner: space_id})
    log.info("space_created", owner=owner, space_id=space_id)
    return space_id


async def create_chat(
    client: MatrixClient,
    store: BotStore,
    owner: str,
    title: str,
    server_name: str,
    *,
    request: EventID | None = None,
    encryption: Mapping[str, Any] | None = None,
) -> Chat:
    """A new chat room for ``owner``: named, in their Space, owner invited, marked.

    ``request`` is the inbox event being handled: a second call for it (a re-run
    after a crash) finishes the rooms the first one made instead of making others.
    ``encryption``: the room is created end-to-end encrypted, with this
    ``m.room.encryption`` content.
    """
    space_id = await ensure_space(client, store, owner, request=request)
    made = await store.provisioned(request) if request is not None else Provisioned()
    room = made.room
    if room is None:
        initial_state = [
            StateEventSpec(
                "m.space.parent", {"via": [server_name], "canonical": True}, state_key=space_id
            )
        ]
        if encryption is not None:
            initial_state.append(StateEventSpec("m.room.encryption", dict(encryption)))
        room_id = await client.create_room(
            name=title, preset="private_chat", invite=[owner], initial_state=initial_state
        )
        room = ProvisionedRoom(room_id, new_chat_id(), created_now_ms(client))
        if request is not None:
            await store.set_provisioned(request, msgspec.structs.replace(made, room=room))
    else:
        log.info("chat_creation_resumed", owner=owner, room_id=room.room_id)
    chat = Chat(room.chat_id, room.room_id, owner, title, room.created_ts, space_id=space_id)
    if encryption is not None:
        # Known before the first send into it (the sync that shows it may come later).
        await store.set_room_encryption(
            {room.room_id: json.dumps(encryption, separators=(",", ":"))}
        )
    await write_marker(client, chat)
    await store.apply_chats(put=[chat])
    # A new room has no history to rebuild: its first message need not read the room.
    await store.replace_conversation(chat.chat_id, [])
    await link_to_space(client, space_id, chat.room_id, server_name)
    log.info("chat_created", owner=owner, chat_id=chat.chat_id, room_id=chat.room_id)
    return chat


async def link_to_space(
    client: MatrixClient, space_id: RoomID, room_id: RoomID, server_name: str
) -> None:
    await client.put_state_event(space_id, "m.space.child", {"via": [server_name]}, room_id)


async def unlink_from_space(client: MatrixClient, space_id: RoomID, room_id: RoomID) -> None:
    # A child event with empty content is how a Space forgets a child.
    await client.put_state_event(space_id, "m.space.child", {}, room_id)


async def _display_name(client: MatrixClient, user_id: str) -> str:
    try:
        name = await client.get_displayname(user_id)
    except MatrixAPIError:  # a missing profile only changes the Space's name
        name = None
    return name or user_id
