"""``/sync`` and filters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from ..http import LARGE_ANSWER_LIMITS, HTTPCore, Request
from ..models.identifiers import FilterID, SyncToken
from ..models.responses import FilterIDResponse
from ..models.sync import SyncResponse, decode_sync
from ..paths import CLIENT_V3, client_path

_filter_id = msgspec.json.Decoder(FilterIDResponse).decode

# Room for the server to answer a long-poll after its ``timeout`` runs out.
LONG_POLL_MARGIN_S = 15.0

Presence = Literal["offline", "online", "unavailable"]


class SyncEndpoints(HTTPCore):
    async def sync(
        self,
        *,
        since: SyncToken | None = None,
        timeout_ms: int = 0,
        full_state: bool = False,
        filter: FilterID | Mapping[str, Any] | None = None,
        set_presence: Presence | None = None,
    ) -> SyncResponse:
        """One ``GET /sync``.

        ``timeout_ms`` is how long the server may hold the request open waiting for
        events (the spec's default is 0: answer at once). With ``full_state`` the
        server ignores it and answers at once. ``filter`` is a filter id from
        `upload_filter`, or a filter definition sent inline.
        """
        query: dict[str, str] = {"timeout": str(timeout_ms)}
        if since is not None:
            query["since"] = since
        if full_state:
            query["full_state"] = "true"
        if filter is not None:
            query["filter"] = (
                filter if isinstance(filter, str) else msgspec.json.encode(filter).decode()
            )
        if set_presence is not None:
            query["set_presence"] = set_presence
        request = Request(
            "GET",
            f"{CLIENT_V3}/sync",
            query=query,
            read_timeout=timeout_ms / 1000 + LONG_POLL_MARGIN_S,
            limits=LARGE_ANSWER_LIMITS,
        )
        return await self.send(request, decode_sync)

    async def upload_filter(self, definition: Mapping[str, Any]) -> FilterID:
        """Store a filter on the server; the id can then be passed to `sync`."""
        request = Request(
            "POST",
            client_path(CLIENT_V3, "user", self.require_user_id(), "filter"),
            body=definition,
            # Uploading the same filter twice only yields a second equivalent id.
            idempotent=True,
        )
        return FilterID((await self.send(request, _filter_id)).filter_id)
