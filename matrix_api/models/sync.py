"""The typed `/sync` response.

Decoding is two-step, as ruma does it: the envelope is decoded with every room and
every event kept as raw JSON, then each room and each event is decoded on its own.
A malformed event or room is dropped and recorded in `SyncResponse.skipped`; only a
broken envelope (no ``next_batch``, a list where an object belongs) fails the whole
response, since nothing in it could be trusted then. Two things that would sink the
envelope are mended first, each recorded: lone surrogate escapes, and values nested
too deep for the decoder to follow (the event holding one is cut out whole).

Remember when reading it: a joined room's ``state`` is the state at the *start* of
its timeline; state events inside the timeline apply on top of it, in order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar

import msgspec

from .events import (
    E,
    Event,
    RoomEvent,
    SkippedEvent,
    StrippedStateEvent,
    ToDeviceEvent,
    decode_events,
)
from .identifiers import RoomID, SyncToken
from .keys import DeviceLists, device_lists_from, key_counts_from, key_types_from
from .mending import decode_mended

__all__ = [
    "InvitedRoom",
    "JoinedRoom",
    "LeftRoom",
    "Rooms",
    "SyncResponse",
    "Timeline",
    "decode_sync",
]


class Timeline(msgspec.Struct, frozen=True):
    events: list[RoomEvent] = msgspec.field(default_factory=list)
    # True when events between the previous sync and this one were left out:
    # a gap to fill with /messages from ``prev_batch``, not the end of history.
    limited: bool = False
    prev_batch: SyncToken | None = None


class JoinedRoom(msgspec.Struct, frozen=True):
    state: list[RoomEvent] = msgspec.field(default_factory=list)
    timeline: Timeline = msgspec.field(default_factory=Timeline)
    account_data: list[Event] = msgspec.field(default_factory=list)
    ephemeral: list[Event] = msgspec.field(default_factory=list)
    summary: dict[str, Any] = msgspec.field(default_factory=dict)
    unread_notifications: dict[str, Any] = msgspec.field(default_factory=dict)

    def account_data_of(self, event_type: str) -> dict[str, Any] | None:
        """The content of this room's account data of ``event_type``, if delivered."""
        for event in reversed(self.account_data):
            if event.type == event_type:
                return event.content
        return None


class InvitedRoom(msgspec.Struct, frozen=True):
    invite_state: list[StrippedStateEvent] = msgspec.field(default_factory=list)


class LeftRoom(msgspec.Struct, frozen=True):
    state: list[RoomEvent] = msgspec.field(default_factory=list)
    timeline: Timeline = msgspec.field(default_factory=Timeline)
    account_data: list[Event] = msgspec.field(default_factory=list)


class Rooms(msgspec.Struct, frozen=True):
    join: dict[RoomID, JoinedRoom] = msgspec.field(default_factory=dict)
    invite: dict[RoomID, InvitedRoom] = msgspec.field(default_factory=dict)
    leave: dict[RoomID, LeftRoom] = msgspec.field(default_factory=dict)
    knock: dict[RoomID, InvitedRoom] = msgspec.field(default_factory=dict)


class SyncResponse(msgspec.Struct, frozen=True):
    next_batch: SyncToken
    rooms: Rooms = msgspec.field(default_factory=Rooms)
    account_data: list[Event] = msgspec.field(default_factory=list)
    presence: list[Event] = msgspec.field(default_factory=list)
    to_device: list[ToDeviceEvent] = msgspec.field(default_factory=list)
    # The end-to-end encryption extensions; entries of the wrong type are dropped
    # (and recorded in ``skipped``), the rest kept. See `matrix_api.models.keys`.
    device_lists: DeviceLists = msgspec.field(default_factory=DeviceLists)
    """Empty on an initial sync: the server only says what changed since ``since``."""
    device_one_time_keys_count: dict[str, int] = msgspec.field(default_factory=dict)
    """Unclaimed one-time keys of this device by algorithm; a missing one has 0."""
    device_unused_fallback_key_types: list[str] | None = None
    """None: the server does not do fallback keys (or sent no list). ``[]``: it
    does, and this device has no unused one (upload a new one)."""
    skipped: list[SkippedEvent] = msgspec.field(default_factory=list)
    """What did not decode, with where and why; empty for a clean response."""


# --- the wire shape: rooms and events left raw -----------------------------------


class _Events(msgspec.Struct):
    events: list[msgspec.Raw] = msgspec.field(default_factory=list)


class _Timeline(msgspec.Struct):
    events: list[msgspec.Raw] = msgspec.field(default_factory=list)
    limited: bool = False
    prev_batch: str | None = None


class _Joined(msgspec.Struct):
    state: _Events = msgspec.field(default_factory=_Events)
    timeline: _Timeline = msgspec.field(default_factory=_Timeline)
    account_data: _Events = msgspec.field(default_factory=_Events)
    ephemeral: _Events = msgspec.field(default_factory=_Events)
    summary: dict[str, Any] = msgspec.field(default_factory=dict)
    unread_notifications: dict[str, Any] = msgspec.field(default_factory=dict)


class _Invited(msgspec.Struct):
    invite_state: _Events = msgspec.field(default_factory=_Events)


class _Knocked(msgspec.Struct):
    knock_state: _Events = msgspec.field(default_factory=_Events)


class _Left(msgspec.Struct):
    state: _Events = msgspec.field(default_factory=_Events)
    timeline: _Timeline = msgspec.field(default_factory=_Timeline)
    account_data: _Events = msgspec.field(default_factory=_Events)


class _Rooms(msgspec.Struct):
    join: dict[str, msgspec.Raw] = msgspec.field(default_factory=dict)
    invite: dict[str, msgspec.Raw] = msgspec.field(default_factory=dict)
    leave: dict[str, msgspec.Raw] = msgspec.field(default_factory=dict)
    knock: dict[str, msgspec.Raw] = msgspec.field(default_factory=dict)


class _Sync(msgspec.Struct):
    next_batch: str
    rooms: _Rooms = msgspec.field(default_factory=_Rooms)
    account_data: _Events = msgspec.field(default_factory=_Events)
    presence: _Events = msgspec.field(default_factory=_Events)
    to_device: _Events = msgspec.field(default_factory=_Events)
    # Any: checked entry by entry after decoding (`.keys`), so a wrong type costs
    # only itself; None is "absent".
    device_lists: Any = None
    device_one_time_keys_count: Any = None
    device_unused_fallback_key_types: Any = None


_sync_decoder = msgspec.json.Decoder(_Sync)
_EVENT_ARRAYS = frozenset({"events"})
_joined_decoder = msgspec.json.Decoder(_Joined)
_invited_decoder = msgspec.json.Decoder(_Invited)
_knocked_decoder = msgspec.json.Decoder(_Knocked)
_left_decoder = msgspec.json.Decoder(_Left)


W = TypeVar("W")


def _each_room(
    raw_rooms: dict[str, msgspec.Raw],
    decoder: msgspec.json.Decoder[W],
    section: str,
    skipped: list[SkippedEvent],
) -> Iterator[tuple[RoomID, str, W]]:
    """Decode each room of one section; one that is not what the spec says is taken
    apart piece by piece (`_piecewise_room`), and left out only if it is no object."""
    for room_id, raw_room in raw_rooms.items():
        where = f"rooms.{section}.{room_id}"
        try:
            room = decoder.decode(raw_room)
        except (msgspec.DecodeError, RecursionError):
            piecewise = _piecewise_room(raw_room, decoder.type, room_id, where, skipped)
            if piecewise is None:
                continue
            room = piecewise
        yield RoomID(room_id), where, room


# --- piece by piece: for an envelope or a room that is not what the spec says ---------
#
# Each part is decoded on its own; a part that fails is recorded and left at its
# default, so one wrong type costs that part only (the events of a room whose
# ``unread_notifications`` is a list are still read). Slower than the typed decoders
# above, and used only when they fail.

_object_of_raw = msgspec.json.Decoder(dict[str, msgspec.Raw])
_list_of_raw = msgspec.json.Decoder(list[msgspec.Raw])
_object = msgspec.json.Decoder(dict[str, Any])
_string = msgspec.json.Decoder(str)
_optional_string = msgspec.json.Decoder(str | None)
_boolean = msgspec.json.Decoder(bool)
_any: msgspec.json.Decoder[Any] = msgspec.json.Decoder()

P = TypeVar("P")


def _part(
    parts: dict[str, msgspec.Raw],
    key: str,
    decoder: msgspec.json.Decoder[P],
    default: P,
    where: str,
    skipped: list[SkippedEvent],
    room_id: str | None = None,
) -> P:
    raw = parts.get(key)
    if raw is None:
        return default
    try:
        return decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError) as exc:
        skipped.append(SkippedEvent(_join(where, key), str(exc), room_id=room_id))
        return default


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _events_part(
    parts: dict[str, msgspec.Raw],
    key: str,
    where: str,
    skipped: list[SkippedEvent],
    room_id: str | None = None,
) -> _Events:
    holder = _part(parts, key, _object_of_raw, {}, where, skipped, room_id)
    return _Events(_part(holder, "events", _list_of_raw, [], _join(where, key), skipped, room_id))


def _timeline_part(
    parts: dict[str, msgspec.Raw], where: str, skipped: list[SkippedEvent], room_id: str
) -> _Timeline:
    timeline = _part(parts, "timeline", _object_of_raw, {}, where, skipped, room_id)
    where = f"{where}.timeline"
    return _Timeline(
        events=_part(timeline, "events", _list_of_raw, [], where, skipped, room_id),
        limited=_part(timeline, "limited", _boolean, False, where, skipped, room_id),
        prev_batch=_part(timeline, "prev_batch", _optional_string, None, where, skipped, room_id),
    )


def _piecewise_room(
    raw: msgspec.Raw, cls: Any, room_id: str, where: str, skipped: list[SkippedEvent]
) -> Any | None:
    """A room of type ``cls`` (`_Joined`, ...) decoded piece by piece; None if ``raw``
    is not even an object."""
    try:
        parts = _object_of_raw.decode(raw)
    except (msgspec.DecodeError, RecursionError) as exc:
        skipped.append(SkippedEvent(where, str(exc), room_id=room_id))
        return None
    if cls is _Invited:
        return _Invited(_events_part(parts, "invite_state", where, skipped, room_id))
    if cls is _Knocked:
        return _Knocked(_events_part(parts, "knock_state", where, skipped, room_id))
    state = _events_part(parts, "state", where, skipped, room_id)
    timeline = _timeline_part(parts, where, skipped, room_id)
    account_data = _events_part(parts, "account_data", where, skipped, room_id)
    if cls is _Left:
        return _Left(state, timeline, account_data)
    return _Joined(
        state,
        timeline,
        account_data,
        _events_part(parts, "ephemeral", where, skipped, room_id),
        _part(parts, "summary", _object, {}, where, skipped, room_id),
        _part(parts, "unread_notifications", _object, {}, where, skipped, room_id),
    )


def _piecewise_sync(body: bytes, skipped: list[SkippedEvent]) -> _Sync:
    """The envelope decoded piece by piece: all that is needed of it is ``next_batch``."""
    top = _object_of_raw.decode(body)  # not an object: unusable (DecodeError)
    if "next_batch" not in top:
        raise msgspec.DecodeError("Object missing required field `next_batch`")
    next_batch = _string.decode(top["next_batch"])
    rooms = _part(top, "rooms", _object_of_raw, {}, "", skipped)
    sections = {
        name: _part(rooms, name, _object_of_raw, {}, "rooms", skipped)
        for name in ("join", "invite", "leave", "knock")
    }
    return _Sync(
        next_batch=next_batch,
        rooms=_Rooms(**sections),
        account_data=_events_part(top, "account_data", "", skipped),
        presence=_events_part(top, "presence", "", skipped),
        to_device=_events_part(top, "to_device", "", skipped),
        device_lists=_part(top, "device_lists", _any, None, "", skipped),
        device_one_time_keys_count=_part(
            top, "device_one_time_keys_count", _any, None, "", skipped
        ),
        device_unused_fallback_key_types=_part(
            top, "device_unused_fallback_key_types", _any, None, "", skipped
        ),
    )


def decode_sync(body: bytes) -> SyncResponse:
    """Decode a /sync response body.

    Raises `msgspec.DecodeError` (and nothing else) when the body is not a JSON
    object with a ``next_batch`` string; anything else that is not what the spec
    says (a room, a section, an event) is skipped and recorded instead.
    """
    skipped: list[SkippedEvent] = []
    wire = decode_mended(_sync_decoder, body, skipped, _EVENT_ARRAYS, _piecewise_sync)

    def events(
        raws: list[msgspec.Raw], cls: type[E], where: str, room_id: str | None = None
    ) -> list[E]:
        return decode_events(raws, cls, where, skipped, room_id=room_id)

    def timeline(raw: _Timeline, where: str, room_id: str) -> Timeline:
        return Timeline(
            events=events(raw.events, RoomEvent, where, room_id),
            limited=raw.limited,
            prev_batch=SyncToken(raw.prev_batch) if raw.prev_batch is not None else None,
        )

    join = {
        room_id: JoinedRoom(
            state=events(room.state.events, RoomEvent, f"{where}.state", room_id),
            timeline=timeline(room.timeline, f"{where}.timeline", room_id),
            account_data=events(room.account_data.events, Event, f"{where}.account_data"),
            ephemeral=events(room.ephemeral.events, Event, f"{where}.ephemeral"),
            summary=room.summary,
            unread_notifications=room.unread_notifications,
        )
        for room_id, where, room in _each_room(wire.rooms.join, _joined_decoder, "join", skipped)
    }
    invite = {
        room_id: InvitedRoom(
            invite_state=events(
                room.invite_state.events, StrippedStateEvent, f"{where}.invite_state"
            )
        )
        for room_id, where, room in _each_room(
            wire.rooms.invite, _invited_decoder, "invite", skipped
        )
    }
    knock = {
        room_id: InvitedRoom(
            invite_state=events(room.knock_state.events, StrippedStateEvent, f"{where}.knock_state")
        )
        for room_id, where, room in _each_room(wire.rooms.knock, _knocked_decoder, "knock", skipped)
    }
    leave = {
        room_id: LeftRoom(
            state=events(room.state.events, RoomEvent, f"{where}.state", room_id),
            timeline=timeline(room.timeline, f"{where}.timeline", room_id),
            account_data=events(room.account_data.events, Event, f"{where}.account_data"),
        )
        for room_id, where, room in _each_room(wire.rooms.leave, _left_decoder, "leave", skipped)
    }

    return SyncResponse(
        next_batch=SyncToken(wire.next_batch),
        rooms=Rooms(join=join, invite=invite, leave=leave, knock=knock),
        account_data=events(wire.account_data.events, Event, "account_data"),
        presence=events(wire.presence.events, Event, "presence"),
        to_device=events(wire.to_device.events, ToDeviceEvent, "to_device"),
        device_lists=device_lists_from(wire.device_lists, "device_lists", skipped),
        device_one_time_keys_count=key_counts_from(
            wire.device_one_time_keys_count, "device_one_time_keys_count", skipped
        ),
        device_unused_fallback_key_types=key_types_from(
            wire.device_unused_fallback_key_types, "device_unused_fallback_key_types", skipped
        ),
        skipped=skipped,
    )
