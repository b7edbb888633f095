"""Account data: this user's private key-value store, global or per room."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..http import HTTPCore, Request, decode_json_object, ignore_body
from ..models.identifiers import RoomID
from ..paths import CLIENT_V3, client_path


class AccountDataEndpoints(HTTPCore):
    async def get_account_data(self, event_type: str) -> dict[str, Any]:
        """Global account data of ``event_type``; `NotFound` when never set."""
        path = client_path(CLIENT_V3, "user", self.require_user_id(), "account_data", event_type)
        return await self.send(Request("GET", path), decode_json_object)

    async def put_account_data(self, event_type: str, content: Mapping[str, Any]) -> None:
        path = client_path(CLIENT_V3, "user", self.require_user_id(), "account_data", event_type)
        await self.send(Request("PUT", path, body=content), ignore_body)

    async def get_room_account_data(self, room_id: RoomID, event_type: str) -> dict[str, Any]:
        """This user's account data in one room; `NotFound` when never set."""
        path = client_path(
            CLIENT_V3, "user", self.require_user_id(), "rooms", room_id, "account_data", event_type
        )
        return await self.send(Request("GET", path), decode_json_object)

    async def put_room_account_data(
        self, room_id: RoomID, event_type: str, content: Mapping[str, Any]
    ) -> None:
        path = client_path(
            CLIENT_V3, "user", self.require_user_id(), "rooms", room_id, "account_data", event_type
        )
        await self.send(Request("PUT", path, body=content), ignore_body)
