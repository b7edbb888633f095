"""Event relationships: the events relating to a parent (a thread's replies, edits)."""

from __future__ import annotations

from typing import Literal

from ..http import HTTPCore, Request
from ..models.identifiers import EventID, RoomID
from ..models.responses import RelationsResponse, decode_relations
from ..paths import CLIENT_V1, client_path


class RelationEndpoints(HTTPCore):
    async def relations(
        self,
        room_id: RoomID,
        event_id: EventID,
        rel_type: str | None = None,
        event_type: str | None = None,
        *,
        from_token: str | None = None,
        limit: int | None = None,
        direction: Literal["b", "f"] = "b",
        recurse: bool = False,
    ) -> RelationsResponse:
        """One page of ``GET /v1/rooms/{roomId}/relations/{eventId}[/{relType}[/{eventType}]]``.

        ``direction`` ``"b"`` (the spec's default) gives the newest first. Keep paging
        from ``next_batch`` until it is None: servers cap a page (Synapse's default
        ``limit`` is 5). ``recurse`` also follows relations of the relating events
        (edits of a thread's replies, say), but Synapse 1.163 applies the ``rel_type``
        and ``event_type`` filters to every event found, not only to the first level:
        the edits of a thread's replies come only without ``rel_type`` (each reply
        also carries its latest edit in ``unsigned["m.relations"]["m.replace"]``).

        Raises ValueError for an ``event_type`` without a ``rel_type`` (the spec has
        no such path) or an empty one; an unknown parent event is a 404 (the spec says
        ``M_NOT_FOUND``, Synapse 1.163 answers ``M_UNKNOWN``: test the status).
        """
        parts: list[str] = ["rooms", room_id, "relations", event_id]
        if rel_type is not None:
            if not rel_type:
                raise ValueError("rel_type must not be empty")
            parts.append(rel_type)
        if event_type is not None:
            if rel_type is None:
                raise ValueError("event_type needs a rel_type: the spec has no path for it alone")
            if not event_type:
                raise ValueError("event_type must not be empty")
            parts.append(event_type)
        query: dict[str, str] = {"dir": direction}
        if from_token is not None:
            query["from"] = from_token
        if limit is not None:
            query["limit"] = str(limit)
        if recurse:
            query["recurse"] = "true"
        path = client_path(CLIENT_V1, *parts)
        return await self.send(Request("GET", path, query=query), decode_relations)
