"""A homeserver stand-in for the reply sink's tests: records sends and typing, in order.

room = FakeRoom()
async with room.client() as client: ...
room.sent       # [(txn_id, content), ...] of m.room.message sends
room.typing     # [True, False, ...]
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import httpx
import trio

from matrix_api import MatrixClient, RetryPolicy
from matrix_api.models import EventID, RoomID, UserID

ROOM = RoomID("!room:example.org")
BOT = UserID("@bot:example.org")
SOURCE = EventID("$question")


@dataclass
class Sent:
    txn_id: str
    content: dict[str, Any]
    event_id: str
    at: float

    @property
    def is_edit(self) -> bool:
        relates: dict[str, Any] = self.content.get("m.relates_to", {})
        return relates.get("rel_type") == "m.replace"

    @property
    def shown(self) -> dict[str, Any]:
        """What a client shows: the new content of an edit, else the content."""
        return self.content["m.new_content"] if self.is_edit else self.content


@dataclass
class FakeRoom:
    sent: list[Sent] = field(default_factory=list)
    typing: list[bool] = field(default_factory=list)
    by_txn: dict[str, str] = field(default_factory=dict)
    fail_sends: int = 0
    """Answer this many sends with a 403 first (a failed edit)."""

    def client(self) -> MatrixClient:
        return MatrixClient(
            "https://hs.example.org",
            access_token="syt_secret",
            user_id=BOT,
            transport=httpx.MockTransport(self.handle),
            retry_policy=RetryPolicy(max_attempts=1),
        )

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = unquote(request.url.raw_path.decode().partition("?")[0])
        parts = path.split("/")
        if "/typing/" in path:
            self.typing.append(json.loads(request.content)["typing"])
            return httpx.Response(200, json={})
        if "/send/m.room.message/" in path:
            if self.fail_sends:
                self.fail_sends -= 1
                return httpx.Response(403, json={"errcode": "M_FORBIDDEN", "error": "no"})
            txn = parts[-1]
            if txn not in self.by_txn:  # the server de-duplicates by transaction id
                event_id = f"$ev{len(self.sent)}"
                self.by_txn[txn] = event_id
                self.sent.append(
                    Sent(txn, json.loads(request.content), event_id, trio.current_time())
                )
            return httpx.Response(200, json={"event_id": self.by_txn[txn]})
        return httpx.Response(404, json={"errcode": "M_UNRECOGNIZED", "error": path})

    def final_text(self, event_id: str) -> str:
        """The body a client shows for ``event_id``: its latest edit's, else its own."""
        body = None
        for sent in self.sent:
            if sent.event_id == event_id:
                body = sent.content["body"]
            elif sent.is_edit and sent.content["m.relates_to"]["event_id"] == event_id:
                body = sent.content["m.new_content"]["body"]
        assert body is not None
        return str(body)
