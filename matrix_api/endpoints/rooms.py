"""Room membership: create, join, invite, leave, forget, and who is where."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import msgspec

from ..http import LARGE_ANSWER_LIMITS, HTTPCore, Request, ignore_body
from ..models.identifiers import RoomID, UserID
from ..models.responses import JoinedMembersResponse, JoinedRoomsResponse, RoomIDResponse
from ..paths import CLIENT_V3, client_path

_room_id = msgspec.json.Decoder(RoomIDResponse).decode
_joined_rooms = msgspec.json.Decoder(JoinedRoomsResponse).decode
_joined_members = msgspec.json.Decoder(JoinedMembersResponse).decode


class _MembersResponse(msgspec.Struct, frozen=True):
    chunk: list[Any] = msgspec.field(default_factory=list)


_members = msgspec.json.Decoder(_MembersResponse).decode

Preset = Literal["private_chat", "public_chat", "trusted_private_chat"]


class StateEventSpec(msgspec.Struct, frozen=True):
    """One entry of ``initial_state`` in `create_room`."""

    type: str
    content: Mapping[str, Any]
    state_key: str = ""


class RoomEndpoints(HTTPCore):
    async def create_room(
        self,
        *,
        name: str | None = None,
        topic: str | None = None,
        preset: Preset | None = None,
        visibility: Literal["public", "private"] | None = None,
        invite: Sequence[str] = (),
        is_direct: bool | None = None,
        room_version: str | None = None,
        creation_content: Mapping[str, Any] | None = None,
        initial_state: Sequence[StateEventSpec] = (),
        power_level_content_override: Mapping[str, Any] | None = None,
        room_alias_name: str | None = None,
    ) -> RoomID:
        """``POST /createRoom``; not retried once it may have reached the server.

        A Space is a room whose ``creation_content`` has ``"type": "m.space"``
        (see `create_space`).
        """
        body: dict[str, Any] = {}
        optional: dict[str, Any] = {
            "name": name,
            "topic": topic,
            "preset": preset,
            "visibility": visibility,
            "is_direct": is_direct,
            "room_version": room_version,
            "creation_content": creation_content,
            "power_level_content_override": power_level_content_override,
            "room_alias_name": room_alias_name,
        }
        body.update({key: value for key, value in optional.items() if value is not None})
        if invite:
            body["invite"] = list(invite)
        if initial_state:
            body["initial_state"] = [msgspec.to_builtins(spec) for spec in initial_state]
        request = Request("POST", f"{CLIENT_V3}/createRoom", body=body)
        return (await self.send(request, _room_id)).room_id

    async def create_space(
        self,
        *,
        name: str,
        invite: Sequence[str] = (),
        topic: str | None = None,
        initial_state: Sequence[StateEventSpec] = (),
        power_level_content_override: Mapping[str, Any] | None = None,
    ) -> RoomID:
        """Create a private Space: a room of type ``m.space``."""
        return await self.create_room(
            name=name,
            topic=topic,
            preset="private_chat",
            invite=invite,
            creation_content={"type": "m.space"},
            initial_state=initial_state,
            power_level_content_override=power_level_content_override,
        )

    async def join_room(self, room_id_or_alias: str, *, via: Sequence[str] = ()) -> RoomID:
        """Join by room id or alias; ``via`` names servers that can help with the join."""
        query: dict[str, str | Sequence[str]] = {}
        if via:
            # ``server_name`` is the pre-1.12 name of ``via``; older servers know only it.
            query = {"via": list(via), "server_name": list(via)}
        request = Request(
            "POST",
            client_path(CLIENT_V3, "join", room_id_or_alias),
            query=query,
            # Joining a room one is already in changes nothing.
            idempotent=True,
        )
        return (await self.send(request, _room_id)).room_id

    async def invite_user(
        self, room_id: RoomID, user_id: str, *, reason: str | None = None
    ) -> None:
        body: dict[str, str] = {"user_id": user_id}
        if reason is not None:
            body["reason"] = reason
        await self.send(
            Request("POST", client_path(CLIENT_V3, "rooms", room_id, "invite"), body=body),
            ignore_body,
        )

    async def leave_room(self, room_id: RoomID, *, reason: str | None = None) -> None:
        """Leave (or decline an invite to) a room."""
        body = {"reason": reason} if reason is not None else None
        await self.send(
            Request(
                "POST",
                client_path(CLIENT_V3, "rooms", room_id, "leave"),
                body=body,
                idempotent=True,
            ),
            ignore_body,
        )

    async def forget_room(self, room_id: RoomID) -> None:
        """Forget a room already left; it disappears from this user's history."""
        await self.send(
            Request("POST", client_path(CLIENT_V3, "rooms", room_id, "forget"), idempotent=True),
            ignore_body,
        )

    async def joined_rooms(self) -> list[RoomID]:
        return (
            await self.send(Request("GET", f"{CLIENT_V3}/joined_rooms"), _joined_rooms)
        ).joined_rooms

    async def joined_members(self, room_id: RoomID) -> dict[UserID, str | None]:
        """The joined members of a room and their display names."""
        response = await self.send(
            Request(
                "GET",
                client_path(CLIENT_V3, "rooms", room_id, "joined_members"),
                limits=LARGE_ANSWER_LIMITS,
            ),
            _joined_members,
        )
        return {user: member.display_name for user, member in response.joined.items()}

    async def current_members(self, room_id: RoomID) -> dict[UserID, str]:
        """Everyone in the room who has not left, by membership (``join``, ``invite``,
        ``ban``, ``knock``), from the room's member events. An entry that is not a
        member event with a user id and a string membership is left out."""
        path = client_path(CLIENT_V3, "rooms", room_id, "members")
        response = await self.send(
            Request("GET", path, query={"not_membership": "leave"}, limits=LARGE_ANSWER_LIMITS),
            _members,
        )
        members: dict[UserID, str] = {}
        for event in response.chunk:
            if not isinstance(event, dict) or event.get("type") != "m.room.member":
                continue
            user, content = event.get("state_key"), event.get("content")
            membership = content.get("membership") if isinstance(content, dict) else None
            if isinstance(user, str) and user.startswith("@") and isinstance(membership, str):
                members[UserID(user)] = membership
        return members
