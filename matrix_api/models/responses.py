"""Typed bodies of the smaller endpoints' answers."""

from __future__ import annotations

import msgspec

from .events import RoomEvent, SkippedEvent, StrippedStateEvent, decode_events
from .identifiers import EventID, RoomID, SyncToken, UserID
from .mending import decode_mended

__all__ = [
    "CreateRoomResponse",
    "EventIDResponse",
    "FilterIDResponse",
    "HierarchyResponse",
    "HierarchyRoom",
    "JoinedMembersResponse",
    "JoinedRoomsResponse",
    "LoginResponse",
    "MessagesResponse",
    "RelationsResponse",
    "RoomIDResponse",
    "Versions",
    "WhoAmI",
    "decode_messages",
    "decode_relations",
]


class Versions(msgspec.Struct, frozen=True):
    versions: list[str]
    unstable_features: dict[str, bool] = msgspec.field(default_factory=dict)


class LoginResponse(msgspec.Struct, frozen=True):
    user_id: UserID
    access_token: str
    device_id: str

    def __repr__(self) -> str:  # the token stays out of reprs and tracebacks
        return f"LoginResponse(user_id={self.user_id!r}, device_id={self.device_id!r})"


class WhoAmI(msgspec.Struct, frozen=True):
    user_id: UserID
    device_id: str | None = None
    is_guest: bool = False


class RoomIDResponse(msgspec.Struct, frozen=True):
    room_id: RoomID


CreateRoomResponse = RoomIDResponse


class EventIDResponse(msgspec.Struct, frozen=True):
    event_id: EventID


class FilterIDResponse(msgspec.Struct, frozen=True):
    filter_id: str


class JoinedRoomsResponse(msgspec.Struct, frozen=True):
    joined_rooms: list[RoomID]


class RoomMember(msgspec.Struct, frozen=True):
    display_name: str | None = None
    avatar_url: str | None = None


class JoinedMembersResponse(msgspec.Struct, frozen=True):
    joined: dict[UserID, RoomMember]


class HierarchyRoom(msgspec.Struct, frozen=True):
    room_id: RoomID
    num_joined_members: int = 0
    world_readable: bool = False
    guest_can_join: bool = False
    name: str | None = None
    topic: str | None = None
    room_type: str | None = None
    join_rule: str | None = None
    children_state: list[StrippedStateEvent] = msgspec.field(default_factory=list)


class HierarchyResponse(msgspec.Struct, frozen=True):
    rooms: list[HierarchyRoom]
    next_batch: SyncToken | None = None


class MessagesResponse(msgspec.Struct, frozen=True):
    """One page of /messages.

    ``end`` is None when there is nothing further in that direction; an empty
    ``chunk`` with an ``end`` is *not* the end, keep paginating from ``end``.
    """

    start: SyncToken
    chunk: list[RoomEvent]
    end: SyncToken | None = None
    state: list[RoomEvent] = msgspec.field(default_factory=list)
    skipped: list[SkippedEvent] = msgspec.field(default_factory=list)


class _Messages(msgspec.Struct):
    start: str
    chunk: list[msgspec.Raw]
    end: str | None = None
    state: list[msgspec.Raw] = msgspec.field(default_factory=list)


_messages_decoder = msgspec.json.Decoder(_Messages)


def decode_messages(body: bytes) -> MessagesResponse:
    """Decode a /messages page, skipping (and recording) events that do not decode."""
    skipped: list[SkippedEvent] = []
    wire = decode_mended(_messages_decoder, body, skipped, ("chunk", "state"))
    return MessagesResponse(
        start=SyncToken(wire.start),
        chunk=decode_events(wire.chunk, RoomEvent, "chunk", skipped),
        end=SyncToken(wire.end) if wire.end is not None else None,
        state=decode_events(wire.state, RoomEvent, "state", skipped),
        skipped=skipped,
    )


class RelationsResponse(msgspec.Struct, frozen=True):
    """One page of /relations: the events relating to a parent event.

    ``next_batch`` is None when there is nothing further: paginate from it until then.
    ``recursion_depth`` is the depth the server followed (only when asked to recurse).
    Events that do not decode are left out of ``chunk`` and recorded in ``skipped``.
    """

    chunk: list[RoomEvent]
    next_batch: SyncToken | None = None
    prev_batch: SyncToken | None = None
    recursion_depth: int | None = None
    skipped: list[SkippedEvent] = msgspec.field(default_factory=list)


class _Relations(msgspec.Struct):
    chunk: list[msgspec.Raw]
    next_batch: str | None = None
    prev_batch: str | None = None
    recursion_depth: int | None = None


_relations_decoder = msgspec.json.Decoder(_Relations)


def decode_relations(body: bytes) -> RelationsResponse:
    """Decode a /relations page as `decode_messages` does a /messages one: an event
    that does not decode is skipped (and recorded), never the page."""
    skipped: list[SkippedEvent] = []
    wire = decode_mended(_relations_decoder, body, skipped, ("chunk",))
    return RelationsResponse(
        chunk=decode_events(wire.chunk, RoomEvent, "chunk", skipped),
        next_batch=SyncToken(wire.next_batch) if wire.next_batch is not None else None,
        prev_batch=SyncToken(wire.prev_batch) if wire.prev_batch is not None else None,
        recursion_depth=wire.recursion_depth,
        skipped=skipped,
    )
