"""Encrypted inbox items, decrypted when their lane takes them up.

The inbox keeps the ciphertext (the store holds no plaintext the bot did not need
to keep); each attempt decrypts again, which the replay protection allows for the
same event id. A message whose room key has not arrived waits in its lane, without
polling, until a sync batch brings room keys, for at most `KEY_WAIT_MS` after it was
sent (on the server's clock, so a restart does not start the wait over). A message
sent before the bot's device had keys (after a lost store) could only be read with a
key from the key backup: it waits until the backup was opened and restored from (at
most `BACKUP_WAIT_S`), then is tried once more.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import trio

from matrix_api import MatrixClient
from matrix_api.models import RoomEvent, RoomID
from matrix_crypto.errors import CryptoError, MissingRoomKey, UnverifiedSender

from ..store import InboxItem
from .crypto import BotCrypto

__all__ = ["BACKUP_WAIT_S", "KEY_WAIT_MS", "decrypted_event", "decrypted_now"]

# How long a message may wait for its room key (the sender's device sends it just
# before the message; a key later than this is not coming).
KEY_WAIT_MS = 10 * 60 * 1000
# How long such a message waits for the key backup to be restored from (a few
# requests after start; a homeserver that does not answer is not waited for longer).
BACKUP_WAIT_S = 5 * 60


async def decrypted_event(crypto: BotCrypto, client: MatrixClient, item: InboxItem) -> RoomEvent:
    """The decrypted form of ``item``'s ``m.room.encrypted`` event: same id, sender
    and time, the plaintext's type and content.

    Raises `MissingRoomKey` when the key did not arrive in time, and
    `matrix_crypto.errors.DecryptionError` when the event can never be decrypted.
    """
    event = item.event
    await crypto.ensure_devices([event.sender])
    raw = msgspec.to_builtins(event)
    raw["room_id"] = item.room_id
    checked_devices = False
    waited_for_backup = False
    while True:
        try:
            plain = crypto.machine.decrypt_room_event(item.room_id, raw)
        except UnverifiedSender:
            if checked_devices:
                raise
            # Perhaps a device the bot has not heard of yet: asked about once more.
            checked_devices = True
            await crypto.ensure_devices([event.sender])
            continue
        except MissingRoomKey:
            if event.origin_server_ts < crypto.published_ms:
                # Sent before this device had keys: its key was never sent to it, and
                # only the backup may hold it.
                if waited_for_backup or crypto.backup_settled.is_set():
                    raise
                waited_for_backup = True
                with trio.move_on_after(BACKUP_WAIT_S):
                    await crypto.backup_settled.wait()
                continue
            now_ms = client.server_time_ms() or int(time.time() * 1000)
            # A timestamp from the future (forged, or a skewed clock) waits no longer.
            left_ms = min(event.origin_server_ts + KEY_WAIT_MS - now_ms, KEY_WAIT_MS)
            if left_ms <= 0:
                raise
            with trio.move_on_after(left_ms / 1000):
                await crypto.room_keys_arrived.wait()
            continue
        return _with_plaintext(event, item.room_id, plain.type, plain.content)


async def decrypted_now(
    crypto: BotCrypto, room_id: RoomID, event: RoomEvent, *, asked: set[str]
) -> RoomEvent | None:
    """``event`` decrypted with the keys at hand, or None (an earlier message read
    again for context: no key is waited for, and one that cannot be read is left out).

    The sender's devices are checked as for a live message: a device not known yet (the
    bot's own old device after a lost store, a member who has not written since the
    start) is asked about once per sender in ``asked``, which the caller keeps for one
    read of the room. Raises `matrix_api.MatrixAPIError` when that question fails.
    """
    raw = msgspec.to_builtins(event)
    raw["room_id"] = room_id
    while True:
        try:
            plain = crypto.machine.decrypt_room_event(room_id, raw)
        except UnverifiedSender:
            if event.sender in asked:
                return None
            asked.add(event.sender)
            await crypto.ensure_devices([event.sender])
            continue
        except CryptoError:
            return None
        return _with_plaintext(event, room_id, plain.type, plain.content)


def _with_plaintext(
    event: RoomEvent, room_id: RoomID, event_type: str, content: dict[str, Any]
) -> RoomEvent:
    return RoomEvent(
        type=event_type,
        event_id=event.event_id,
        sender=event.sender,
        origin_server_ts=event.origin_server_ts,
        content=content,
        unsigned=event.unsigned,
        room_id=room_id,
    )
