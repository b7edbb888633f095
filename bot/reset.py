"""``python -m bot reset``: start over, locally or on the homeserver.

* ``--local`` deletes the store file (and its WAL files), unless a bot has it
  open. The next start rebuilds the chats from the server's markers; nothing on
  the server changes.
* ``--server`` clears the bot's markers and leaves and forgets every room and Space
  it manages, so a development homeserver is clean again. It only prints what it
  would do unless ``--yes`` is given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from matrix_api import MatrixAPIError, MatrixClient, NotFound
from matrix_api.models import RoomID

from . import __version__
from .chats import CHAT_MARKER, SPACE_MARKER
from .config import Settings
from .intake import full_state_sync
from .session import authenticate
from .store_lock import StoreLock, StoreLockHeld

__all__ = ["ManagedRoom", "managed_rooms", "reset_local", "reset_server"]


def store_files(store_path: Path) -> list[Path]:
    """The store and the WAL files SQLite keeps beside it."""
    candidates = [store_path, *(Path(f"{store_path}{suffix}") for suffix in ("-wal", "-shm"))]
    return [path for path in candidates if path.exists()]


def reset_local(
    store_path: Path, confirm: Callable[[str], bool], say: Callable[[str], None]
) -> int:
    files = store_files(store_path)
    if not files:
        say(f"No local store at {store_path}; nothing to do.")
        return 0
    try:
        # Held to the end: no bot starts on the store while it is being deleted.
        lock = StoreLock.try_acquire(store_path)
    except StoreLockHeld as exc:
        say(f"Not deleted: {exc}. Stop the bot first.")
        return 1
    with lock:
        listing = ", ".join(str(path) for path in files)
        question = (
            f"Delete the local store ({listing})? The next start rebuilds it, as a new "
            "encryption device (the old device's keys are in the store)."
        )
        if not confirm(question):
            say("Nothing deleted.")
            return 1
        for path in files:
            path.unlink()
    say(f"Deleted {listing}. The next start restores the chats from the server.")
    return 0


@dataclass(frozen=True, slots=True)
class ManagedRoom:
    room_id: RoomID
    kind: str  # "chat" | "space"
    marker_type: str


async def managed_rooms(client: MatrixClient, bot_user_id: str) -> list[ManagedRoom]:
    """Every joined room carrying one of the bot's markers, from one full-state sync."""
    response = await full_state_sync(client, bot_user_id)
    found = []
    for room_id, room in response.rooms.join.items():
        if room.account_data_of(SPACE_MARKER):
            found.append(ManagedRoom(room_id, "space", SPACE_MARKER))
        elif room.account_data_of(CHAT_MARKER):
            found.append(ManagedRoom(room_id, "chat", CHAT_MARKER))
    return found


# What `reset_server` leaves on the server, said each time it runs.
KEPT_ON_SERVER = (
    "Kept on the server: the bot's devices and their encryption keys, the account's "
    "cross-signing keys and its secret storage (the recovery key still opens them), and "
    "the rooms' history. Kept here: the local store and its key files (reset --local "
    "deletes the store)."
)


async def reset_server(settings: Settings, *, apply: bool, say: Callable[[str], None]) -> int:
    say(KEPT_ON_SERVER)
    async with MatrixClient(
        settings.homeserver,
        access_token=settings.access_token,
        user_id=settings.user_id,
        user_agent=f"surfaces-bot/{__version__} reset",
    ) as client:
        await authenticate(client, settings)
        rooms = await managed_rooms(client, settings.user_id)
        if not rooms:
            say("The bot manages no rooms on this homeserver; nothing to do.")
            return 0
        verb = "Clearing" if apply else "Would clear"
        # Chats first, then Spaces, so no Space is left pointing at a room mid-way.
        rooms.sort(key=lambda room: room.kind == "space")
        failures = 0
        for room in rooms:
            say(f"{verb} the marker of {room.kind} {room.room_id}, leave and forget it.")
            if not apply:
                continue
            try:
                await client.put_room_account_data(room.room_id, room.marker_type, {})
                await client.leave_room(room.room_id)
                await client.forget_room(room.room_id)
            except NotFound:
                say(f"  {room.room_id} is already gone.")
            except MatrixAPIError as exc:
                failures += 1
                say(f"  failed: {exc}")
        if not apply:
            say(f"Dry run: {len(rooms)} room(s). Run again with --yes to do it.")
            return 0
        say(f"Done: {len(rooms) - failures} of {len(rooms)} room(s) released.")
        return 1 if failures else 0
