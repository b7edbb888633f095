"""Sending and reading room events: send, redact, /messages, typing, receipts."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from ..http import HTTPCore, Request, ignore_body
from ..models.events import RoomEvent
from ..models.identifiers import EventID, RoomID, SyncToken
from ..models.responses import EventIDResponse, MessagesResponse, decode_messages
from ..paths import CLIENT_V3, client_path

_event_id = msgspec.json.Decoder(EventIDResponse).decode
_room_event = msgspec.json.Decoder(RoomEvent).decode

ReceiptType = Literal["m.read", "m.read.private", "m.fully_read"]


def new_txn_id() -> str:
    """A fresh transaction id for a send that has no natural id of its own.

    The server scopes transaction ids to the device, across restarts: a sender that
    must be idempotent across a crash derives its id from something durable (the
    event it answers) instead of calling this.
    """
    return secrets.token_urlsafe(16)


class MessagingEndpoints(HTTPCore):
    async def send_event(
        self,
        room_id: RoomID,
        event_type: str,
        content: Mapping[str, Any],
        txn_id: str,
    ) -> EventID:
        """``PUT /rooms/{roomId}/send/{eventType}/{txnId}``.

        Retries reuse ``txn_id``, and so does any later send with it from the same
        device: the server answers with the event id of the first one.
        """
        path = client_path(CLIENT_V3, "rooms", room_id, "send", event_type, txn_id)
        return (await self.send(Request("PUT", path, body=content), _event_id)).event_id

    async def redact(
        self, room_id: RoomID, event_id: EventID, txn_id: str, *, reason: str | None = None
    ) -> EventID:
        path = client_path(CLIENT_V3, "rooms", room_id, "redact", event_id, txn_id)
        body = {"reason": reason} if reason is not None else None
        return (await self.send(Request("PUT", path, body=body), _event_id)).event_id

    async def get_event(self, room_id: RoomID, event_id: EventID) -> RoomEvent:
        path = client_path(CLIENT_V3, "rooms", room_id, "event", event_id)
        return await self.send(Request("GET", path), _room_event)

    async def messages(
        self,
        room_id: RoomID,
        *,
        direction: Literal["b", "f"],
        from_token: SyncToken | None = None,
        to_token: SyncToken | None = None,
        limit: int | None = None,
        filter: Mapping[str, Any] | None = None,
    ) -> MessagesResponse:
        """One page of ``GET /rooms/{roomId}/messages``.

        ``direction`` is required by the spec: ``"b"`` pages back in time from
        ``from_token`` (a ``prev_batch`` of /sync), ``"f"`` forward. A page may be
        empty and still have an ``end``: stop only when ``end`` is None.
        """
        query: dict[str, str] = {"dir": direction}
        if from_token is not None:
            query["from"] = from_token
        if to_token is not None:
            query["to"] = to_token
        if limit is not None:
            query["limit"] = str(limit)
        if filter is not None:
            query["filter"] = msgspec.json.encode(filter).decode()
        path = client_path(CLIENT_V3, "rooms", room_id, "messages")
        return await self.send(Request("GET", path, query=query), decode_messages)

    async def set_typing(self, room_id: RoomID, typing: bool, *, timeout_ms: int = 30_000) -> None:
        body: dict[str, Any] = {"typing": typing}
        if typing:
            body["timeout"] = timeout_ms
        path = client_path(CLIENT_V3, "rooms", room_id, "typing", self.require_user_id())
        await self.send(Request("PUT", path, body=body), ignore_body)

    async def send_receipt(
        self,
        room_id: RoomID,
        event_id: EventID,
        receipt_type: ReceiptType = "m.read",
        *,
        thread_id: str | None = None,
    ) -> None:
        """Move this user's receipt of ``receipt_type`` to ``event_id``."""
        path = client_path(CLIENT_V3, "rooms", room_id, "receipt", receipt_type, event_id)
        body = {"thread_id": thread_id} if thread_id is not None else None
        # Setting a receipt to where it already is changes nothing.
        await self.send(Request("POST", path, body=body, idempotent=True), ignore_body)
