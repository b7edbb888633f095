"""Rebuild the local chat map from the server's markers.

Reconciliation only ever *reads* the server and rewrites the local cache: it never
creates a room or a Space, never writes a marker, and never invents a chat id. What
it cannot settle it reports (skips and conflicts) and startup goes on; a room it
could not settle stays unrouted, and a message there triggers `reconcile_single_room`.

It works from the initial full-state /sync, which carries every joined room's
account data, so its request count does not grow with the number of rooms (one
``joined_rooms`` call at most, to confirm rooms that seem to be gone).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog

from matrix_api import MatrixAPIError, MatrixClient, NotFound
from matrix_api.models import RoomID, SyncResponse

from .chats import (
    CHAT_MARKER,
    SPACE_MARKER,
    Chat,
    MarkerError,
    chat_from_marker,
    space_owner_from_marker,
)
from .store_api import BotStore

__all__ = [
    "ReconcileReport",
    "RepairReport",
    "RoomNote",
    "reconcile_matrix_state",
    "reconcile_single_room",
]

log = structlog.get_logger("bot.reconcile")

SkipReason = Literal["no_marker", "bad_marker"]
ConflictKind = Literal["duplicate_chat_id", "duplicate_space", "local_disagrees", "room_left"]


@dataclass(frozen=True, slots=True)
class RoomNote:
    """One room's line in a report: what happened and why."""

    room_id: str
    chat_id: str | None
    reason: str
    detail: str = ""


@dataclass
class ReconcileReport:
    rooms_seen: int = 0
    restored: list[RoomNote] = field(default_factory=list)
    """Chats taken from server markers that the local store did not have."""
    known: list[RoomNote] = field(default_factory=list)
    """Chats the store already had exactly as the server has them."""
    updated: list[RoomNote] = field(default_factory=list)
    """Chats whose local copy differed in title, owner or archived flag (server wins)."""
    skipped: list[RoomNote] = field(default_factory=list)
    """Joined rooms without a usable marker; left unrouted."""
    conflicts: list[RoomNote] = field(default_factory=list)
    """Two rooms claiming one chat id, a local mapping the server contradicts, or a
    stored chat whose room the bot is no longer in."""
    pending_invites: int = 0
    spaces: int = 0
    """Users' Spaces found by their markers."""
    duration_ms: float = 0.0

    def log_fields(self) -> dict[str, Any]:
        """The structured fields of the ``matrix_reconcile_complete`` log event."""
        return {
            "rooms_seen": self.rooms_seen,
            "restored": len(self.restored),
            "known": len(self.known),
            "updated": len(self.updated),
            "skipped": len(self.skipped),
            "conflicts": len(self.conflicts),
            "pending_invites": self.pending_invites,
            "spaces": self.spaces,
            "duration_ms": round(self.duration_ms, 1),
            # Counts always; room lists bounded, so a bot in 300 foreign rooms logs one
            # readable line (the counts above say how many were left out).
            "skipped_rooms": [_note_fields(n) for n in self.skipped[:LOGGED_ROOMS]],
            "conflict_rooms": [_note_fields(n) for n in self.conflicts[:LOGGED_ROOMS]],
        }


LOGGED_ROOMS = 20
"""Most rooms of each kind (skipped, conflicts) named in the reconciliation log line."""


def _note_fields(note: RoomNote) -> dict[str, str | None]:
    return {
        "room_id": note.room_id,
        "chat_id": note.chat_id,
        "reason": note.reason,
        "detail": note.detail,
    }


async def reconcile_matrix_state(
    client: MatrixClient, store: BotStore, initial_sync: SyncResponse
) -> ReconcileReport:
    """Make the store's chats match the markers in ``initial_sync`` (a full-state sync).

    Returns the report; raises only what the store or the one confirming request
    raise (the caller treats those as fatal).
    """
    started = time.perf_counter()
    report = ReconcileReport(
        rooms_seen=len(initial_sync.rooms.join),
        pending_invites=len(initial_sync.rooms.invite),
    )

    # 1. Read every joined room's marker.
    claims: dict[str, list[Chat]] = {}
    space_claims: dict[str, list[RoomID]] = {}
    for room_id, room in initial_sync.rooms.join.items():
        space_content = room.account_data_of(SPACE_MARKER)
        if space_content:
            try:
                owner = space_owner_from_marker(space_content)
            except MarkerError as exc:
                report.skipped.append(RoomNote(room_id, None, "bad_marker", f"space: {exc}"))
                continue
            space_claims.setdefault(owner, []).append(room_id)
            continue
        content = room.account_data_of(CHAT_MARKER)
        if content is None:
            report.skipped.append(RoomNote(room_id, None, "no_marker"))
            continue
        try:
            chat = chat_from_marker(room_id, content)
        except MarkerError as exc:
            report.skipped.append(RoomNote(room_id, None, "bad_marker", str(exc)))
            continue
        claims.setdefault(chat.chat_id, []).append(chat)

    # 2. One Space per owner and one room per chat id, chosen the same way: the room
    #    the store already has, else the lowest room id, so every restart agrees.
    spaces: dict[str, RoomID] = {}
    for owner, rooms in space_claims.items():
        known = store.space_for(owner)
        rooms.sort(key=lambda r: (r != known, r))
        spaces[owner], *extra = rooms
        report.conflicts.extend(
            RoomNote(r, None, "duplicate_space", f"{owner} keeps {spaces[owner]}") for r in extra
        )

    # 2b. One room per chat id. Prefer the room the store already maps; otherwise the
    #    lowest room id, so every restart picks the same one.
    server_chats: dict[RoomID, Chat] = {}
    for chat_id, candidates in claims.items():
        local = store.chat_by_id(chat_id)
        candidates.sort(key=lambda c: (local is None or c.room_id != local.room_id, c.room_id))
        winner, *losers = candidates
        server_chats[winner.room_id] = winner
        for loser in losers:
            report.conflicts.append(
                RoomNote(
                    loser.room_id,
                    chat_id,
                    "duplicate_chat_id",
                    f"chat id also claimed by {winner.room_id}, which keeps it",
                )
            )

    # 3. Compare with the store.
    put: list[Chat] = []
    remove: list[str] = []
    for room_id, chat in server_chats.items():
        local = store.chat_for_room(room_id)
        if local == chat:
            report.known.append(RoomNote(room_id, chat.chat_id, "known"))
            continue
        put.append(chat)
        if local is None:
            report.restored.append(RoomNote(room_id, chat.chat_id, "restored"))
        elif local.chat_id != chat.chat_id:
            report.conflicts.append(
                RoomNote(
                    room_id,
                    chat.chat_id,
                    "local_disagrees",
                    f"store had chat {local.chat_id} here; the server marker wins",
                )
            )
        else:
            report.updated.append(RoomNote(room_id, chat.chat_id, "updated"))

    # 4. Stored chats whose room the sync did not show as a managed joined room.
    missing = [c for c in store.chats() if c.room_id not in server_chats]
    if missing:
        joined = await _joined_rooms(client, initial_sync)
        for chat in missing:
            if any(p.chat_id == chat.chat_id for p in put):
                continue  # moved to another room by the server's markers
            if chat.room_id in joined:
                # Joined but unmarked: the marker was removed on the server.
                report.conflicts.append(
                    RoomNote(
                        chat.room_id,
                        chat.chat_id,
                        "local_disagrees",
                        "the room has no marker on the server any more; dropped locally",
                    )
                )
            else:
                report.conflicts.append(
                    RoomNote(chat.room_id, chat.chat_id, "room_left", "the bot is not in the room")
                )
            remove.append(chat.chat_id)

    if put or remove:
        await store.apply_chats(put=put, remove=remove)
    known_spaces = store.spaces()
    report.spaces = len(spaces)
    stale_spaces = [owner for owner in known_spaces if owner not in spaces]
    if spaces != known_spaces:
        await store.apply_spaces(put=spaces, remove=stale_spaces)
    report.duration_ms = (time.perf_counter() - started) * 1000
    return report


async def _joined_rooms(client: MatrixClient, initial_sync: SyncResponse) -> set[str]:
    # A full-state sync lists every joined room, but confirming costs one request and
    # keeps a stale local chat from being dropped on a server that trims its answer.
    try:
        return set(await client.joined_rooms())
    except MatrixAPIError as exc:
        log.warning("reconcile_joined_rooms_failed", error=str(exc))
        return set(initial_sync.rooms.join)


@dataclass(frozen=True, slots=True)
class RepairReport:
    """The outcome of `reconcile_single_room`."""

    room_id: str
    ok: bool
    chat_id: str | None = None
    reason: str = ""

    def log_fields(self) -> dict[str, Any]:
        return {"ok": self.ok, "chat_id": self.chat_id, "reason": self.reason}


async def reconcile_single_room(
    client: MatrixClient, store: BotStore, room_id: RoomID, sender: str
) -> RepairReport:
    """Restore one room's chat from its marker on the server; never creates anything.

    Never raises for a server answer: a missing marker, an unreadable one, a chat id
    that another room holds, or a failed request all come back as ``ok=False`` with
    the reason.
    """
    del sender  # the marker alone decides; the caller logs who asked
    try:
        content = await client.get_room_account_data(room_id, CHAT_MARKER)
    except NotFound:
        return RepairReport(room_id, ok=False, reason="no chat marker on the server")
    except MatrixAPIError as exc:
        return RepairReport(room_id, ok=False, reason=f"could not read the marker: {exc}")
    try:
        chat = chat_from_marker(room_id, content)
    except MarkerError as exc:
        return RepairReport(room_id, ok=False, reason=f"unreadable marker: {exc}")
    holder = store.chat_by_id(chat.chat_id)
    if holder is not None and holder.room_id != room_id:
        return RepairReport(
            room_id,
            ok=False,
            chat_id=chat.chat_id,
            reason=f"chat id {chat.chat_id} is held by room {holder.room_id}",
        )
    await store.apply_chats(put=[chat])
    return RepairReport(room_id, ok=True, chat_id=chat.chat_id, reason="restored from marker")
