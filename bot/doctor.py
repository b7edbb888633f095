"""``python -m bot doctor``: is this bot healthy? Changes nothing it owns.

Checks the configuration, the modes of the bot's files at rest (a warning for each
one other users may read: bot.file_modes), the homeserver (reachable, spec versions), the
credentials (whoami, or a password login on the bot's device), the store (schema,
integrity, owner), and prints the reconciliation report the next start would
produce. Reconciliation runs against a copy of the store, never the store itself.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import trio

from matrix_api import MatrixAPIError, MatrixClient
from matrix_api.models import UserID
from matrix_crypto.cross_signing import (
    cross_signing_public_key,
    device_signed_by_self_signing_key,
)
from matrix_crypto.errors import CryptoError

from . import __version__
from .backend_settings.reading import without_userinfo
from .config import Settings
from .e2ee.crypto import stored_crypto
from .e2ee.key_backup import describe_backup
from .e2ee.pickle_key import PickleKeyError, existing_pickle_key
from .e2ee.secret_storage import recovery_key_file_for
from .file_modes import WideMode, private_paths, wider_than_private
from .intake import full_state_sync
from .ops.status import listener_url, read_status, render
from .reconcile import reconcile_matrix_state
from .reset import store_files
from .session import AuthError, authenticate
from .store import SCHEMA_VERSION, Store, StoreError
from .store_lock import StoreLock, StoreLockHeld

__all__ = ["run_doctor", "snapshot_store"]


async def run_doctor(settings: Settings, say: Callable[[str], None]) -> int:
    """Print one line per check; returns 0 when every check passed, 1 otherwise.

    No line shows credentials of the homeserver URL (`load_settings` refuses them; a
    hand-built `Settings` may still have them, and an error may quote the URL).
    """
    problems = 0
    userinfo = urlsplit(settings.homeserver).netloc.rpartition("@")[0]
    if userinfo:
        shown = say

        def say(line: str) -> None:
            shown(line.replace(userinfo, "***"))

    def ok(what: str) -> None:
        say(f"ok    {what}")

    def bad(what: str) -> None:
        nonlocal problems
        problems += 1
        say(f"FAIL  {what}")

    ok(f"configuration: bot {settings.user_id} on {without_userinfo(settings.homeserver)}")
    await _check_running_bot(settings, say)
    if settings.store_url is not None:
        await _check_active_instance(settings.store_url, ok, bad)
    # A warning, not a failure: the bot runs, but other local users may read what it keeps.
    for wide in await trio.to_thread.run_sync(_wide_files, Path(settings.store_path)):
        say(f"WARN  files: {wide.advice()}")
    try:
        client = MatrixClient(
            settings.homeserver,
            access_token=settings.access_token,
            user_id=settings.user_id,
            user_agent=f"surfaces-bot/{__version__} doctor",
        )
    except MatrixAPIError as exc:  # a URL the client refuses (it never quotes credentials)
        bad(f"homeserver: {exc}")
        return problems
    async with client:
        try:
            versions = await client.versions()
        except MatrixAPIError as exc:
            bad(f"homeserver: not reachable: {exc}")
            return problems
        ok(f"homeserver: reachable, speaks {', '.join(versions.versions[-3:])}")

        with tempfile.TemporaryDirectory(prefix="surfaces-doctor-") as scratch:
            copy = Path(scratch) / "store.sqlite3"
            try:
                await trio.to_thread.run_sync(snapshot_store, settings.store_path, copy)
                store = await Store.open(copy, settings.user_id)
            except sqlite3.Error as exc:
                bad(f"store: {settings.store_path}: cannot be read: {exc}")
                return problems
            except StoreError as exc:
                bad(f"store: {exc}")
                return problems
            try:
                if store_files(settings.store_path):
                    counts = await store.counts()
                    ok(
                        f"store: {settings.store_path}, schema {SCHEMA_VERSION}, "
                        f"{counts['chats']} chats, {counts['inbox']} waiting in the inbox"
                    )
                else:
                    ok(f"store: none yet at {settings.store_path} (the first start creates it)")
                try:
                    device = await authenticate(client, settings, await store.get_meta("device_id"))
                except AuthError as exc:
                    bad(f"credentials: {exc}")
                    return problems
                ok(f"credentials: valid for {settings.user_id} (device {device})")
                await _check_encryption(client, store, settings, device, ok, bad)
                if settings.e2ee:
                    await _check_cross_signing(client, settings, device, ok, bad)
                    fine, line = await describe_backup(
                        client,
                        await store.crypto_rows(),
                        recovery_key_known=_recovery_key_source(settings) is not None,
                    )
                    (ok if fine else bad)(line)
                try:
                    sync = await full_state_sync(client, settings.user_id)
                    report = await reconcile_matrix_state(client, store, sync)
                except MatrixAPIError as exc:
                    bad(f"reconciliation: could not read the server's state: {exc}")
                    return problems
                fields = report.log_fields()
                summary = ", ".join(
                    f"{key} {fields[key]}"
                    for key in (
                        "rooms_seen",
                        "restored",
                        "known",
                        "updated",
                        "skipped",
                        "conflicts",
                        "spaces",
                    )
                )
                (ok if not report.conflicts else bad)(f"reconciliation would find: {summary}")
                for note in report.skipped + report.conflicts:
                    say(f"      {note.room_id}: {note.reason} {note.detail}".rstrip())
            finally:
                await store.aclose()
    return 1 if problems else 0


async def _check_encryption(
    client: MatrixClient,
    store: Store,
    settings: Settings,
    device: str | None,
    ok: Callable[[str], None],
    bad: Callable[[str], None],
) -> None:
    """One line on end-to-end encryption: the device the next start will use, and
    whether its keys are in the store and on the server."""
    if not settings.e2ee:
        ok("encryption: off (BOT_E2EE): encrypted rooms are offered an unencrypted chat")
        return
    rooms = await store.counts()
    try:
        key = existing_pickle_key(settings.pickle_key, Path(settings.store_path))
        stored_device, machine = (None, None)
        if key is not None:
            stored_device, machine = await stored_crypto(store, settings.user_id, key)
    except (PickleKeyError, CryptoError) as exc:
        bad(f"encryption: the stored crypto state does not open: {exc}")
        return
    if machine is not None and stored_device == device:
        published = "published" if machine.keys_uploaded else "not published yet"
        ok(
            f"encryption: device {device}, keys {published} (ed25519 {machine.ed25519}), "
            f"{rooms['encrypted_rooms']} encrypted rooms known"
        )
        return
    try:
        answer = await client.query_keys({settings.user_id: [device]} if device else {})
    except MatrixAPIError as exc:
        bad(f"encryption: could not ask the server about the device's keys: {exc}")
        return
    has_keys = bool(answer.device_keys.get(UserID(settings.user_id), {}).get(device or ""))
    if not has_keys:
        ok(f"encryption: no keys yet for device {device}: the next start makes and publishes them")
    elif settings.password is not None:
        ok(
            f"encryption: the server has keys for device {device} that this store does not "
            "hold: the next start logs in as a new device"
        )
    else:
        bad(
            f"encryption: the server has keys for device {device} that this store does not "
            "hold, and no MATRIX_PASSWORD to log in as a new device: encrypted rooms will "
            "get the unencrypted fallback"
        )


async def _check_cross_signing(
    client: MatrixClient,
    settings: Settings,
    device: str | None,
    ok: Callable[[str], None],
    bad: Callable[[str], None],
) -> None:
    """One line on cross-signing: the account's keys, whether this device is signed by
    them, and whether a recovery key could restore them after a lost store."""
    user = UserID(settings.user_id)
    try:
        answer = await client.query_keys({user: []})
    except MatrixAPIError as exc:
        bad(f"cross-signing: could not read the account's keys: {exc}")
        return
    master = answer.master_keys.get(user)
    ssk = answer.self_signing_keys.get(user)
    key_file = recovery_key_file_for(Path(settings.store_path))
    recovery = _recovery_key_source(settings)
    kept = f"; recovery key: {recovery}" if recovery else ""
    if master is None:
        ok("cross-signing: no keys yet: the next start makes them and signs the device")
        return
    public = cross_signing_public_key(master, settings.user_id, "master")
    device_keys = answer.device_keys.get(user, {}).get(device or "")
    if device_keys is not None and device_signed_by_self_signing_key(device_keys, ssk):
        ok(f"cross-signing: master key {public}, device {device} signed by it{kept}")
    elif recovery is not None:
        ok(
            f"cross-signing: master key {public}, device {device} not signed yet: "
            f"the next start signs it{kept}"
        )
    else:
        bad(
            f"cross-signing: master key {public}, device {device} not signed, and no recovery "
            f"key to restore the keys if the store lost them: set MATRIX_RECOVERY_KEY (the "
            f"recovery key a client showed, or the one the first start wrote to {key_file})"
        )


def _recovery_key_source(settings: Settings) -> str | None:
    """Where the recovery key comes from (never the key): the setting or the key file."""
    if settings.recovery_key is not None:
        return "MATRIX_RECOVERY_KEY"
    key_file = recovery_key_file_for(Path(settings.store_path))
    return str(key_file) if key_file.exists() else None


async def _check_active_instance(
    url: str, ok: Callable[[str], None], bad: Callable[[str], None]
) -> None:
    """Which instance holds a PostgreSQL store: the active one of an active/standby
    pair (`bot.lease`). Asked without taking the store's lock."""
    from .store_postgres import PostgresStore  # a SQLite set-up never loads the driver

    store = PostgresStore(url)
    try:
        holder = await store.lock_holder()
    except StoreError as exc:
        bad(f"store: {exc}")
        return
    if holder is None:
        ok(f"store: {store.where}: no instance holds it (none is active)")
        return
    pid, address, opener = holder
    ok(
        f"store: {store.where}: the active instance is on {opener or 'an unnamed host'} "
        f"(connected from {address or 'a local socket'}, server process {pid})"
    )


async def _check_running_bot(settings: Settings, say: Callable[[str], None]) -> None:
    """What a running bot's listener says (`python -m bot status` reads the same)."""
    if settings.http_listen is None:
        return
    status = await read_status(listener_url(settings.http_listen))
    if status.error is not None:
        say(f"info  running bot: none answers at {status.url} ({status.error})")
    elif status.ok:
        say(f"ok    running bot: ready and healthy at {status.url}")
    else:
        for line in render(status)[1:3]:  # its "ready:" and "healthy:" lines
            say(f"WARN  running bot: {' '.join(line.split())}")


def _wide_files(store_path: Path) -> list[WideMode]:
    return wider_than_private(private_paths(store_path), store_path.absolute().parent)


def snapshot_store(store_path: Path, copy: Path) -> None:
    """Copy the store at ``store_path`` to ``copy`` (no file there: no store yet) as
    one committed state, even while a bot writes to it; nothing is left beside it.
    """
    if not store_files(store_path):
        return
    try:
        lock = StoreLock.try_acquire(store_path)
    except StoreLockHeld:
        # A bot is running. Copying its files one by one could take the database
        # from before a checkpoint and the WAL from after it; SQLite's backup reads
        # one committed state. The bot's connection keeps the WAL files beside the
        # store, so this read-only one adds none.
        uri = f"{store_path.absolute().as_uri()}?mode=ro"
        with (
            contextlib.closing(sqlite3.connect(uri, uri=True)) as source,
            contextlib.closing(sqlite3.connect(copy)) as target,
        ):
            source.backup(target)
        return
    except OSError:
        lock = None  # a directory we cannot write in: no bot can run there either
    try:
        # No bot runs, and none can start while the lock is ours: the files are still.
        for path in store_files(store_path):
            shutil.copy2(path, copy.with_name(path.name.replace(store_path.name, copy.name)))
    finally:
        if lock is not None:
            lock.release()
