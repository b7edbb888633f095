"""Answers of the server-side key backup endpoints (``/room_keys/...``).

A backup version's ``auth_data`` and each session's backed-up key data stay plain
dicts exactly as decoded: the crypto layer checks the signatures on ``auth_data``
and decrypts ``session_data``. The maps around the sessions are checked like the
key maps of `matrix_api.models.keys`: an entry of the wrong type is dropped and
recorded in ``skipped``; a part the spec requires that is missing or of the wrong
type fails the whole answer (`msgspec.DecodeError`, raised by the client as
`BadResponse`).
"""

from __future__ import annotations

from typing import Any

import msgspec

from .events import SkippedEvent
from .identifiers import RoomID
from .mending import decode_mended

__all__ = [
    "KeyBackupVersion",
    "RoomKeys",
    "RoomKeysUpdate",
    "decode_backup_created",
    "decode_backup_version",
    "decode_room_keys",
    "decode_room_keys_update",
]


class KeyBackupVersion(msgspec.Struct, frozen=True):
    """A backup version, ``GET /room_keys/version[/{version}]``.

    ``auth_data`` is raw (for ``m.megolm_backup.v1.curve25519-aes-sha2``: the
    ``public_key`` and its ``signatures``); ``count`` and ``etag`` describe the keys
    stored: another client changed the backup when the etag moved.
    """

    version: str
    algorithm: str
    auth_data: dict[str, Any]
    count: int
    etag: str


class RoomKeysUpdate(msgspec.Struct, frozen=True):
    """The answer to storing keys: the backup's new ``etag`` and key ``count``."""

    etag: str
    count: int


class RoomKeys(msgspec.Struct, frozen=True):
    """``GET /room_keys/keys``: ``rooms[room_id][session_id]`` is the backed-up key
    data (``first_message_index``, ``forwarded_count``, ``is_verified``,
    ``session_data``), raw."""

    rooms: dict[RoomID, dict[str, dict[str, Any]]] = msgspec.field(default_factory=dict)
    skipped: list[SkippedEvent] = msgspec.field(default_factory=list)


_object = msgspec.json.Decoder(dict[str, Any])


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _field(top: dict[str, Any], key: str, kind: type) -> Any:
    value = top.get(key)
    # bool is an int to Python, not to JSON.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise msgspec.DecodeError(f"`{key}` must be {kind.__name__}, got {_type_name(value)}")
    return value


def _count(top: dict[str, Any]) -> int:
    count: int = _field(top, "count", int)
    if count < 0:
        raise msgspec.DecodeError("`count` must be at least 0")
    return count


def decode_backup_created(body: bytes) -> str:
    """``POST /room_keys/version``: the new version (a string, required)."""
    version: str = _field(_object.decode(body), "version", str)
    return version


def decode_backup_version(body: bytes) -> KeyBackupVersion:
    top = _object.decode(body)
    return KeyBackupVersion(
        version=_field(top, "version", str),
        algorithm=_field(top, "algorithm", str),
        auth_data=_field(top, "auth_data", dict),
        count=_count(top),
        etag=_field(top, "etag", str),
    )


def decode_room_keys_update(body: bytes) -> RoomKeysUpdate:
    top = _object.decode(body)
    return RoomKeysUpdate(etag=_field(top, "etag", str), count=_count(top))


def decode_room_keys(body: bytes) -> RoomKeys:
    """The whole backup: each room's ``sessions``; a room or session that is not an
    object is dropped and recorded, a value nested too deep or a lone surrogate is
    mended and recorded (`decode_mended`)."""
    skipped: list[SkippedEvent] = []
    top = decode_mended(_object, body, skipped, ())
    by_room = _field(top, "rooms", dict)
    rooms: dict[RoomID, dict[str, dict[str, Any]]] = {}
    for room_id, room in by_room.items():
        sessions = room.get("sessions") if isinstance(room, dict) else None
        if not isinstance(sessions, dict):
            skipped.append(SkippedEvent(f"rooms.{room_id}", "no sessions object"))
            continue
        kept: dict[str, dict[str, Any]] = {}
        for session_id, data in sessions.items():
            if isinstance(data, dict):
                kept[session_id] = data
            else:
                skipped.append(
                    SkippedEvent(
                        f"rooms.{room_id}.sessions.{session_id}",
                        f"not an object: {_type_name(data)}",
                    )
                )
        rooms[RoomID(room_id)] = kept
    return RoomKeys(rooms, skipped)
