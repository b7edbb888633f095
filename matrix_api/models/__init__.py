"""Typed shapes of what the homeserver sends; unknown fields are ignored everywhere."""

from .cross_signing import SignaturesUploadResponse
from .events import (
    MAX_EVENT_BYTES,
    MAX_EVENT_DEPTH,
    Event,
    RoomEvent,
    SkippedEvent,
    StrippedStateEvent,
    ToDeviceEvent,
    decode_events,
)
from .identifiers import EventID, FilterID, RoomAlias, RoomID, SyncToken, UserID
from .key_backup import KeyBackupVersion, RoomKeys, RoomKeysUpdate
from .keys import DeviceLists, KeysClaimResponse, KeysQueryResponse
from .responses import (
    CreateRoomResponse,
    EventIDResponse,
    HierarchyResponse,
    HierarchyRoom,
    LoginResponse,
    MessagesResponse,
    RelationsResponse,
    Versions,
    WhoAmI,
)
from .sync import InvitedRoom, JoinedRoom, LeftRoom, Rooms, SyncResponse, Timeline, decode_sync

__all__ = [
    "MAX_EVENT_BYTES",
    "MAX_EVENT_DEPTH",
    "CreateRoomResponse",
    "DeviceLists",
    "Event",
    "EventID",
    "EventIDResponse",
    "FilterID",
    "HierarchyResponse",
    "HierarchyRoom",
    "InvitedRoom",
    "JoinedRoom",
    "KeyBackupVersion",
    "KeysClaimResponse",
    "KeysQueryResponse",
    "LeftRoom",
    "LoginResponse",
    "MessagesResponse",
    "RelationsResponse",
    "RoomAlias",
    "RoomEvent",
    "RoomID",
    "RoomKeys",
    "RoomKeysUpdate",
    "Rooms",
    "SignaturesUploadResponse",
    "SkippedEvent",
    "StrippedStateEvent",
    "SyncResponse",
    "SyncToken",
    "Timeline",
    "ToDeviceEvent",
    "UserID",
    "Versions",
    "WhoAmI",
    "decode_events",
    "decode_sync",
]
