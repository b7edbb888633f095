"""Server-side key backup (``/room_keys/...``): backup versions and the room keys
stored in one.

Keys go up and come back as plain dicts: encrypting ``session_data`` and signing
``auth_data`` are the crypto layer's work.

Which of these a retry may repeat (`Request.idempotent`, see `matrix_api.retry`):

- ``POST /room_keys/version``: no. Each call creates a new version and makes it the
  current one: a retry after a lost answer would leave the first one a stray. After
  an error the caller looks at `get_key_backup` before creating another.
- ``GET`` of a version or of the keys: yes.
- ``PUT /room_keys/keys``: yes. The server keeps, per session, the better of the
  key it holds and the one sent: the same key twice is stored once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import MatrixError, NotFound
from ..http import LARGE_ANSWER_LIMITS, HTTPCore, Request
from ..models.identifiers import RoomID
from ..models.key_backup import (
    KeyBackupVersion,
    RoomKeys,
    RoomKeysUpdate,
    decode_backup_created,
    decode_backup_version,
    decode_room_keys,
    decode_room_keys_update,
)
from ..paths import CLIENT_V3, client_path

__all__ = ["MEGOLM_BACKUP_V1", "KeyBackupEndpoints", "WrongRoomKeysVersion"]

MEGOLM_BACKUP_V1 = "m.megolm_backup.v1.curve25519-aes-sha2"


class WrongRoomKeysVersion(MatrixError):
    """403: the backup version named is not the current one (another client made a
    new backup).

    ``current_version`` is what the server put in the answer, if a string. Do not
    act on it: Synapse names the stale version sent, not the current one (its
    ``e2e_room_keys.upload_room_keys`` overwrites the current version's info before
    raising; seen on Synapse 1.163, tests/integration/test_matrix_api_key_backup.py).
    Ask `get_key_backup` for the current version.
    """

    errcode = "M_WRONG_ROOM_KEYS_VERSION"

    @property
    def current_version(self) -> str | None:
        version = self.body.get("current_version")
        return version if isinstance(version, str) else None


class KeyBackupEndpoints(HTTPCore):
    async def create_key_backup(
        self, auth_data: Mapping[str, Any], *, algorithm: str = MEGOLM_BACKUP_V1
    ) -> str:
        """``POST /room_keys/version``: a new backup version, which becomes the
        current one; returns its version. Not retried (see the module docstring)."""
        body = {"algorithm": algorithm, "auth_data": auth_data}
        request = Request("POST", f"{CLIENT_V3}/room_keys/version", body=body)
        return await self.send(request, decode_backup_created)

    async def get_key_backup(self, version: str | None = None) -> KeyBackupVersion | None:
        """``GET /room_keys/version[/{version}]``: the current backup version (or
        ``version``), None when there is none (404 ``M_NOT_FOUND``)."""
        parts = ("room_keys", "version") if version is None else ("room_keys", "version", version)
        try:
            return await self.send(
                Request("GET", client_path(CLIENT_V3, *parts)), decode_backup_version
            )
        except NotFound:
            return None

    async def put_room_keys(
        self, version: str, rooms: Mapping[RoomID, Mapping[str, Mapping[str, Any]]]
    ) -> RoomKeysUpdate:
        """``PUT /room_keys/keys?version=``: store ``rooms[room_id][session_id]``
        (each the key backup data: ``first_message_index``, ``forwarded_count``,
        ``is_verified``, ``session_data``) in backup ``version``.

        Raises `WrongRoomKeysVersion` when ``version`` is no longer the current
        backup, `NotFound` when it does not exist.
        """
        body = {"rooms": {room: {"sessions": dict(sessions)} for room, sessions in rooms.items()}}
        request = Request(
            "PUT", f"{CLIENT_V3}/room_keys/keys", query={"version": version}, body=body
        )
        return await self.send(request, decode_room_keys_update)

    async def get_room_keys(self, version: str) -> RoomKeys:
        """``GET /room_keys/keys?version=``: every key in backup ``version``;
        `NotFound` when there is no such backup."""
        request = Request(
            "GET",
            f"{CLIENT_V3}/room_keys/keys",
            query={"version": version},
            # Grows with every room key the account ever backed up.
            limits=LARGE_ANSWER_LIMITS,
        )
        return await self.send(request, decode_room_keys)
