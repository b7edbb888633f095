"""The space hierarchy (``/_matrix/client/v1``)."""

from __future__ import annotations

import msgspec

from ..http import HTTPCore, Request
from ..models.identifiers import RoomID, SyncToken
from ..models.responses import HierarchyResponse
from ..paths import CLIENT_V1, client_path

_hierarchy = msgspec.json.Decoder(HierarchyResponse).decode


class SpaceEndpoints(HTTPCore):
    async def space_hierarchy(
        self,
        space_id: RoomID,
        *,
        from_token: SyncToken | None = None,
        limit: int | None = None,
        max_depth: int | None = None,
        suggested_only: bool = False,
    ) -> HierarchyResponse:
        """One page of the rooms under a Space (the Space itself comes first)."""
        query: dict[str, str] = {}
        if from_token is not None:
            query["from"] = from_token
        if limit is not None:
            query["limit"] = str(limit)
        if max_depth is not None:
            query["max_depth"] = str(max_depth)
        if suggested_only:
            query["suggested_only"] = "true"
        path = client_path(CLIENT_V1, "rooms", space_id, "hierarchy")
        return await self.send(Request("GET", path, query=query), _hierarchy)
