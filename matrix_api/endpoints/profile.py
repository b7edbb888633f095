"""Profile fields: the display name."""

from __future__ import annotations

from ..http import HTTPCore, Request, decode_json_object, ignore_body
from ..paths import CLIENT_V3, client_path


class ProfileEndpoints(HTTPCore):
    async def get_displayname(self, user_id: str) -> str | None:
        """A user's display name, or None when they have none."""
        path = client_path(CLIENT_V3, "profile", user_id, "displayname")
        name = (await self.send(Request("GET", path), decode_json_object)).get("displayname")
        return name if isinstance(name, str) else None

    async def set_displayname(self, displayname: str) -> None:
        path = client_path(CLIENT_V3, "profile", self.require_user_id(), "displayname")
        await self.send(Request("PUT", path, body={"displayname": displayname}), ignore_body)
