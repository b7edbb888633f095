"""Server-side key backup: every room key the bot holds is kept, encrypted, on the
homeserver, and a bot that lost its store reads its encrypted rooms' past again.

Opened once the bot takes messages, after cross-signing (`open_key_backup`):

* The backup key (the private half) is kept in the store encrypted with the pickle
  key, and in the account's secret storage as ``m.megolm_backup.v1`` under the
  operator's recovery key, both *before* the backup version is created: a crash
  after the creation finds the key again and adopts that version.
* A store that has no backup key, on an account that has a backup, reads the key
  from secret storage and restores every room key from the backup (a lost store, or
  the first start with backup on an existing account). Entries the bot wrote carry
  the backup's own MAC (MSC4048), so they restore trusted; others stay untrusted.
* Then `KeyBackup.run` backs up each inbound session the backup does not yet hold
  as good a copy of (new, an earlier first index, newly trusted), in batches. Which
  copy the backup holds is recorded per session (crypto rows of kind ``backup``:
  "version:first index:trusted", written apart from the machine's state) after the
  server took it: restart-safe, and a new version starts over.

Nothing here stops the bot: a failure is logged once with what to do, and the bot
works without a backup (a lost store then cannot read its rooms' past).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import trio

from matrix_api import MatrixAPIError, MatrixClient, NotFound
from matrix_api.endpoints.key_backup import WrongRoomKeysVersion
from matrix_api.models import RoomID
from matrix_api.retry import Backoff
from matrix_crypto import backup
from matrix_crypto.backup import BackupKey
from matrix_crypto.cross_signing import decrypt_secret, encrypt_secret
from matrix_crypto.errors import CryptoError

from .crypto import BotCrypto
from .secret_storage import default_storage_key, read_secret, storage_key_for_secret

__all__ = [
    "BACKUP_BATCH_DELAY_S",
    "MARKER_KIND",
    "KeyBackup",
    "describe_backup",
    "open_key_backup",
]

log = structlog.get_logger("bot.e2ee")

# own row: {"version", "public_key", "key": the private key sealed with the pickle key}
KEY_ROW = "key_backup"
MARKER_KIND = "backup"
# The pickle-key encryption of the stored backup key (a name, not a secret).
_SEAL_NAME = "surfaces-bot.key_backup.v1"
# Room keys of one burst go up together; a batch is bounded for the request's size.
BACKUP_BATCH_DELAY_S = 1.0
BATCH_SESSIONS = 100
RESTORE_CHUNK = 100
# After a failed upload (the request's own retries spent): the project's one backoff.
BACKUP_BACKOFF = Backoff(max_attempts=None, base_delay=5.0, max_delay=300.0)

SessionKey = tuple[str, str, str]  # (room_id, sender_curve25519, session_id)


@dataclass(frozen=True)
class _Opened:
    key: BackupKey = field(repr=False)
    version: str
    restored: dict[SessionKey, str] = field(default_factory=dict)
    """The markers a restore wrote: what came from the backup is in it already."""


async def open_key_backup(
    crypto: BotCrypto, *, pickle_key: bytes, recovery_key: str | None, store_path: Path
) -> KeyBackup | None:
    """The backup to keep room keys in (restored from first when the store is new to
    it), or None when it cannot be used (logged). Sets ``crypto.backup_settled``."""
    try:
        opened = await _open(crypto, pickle_key, recovery_key, store_path)
    except (MatrixAPIError, CryptoError, ValueError) as exc:
        log.warning("key_backup_failed", reason=f"{type(exc).__name__}: {exc}")
        opened = None
    finally:
        crypto.backup_settled.set()
    if opened is None:
        return None
    # The markers as read when the crypto was opened (nothing wrote any since, but a
    # restore), not a second read of the whole crypto table.
    markers = {
        key: value
        for raw, value in crypto.opened_rows.get(MARKER_KIND, {}).items()
        if (key := _session_key(raw)) is not None
    }
    markers.update(opened.restored)
    return KeyBackup(crypto, opened.key, opened.version, markers)


async def _open(
    crypto: BotCrypto, pickle_key: bytes, recovery_key: str | None, store_path: Path
) -> _Opened | None:
    client = crypto.client
    stored_version, key = _stored(crypto, pickle_key)
    current = await client.get_key_backup()
    if current is not None and current.algorithm != backup.ALGORITHM:
        log.warning(
            "key_backup_unavailable",
            reason=f"the account's backup uses {current.algorithm[:64]!r}, not {backup.ALGORITHM}",
        )
        return None
    if current is not None and key is not None and key.matches(current.auth_data):
        if current.version != stored_version:
            await _keep(crypto, key, current.version, pickle_key)
            log.info("key_backup_adopted", version=current.version)
        return _Opened(key, current.version)
    if current is not None:
        # The account has a backup this store has no key for: from secret storage.
        storage = await default_storage_key(client, recovery_key, store_path)
        secret = None if storage is None else await read_secret(client, storage, backup.SECRET_NAME)
        restored_key = BackupKey.from_base64(secret) if secret is not None else None
        if restored_key is None or not restored_key.matches(current.auth_data):
            log.warning(
                "key_backup_unavailable",
                reason="the account has a key backup whose key is not in secret storage "
                "under this recovery key; room keys are not backed up",
                fix="configure the MATRIX_RECOVERY_KEY that was used when it was made, "
                "or delete the backup version in a client",
            )
            return None
        await _keep(crypto, restored_key, current.version, pickle_key)
        restored = await _restore(crypto, restored_key, current.version)
        return _Opened(restored_key, current.version, restored)
    # No backup yet: the key is kept (here and in secret storage) before the version
    # that needs it exists.
    if key is None:
        key = BackupKey.create()
        await _keep(crypto, key, None, pickle_key)
    storage = await storage_key_for_secret(client, recovery_key, store_path)
    await client.put_account_data(
        backup.SECRET_NAME, storage.encrypt(backup.SECRET_NAME, key.to_base64())
    )
    version = await client.create_key_backup(
        key.signed_auth_data(crypto.machine.user_id, _signers(crypto))
    )
    await _keep(crypto, key, version, pickle_key)
    log.info("key_backup_created", version=version)
    return _Opened(key, version)


def _signers(crypto: BotCrypto) -> list[backup.AuthDataSigner]:
    # The device's signature: the spec's way to say which device made it.
    return [crypto.machine.sign]


def _stored(crypto: BotCrypto, pickle_key: bytes) -> tuple[str | None, BackupKey | None]:
    row = crypto.own.get(KEY_ROW)
    if row is None:
        return None, None
    try:
        value = json.loads(row)
        version = value["version"]
        key = BackupKey.from_base64(decrypt_secret(pickle_key, _SEAL_NAME, value["key"]))
    except (ValueError, TypeError, KeyError, CryptoError) as exc:
        raise CryptoError(f"the stored backup key does not read: {type(exc).__name__}") from exc
    return (version if isinstance(version, str) else None), key


async def _keep(crypto: BotCrypto, key: BackupKey, version: str | None, pickle_key: bytes) -> None:
    sealed = encrypt_secret(pickle_key, _SEAL_NAME, key.to_base64())
    row = {"version": version, "public_key": key.public_key, "key": sealed}
    await crypto.keep(KEY_ROW, json.dumps(row))


async def _restore(crypto: BotCrypto, key: BackupKey, version: str) -> dict[SessionKey, str]:
    machine = crypto.machine
    answer = await crypto.client.get_room_keys(version)
    entries = [
        (str(room), session_id, data)
        for room, by_session in answer.rooms.items()
        for session_id, data in by_session.items()
    ]
    sessions: list[backup.BackedUpSession] = []
    refused: list[backup.SessionRefusal] = []
    imported = 0
    # A fraction of a millisecond of CPU each: in chunks, so that a large backup does
    # not hold up the rooms' lanes and the sync loop meanwhile.
    for start in range(0, len(entries), RESTORE_CHUNK):
        chunk: dict[str, dict[str, object]] = {}
        for room, session_id, data in entries[start : start + RESTORE_CHUNK]:
            chunk.setdefault(room, {})[session_id] = data
        rooms: dict[str, object] = dict(chunk)
        good, bad = backup.decrypt_room_keys(key, rooms, user_id=machine.user_id)
        imported += machine.import_backed_up(good)
        sessions.extend(good)
        refused.extend(bad)
        await trio.lowlevel.checkpoint()
    states = machine.backup_states()
    # What came from the backup is in it already: not sent back.
    markers: dict[SessionKey, str] = {}
    for session in sessions:
        session_key = (session.room_id, session.sender_key, session.session_id)
        state = states.get(session_key)
        if state == (session.first_known_index, session.authenticated):
            markers[session_key] = _marker(version, *state)
    await crypto.persist()
    await crypto.store.apply_crypto(
        [(MARKER_KIND, _row_key(session_key), marker) for session_key, marker in markers.items()]
    )
    crypto.room_keys_arrived.set()
    log.info(
        "key_backup_restored",
        version=version,
        sessions=len(sessions),
        imported=imported,
        authenticated=sum(s.authenticated for s in sessions),
        refused=len(refused) + len(answer.skipped),
    )
    for refusal in refused[:5]:
        log.warning("key_backup_entry_refused", room_id=refusal.room_id, reason=refusal.reason)
    return markers


class KeyBackup:
    """Backs up the machine's inbound sessions to one backup version."""

    def __init__(
        self,
        crypto: BotCrypto,
        key: BackupKey,
        version: str,
        markers: Mapping[SessionKey, str],
    ) -> None:
        self._crypto = crypto
        self._key = key
        self.version = version
        self._markers = dict(markers)
        self._gone = False  # the version was replaced or deleted: nothing goes up

    def pending(self) -> list[SessionKey]:
        """The sessions the backup holds no copy of as good as the machine's."""
        return [
            session_key
            for session_key, state in self._crypto.machine.backup_states().items()
            if self._markers.get(session_key) != _marker(self.version, *state)
        ]

    async def run(self) -> None:
        """Back up what is pending, then again whenever sessions change; returns when
        the backup is gone (replaced or deleted: logged), else runs until cancelled."""
        failures = 0
        while True:
            try:
                await self.back_up_pending()
                failures = 0
            except WrongRoomKeysVersion:
                log.warning(
                    "key_backup_replaced",
                    version=self.version,
                    reason="another client made a new backup version; room keys are no "
                    "longer backed up until the bot restarts with that version's key",
                )
                self._gone = True
                return
            except NotFound:
                log.warning("key_backup_deleted", version=self.version)
                self._gone = True
                return
            except MatrixAPIError as exc:
                failures += 1
                delay = BACKUP_BACKOFF.wait(failures - 1)
                if failures == 1:
                    log.warning("key_backup_upload_failed", error=str(exc), retry_s=round(delay, 1))
                await trio.sleep(delay)
                continue
            await self._crypto.inbound_sessions_changed.wait()
            # A burst of room keys (a sync batch, a share round) goes up as one request.
            await trio.sleep(BACKUP_BATCH_DELAY_S)

    async def flush(self) -> None:
        """Back up everything pending now; logs, never raises, for the server's answers."""
        if self._gone:
            return
        try:
            await self.back_up_pending()
        except MatrixAPIError as exc:
            log.warning("key_backup_upload_failed", error=str(exc), retry_s=None)

    async def back_up_pending(self) -> None:
        """Every pending session up to the backup, `BATCH_SESSIONS` a request."""
        pending = self.pending()
        for start in range(0, len(pending), BATCH_SESSIONS):
            await self._back_up(pending[start : start + BATCH_SESSIONS])

    async def _back_up(self, session_keys: list[SessionKey]) -> None:
        machine = self._crypto.machine
        batch: dict[RoomID, dict[str, dict[str, Any]]] = {}
        done: list[tuple[SessionKey, str]] = []
        for session_key in session_keys:
            session = machine.room_key_to_back_up(*session_key)
            if session is None:
                continue
            data = backup.authenticated_backup_data(self._key, machine.user_id, session)
            batch.setdefault(RoomID(session.room_id), {})[session.session_id] = data
            marker = _marker(self.version, session.first_message_index, session.authenticated)
            done.append((session_key, marker))
        if not done:
            return
        await self._crypto.client.put_room_keys(self.version, batch)
        # Only the markers: the machine's own rows keep their rule (a sync batch's go
        # with its commit), and a marker for a session not stored yet is harmless.
        await self._crypto.store.apply_crypto(
            [(MARKER_KIND, _row_key(session_key), marker) for session_key, marker in done]
        )
        self._markers.update(done)
        log.info("key_backup_uploaded", sessions=len(done), version=self.version)


async def describe_backup(
    client: MatrixClient, rows: Sequence[tuple[str, str, str]], *, recovery_key_known: bool
) -> tuple[bool, str]:
    """For ``doctor``: whether the key backup is as it should be, and one line saying
    so (no secrets), from the server's current version and the store's crypto rows."""
    try:
        current = await client.get_key_backup()
    except MatrixAPIError as exc:
        return False, f"key backup: could not read the account's backup: {exc}"
    own = {key: value for kind, key, value in rows if kind == "own"}
    try:
        row = json.loads(own.get(KEY_ROW, "null")) or {}
    except ValueError:
        row = {}
    version, public_key = row.get("version"), row.get("public_key")
    backed_up = sum(
        1 for kind, _, value in rows if kind == MARKER_KIND and value.startswith(f"{version}:")
    )
    if current is None:
        return True, "key backup: none yet: the next start makes one"
    if public_key is not None and backup.public_key_matches(current.auth_data, public_key):
        if current.version == version:
            return True, (
                f"key backup: version {current.version}, {backed_up} room keys backed up "
                f"from this store, {current.count} on the server"
            )
        return True, f"key backup: version {current.version}: the next start takes it up"
    if recovery_key_known:
        return True, (
            f"key backup: version {current.version} is not this store's yet: the next start "
            "reads its key from secret storage and restores it"
        )
    return False, (
        f"key backup: version {current.version} cannot be read or written: no recovery key "
        "(set MATRIX_RECOVERY_KEY to the one its secret storage uses)"
    )


def _marker(version: str, first_known_index: int, trusted: bool) -> str:
    return f"{version}:{first_known_index}:{int(trusted)}"


def _row_key(session_key: SessionKey) -> str:
    return json.dumps(list(session_key), separators=(",", ":"))


def _session_key(raw: str) -> SessionKey | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    if isinstance(value, list) and len(value) == 3 and all(isinstance(v, str) for v in value):
        return (value[0], value[1], value[2])
    return None
