"""What the bot's device does in the background once the bot takes messages: sign
itself with the account's cross-signing keys, open (and restore from) the key backup,
then send the machine's requests and back up room keys for as long as it runs; and,
all along, answer users who verify it."""

from __future__ import annotations

from pathlib import Path

import trio

from .cross_signing import cross_sign_device
from .crypto import BotCrypto
from .key_backup import open_key_backup
from .verification import BotVerifications

__all__ = ["FLUSH_TIMEOUT_S", "run_device_tasks"]

FLUSH_TIMEOUT_S = 5.0


async def run_device_tasks(
    crypto: BotCrypto,
    *,
    password: str | None,
    pickle_key: bytes,
    recovery_key: str | None,
    store_path: Path,
    verifications: BotVerifications,
) -> None:
    """Runs until cancelled; logs, never raises, for what the server answers."""
    async with trio.open_nursery() as nursery:
        # From the start: a user's verification does not wait for the server's answers
        # to cross-signing and the backup.
        nursery.start_soon(verifications.run)
        await _signed_and_backed_up(
            crypto,
            password=password,
            pickle_key=pickle_key,
            recovery_key=recovery_key,
            store_path=store_path,
        )


async def _signed_and_backed_up(
    crypto: BotCrypto,
    *,
    password: str | None,
    pickle_key: bytes,
    recovery_key: str | None,
    store_path: Path,
) -> None:
    try:
        await cross_sign_device(
            crypto,
            password=password,
            pickle_key=pickle_key,
            recovery_key=recovery_key,
            store_path=store_path,
        )
        key_backup = await open_key_backup(
            crypto, pickle_key=pickle_key, recovery_key=recovery_key, store_path=store_path
        )
    finally:
        crypto.backup_settled.set()  # also when cancelled before it was opened
    try:
        async with trio.open_nursery() as nursery:
            if key_backup is not None:
                nursery.start_soon(key_backup.run)
            await crypto.run()
    finally:
        if key_backup is not None:
            # On a stop, the room keys of the last seconds still go up (bounded): the
            # backup is what a lost store is restored from.
            with trio.move_on_after(FLUSH_TIMEOUT_S) as flush:
                flush.shield = True
                await key_backup.flush()
