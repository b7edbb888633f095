"""Matrix identifiers as distinct static types.

They are plain strings at run time; the types only stop a room id being passed
where an event id belongs. Nothing here validates grammar: the server does.
"""

from __future__ import annotations

from typing import NewType

__all__ = ["EventID", "FilterID", "RoomAlias", "RoomID", "SyncToken", "UserID"]

UserID = NewType("UserID", str)
"""``@localpart:server``"""
RoomID = NewType("RoomID", str)
"""``!opaque:server`` (or ``!opaque`` in room version 12)"""
RoomAlias = NewType("RoomAlias", str)
"""``#alias:server``"""
EventID = NewType("EventID", str)
"""``$opaque``; from room version 3 on it may contain ``/`` and ``+``."""
SyncToken = NewType("SyncToken", str)
"""An opaque ``next_batch`` / ``since`` / pagination token."""
FilterID = NewType("FilterID", str)
