"""The event shapes the client-server API hands out.

Events are decoded one at a time from raw JSON (see `decode_events`) so that one
malformed event costs only itself, never the batch it came in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from .identifiers import EventID, RoomID, UserID

__all__ = [
    "Event",
    "RoomEvent",
    "SkippedEvent",
    "StrippedStateEvent",
    "ToDeviceEvent",
    "decode_events",
]


class Event(msgspec.Struct, frozen=True):
    """An event with only a type and content: account data, ephemeral, presence."""

    type: str
    content: dict[str, Any]


class ToDeviceEvent(msgspec.Struct, frozen=True):
    type: str
    sender: UserID
    content: dict[str, Any]


class RoomEvent(msgspec.Struct, frozen=True):
    """A timeline or state event (``ClientEventWithoutRoomID``; ``room_id`` when given)."""

    type: str
    event_id: EventID
    sender: UserID
    origin_server_ts: int
    content: dict[str, Any]
    state_key: str | None = None
    unsigned: dict[str, Any] = msgspec.field(default_factory=dict)
    room_id: RoomID | None = None

    @property
    def is_state(self) -> bool:
        return self.state_key is not None

    @property
    def is_redacted(self) -> bool:
        return "redacted_because" in self.unsigned


class StrippedStateEvent(msgspec.Struct, frozen=True):
    """State shown to invitees and in the space hierarchy."""

    type: str
    state_key: str
    sender: UserID
    content: dict[str, Any]


@dataclass(frozen=True, slots=True)
class SkippedEvent:
    """An event that did not decode: where it was and why, for the logs."""

    where: str
    reason: str


E = TypeVar("E", Event, RoomEvent, StrippedStateEvent, ToDeviceEvent)

_DECODERS: dict[type[Any], msgspec.json.Decoder[Any]] = {
    cls: msgspec.json.Decoder(cls) for cls in (Event, RoomEvent, StrippedStateEvent, ToDeviceEvent)
}


def decode_events(
    raws: Iterable[msgspec.Raw],
    cls: type[E],
    where: str,
    skipped: list[SkippedEvent],
) -> list[E]:
    """Decode each raw event as ``cls``; append a `SkippedEvent` for each one that fails."""
    decoder: msgspec.json.Decoder[E] = _DECODERS[cls]
    events: list[E] = []
    for index, raw in enumerate(raws):
        try:
            events.append(decoder.decode(raw))
        except msgspec.DecodeError as exc:
            skipped.append(SkippedEvent(f"{where}[{index}]", str(exc)))
    return events
