"""The event shapes the client-server API hands out.

Events are decoded one at a time from raw JSON (see `decode_events`) so that one
malformed event costs only itself, never the batch it came in. An event larger or
nested deeper than any real one (`MAX_EVENT_BYTES`, `MAX_EVENT_DEPTH`) is refused
before it is decoded, so nothing downstream walks an absurd structure.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from .identifiers import EventID, RoomID, UserID
from .nesting import exceeds_depth

__all__ = [
    "CUT_EVENT",
    "MAX_EVENT_BYTES",
    "MAX_EVENT_DEPTH",
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
    redacts: Any = None
    """An ``m.room.redaction``'s target in room versions 1-10 (11 moved it into the
    content); unchecked here (any JSON): the reader validates it, so junk in it never
    costs the event."""

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


# A homeserver refuses events over 64 KiB; the client format adds ``unsigned``
# (a previous content, relations), so a real event stays well under four times that.
MAX_EVENT_BYTES = 256 * 1024
# Real contents nest a handful of levels; decoders and walks recurse per level.
MAX_EVENT_DEPTH = 64
# Stands where an event was cut out of an envelope (see `.mending`), which recorded it.
CUT_EVENT = b'"org.surfaces.cut-event"'


@dataclass(frozen=True, slots=True)
class SkippedEvent:
    """Something that did not decode: where it was and why, for the logs.

    For an event, its id, sender and room when those could still be read (none of
    its content is kept).
    """

    where: str
    reason: str
    event_id: str | None = None
    sender: str | None = None
    room_id: str | None = None


class _Ids(msgspec.Struct):
    """The parts of an event that name it, read leniently from one that failed."""

    event_id: Any = None
    sender: Any = None


_ids_decoder = msgspec.json.Decoder(_Ids)


E = TypeVar("E", Event, RoomEvent, StrippedStateEvent, ToDeviceEvent)

_DECODERS: dict[type[Any], msgspec.json.Decoder[Any]] = {
    cls: msgspec.json.Decoder(cls) for cls in (Event, RoomEvent, StrippedStateEvent, ToDeviceEvent)
}


def decode_events(
    raws: Iterable[msgspec.Raw],
    cls: type[E],
    where: str,
    skipped: list[SkippedEvent],
    *,
    room_id: str | None = None,
) -> list[E]:
    """Decode each raw event as ``cls``; append a `SkippedEvent` for each one that fails.

    An event too large or nested too deep is refused before decoding; a `CUT_EVENT`
    placeholder (already recorded) is passed over.
    """
    decoder: msgspec.json.Decoder[E] = _DECODERS[cls]
    events: list[E] = []
    for index, raw in enumerate(raws):
        try:
            data = bytes(raw)
            if len(data) > MAX_EVENT_BYTES:
                reason = f"larger than {MAX_EVENT_BYTES} bytes"
            # Fewer brackets than the limit cannot nest deeper: no scan for almost every
            # event (the counts, inline, are most of what this check costs).
            elif data.count(b"{") + data.count(b"[") > MAX_EVENT_DEPTH and exceeds_depth(
                data, MAX_EVENT_DEPTH
            ):
                reason = f"nested deeper than {MAX_EVENT_DEPTH} levels"
            else:
                events.append(decoder.decode(data))
                continue
        except msgspec.DecodeError as exc:
            if len(raw) == len(CUT_EVENT) and bytes(raw) == CUT_EVENT:
                continue
            reason = str(exc)
        skipped.append(_skipped(raw, f"{where}[{index}]", reason, room_id))
    return events


def _skipped(raw: msgspec.Raw, where: str, reason: str, room_id: str | None) -> SkippedEvent:
    try:
        ids = _ids_decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        ids = _Ids()
    return SkippedEvent(
        where,
        reason,
        ids.event_id if isinstance(ids.event_id, str) else None,
        ids.sender if isinstance(ids.sender, str) else None,
        room_id,
    )
