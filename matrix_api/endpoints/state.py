"""Room state: one event by type and key, or the whole current state."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from ..http import LARGE_ANSWER_LIMITS, HTTPCore, Request, decode_json_object
from ..models.events import RoomEvent
from ..models.identifiers import EventID, RoomID
from ..models.responses import EventIDResponse
from ..paths import CLIENT_V3, client_path

_event_id = msgspec.json.Decoder(EventIDResponse).decode
_state = msgspec.json.Decoder(list[RoomEvent]).decode


class StateEndpoints(HTTPCore):
    async def get_state_event(
        self, room_id: RoomID, event_type: str, state_key: str = ""
    ) -> dict[str, Any]:
        """The content of one state event; `NotFound` when the room has none."""
        # An empty state key is still a path segment: the URL ends in "/".
        path = client_path(CLIENT_V3, "rooms", room_id, "state", event_type, state_key)
        return await self.send(Request("GET", path), decode_json_object)

    async def put_state_event(
        self,
        room_id: RoomID,
        event_type: str,
        content: Mapping[str, Any],
        state_key: str = "",
    ) -> EventID:
        path = client_path(CLIENT_V3, "rooms", room_id, "state", event_type, state_key)
        return (await self.send(Request("PUT", path, body=content), _event_id)).event_id

    async def get_state(self, room_id: RoomID) -> list[RoomEvent]:
        """The whole current state of a room."""
        path = client_path(CLIENT_V3, "rooms", room_id, "state")
        return await self.send(Request("GET", path, limits=LARGE_ANSWER_LIMITS), _state)
