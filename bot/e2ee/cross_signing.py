"""The bot's account cross-signs its device, so users' clients see it as its owner's.

Runs once the bot takes messages (nothing waits for it). On the first start of an
account the keys are made, stored (the private halves encrypted with the pickle key)
*before* they are uploaded, uploaded (the server may ask for the password: user-
interactive auth), and the device is signed by the self-signing key. Later starts
with the same device do nothing (no request). A new device of an account whose keys
this store holds is signed at its first start.

The private keys are also kept in the account's secret storage under the operator's
recovery key (`bot.e2ee.secret_storage`): a store that lost them restores them from
there and signs its new device. Without the recovery key the new device stays
unsigned, and the log says why.

Nothing here stops the bot: a failure is logged with what to do, and encryption works
without cross-signing (clients then show the device as not verified by its owner).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from matrix_api import MatrixAPIError
from matrix_api.models import UserID
from matrix_api.uia import AuthRequired, InteractiveAuthError
from matrix_crypto.canonical import sign
from matrix_crypto.cross_signing import CrossSigningKeys, CrossSigningRecord
from matrix_crypto.errors import CryptoError

from .crypto import BotCrypto
from .secret_storage import (
    recovery_key_file_for,
    restore_cross_signing_keys,
    storage_key_for_secret,
    store_cross_signing_keys,
)

__all__ = ["cross_sign_device"]

log = structlog.get_logger("bot.e2ee")

KEYS = "cross_signing"
SIGNED_DEVICE = "cross_signed_device"
IN_SECRET_STORAGE = "cross_signing_in_secret_storage"  # noqa: S105  # a row name


async def cross_sign_device(
    crypto: BotCrypto,
    *,
    password: str | None,
    pickle_key: bytes,
    recovery_key: str | None = None,
    store_path: Path,
) -> None:
    """Make sure the account has cross-signing keys and this device is signed by them;
    logs instead of raising for anything the server answers."""
    try:
        await _cross_sign(crypto, password, pickle_key, _Recovery(recovery_key, store_path))
    except AuthRequired:
        log.warning(
            "cross_signing_failed",
            reason="the homeserver asks for the password to publish cross-signing keys",
            fix="configure MATRIX_PASSWORD",
        )
    except (MatrixAPIError, InteractiveAuthError, CryptoError, ValueError) as exc:
        log.warning("cross_signing_failed", reason=f"{type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class _Recovery:
    configured: str | None = field(repr=False)
    store_path: Path


async def _cross_sign(
    crypto: BotCrypto, password: str | None, pickle_key: bytes, recovery: _Recovery
) -> None:
    machine, client = crypto.machine, crypto.client
    user_id, device_id = machine.user_id, machine.device_id
    stored = crypto.own.get(KEYS)
    if (
        stored is not None
        and crypto.own.get(SIGNED_DEVICE) == device_id
        and crypto.own.get(IN_SECRET_STORAGE) == "yes"
    ):
        return  # the steady state: no request at all
    keys = _from_row(stored, pickle_key) if stored is not None else None
    answer = await client.query_keys({user_id: []})
    user = UserID(user_id)
    master = answer.master_keys.get(user)
    self_signing = answer.self_signing_keys.get(user)
    if keys is None and master is not None:
        keys = await restore_cross_signing_keys(
            client, user_id, recovery.configured, recovery.store_path
        )
        if keys is None:
            log.warning(
                "cross_signing_unavailable",
                reason="the account has cross-signing keys this store does not hold "
                "(a lost store) and there is no recovery key to restore them; "
                "this device stays unsigned",
                fix="configure MATRIX_RECOVERY_KEY",
            )
            return
        if not keys.matches(master, self_signing):
            log.warning(
                "cross_signing_unavailable",
                reason="the keys in secret storage are not the account's published ones; "
                "this device stays unsigned",
            )
            return
        await crypto.keep(KEYS, _to_row(keys, pickle_key))
        await crypto.keep(IN_SECRET_STORAGE, "yes")
        log.info("cross_signing_restored", master_key=keys.public_keys["master"])
    elif keys is None:
        keys = CrossSigningKeys.create(user_id)
        # Kept before they leave: a crash after the upload must not lose the keys the
        # server then holds (new keys would need the password and confuse clients).
        await crypto.keep(KEYS, _to_row(keys, pickle_key))
        await client.upload_cross_signing_keys(**keys.upload_body(), password=password)
        log.info("cross_signing_created", master_key=keys.public_keys["master"])
    elif master is None:
        # Stored but never published (a crash right after storing them): the same keys.
        await client.upload_cross_signing_keys(**keys.upload_body(), password=password)
    elif not keys.matches(master, self_signing):
        log.warning(
            "cross_signing_unavailable",
            reason="the account's cross-signing keys were replaced elsewhere; "
            "this device stays unsigned",
        )
        return
    if crypto.own.get(IN_SECRET_STORAGE) != "yes":
        storage = await storage_key_for_secret(client, recovery.configured, recovery.store_path)
        await store_cross_signing_keys(client, keys, storage)
        await crypto.keep(IN_SECRET_STORAGE, "yes")
        where = (
            "MATRIX_RECOVERY_KEY"
            if recovery.configured
            else str(recovery_key_file_for(recovery.store_path))
        )
        log.info("cross_signing_keys_in_secret_storage", recovery_key=where)
    if crypto.own.get(SIGNED_DEVICE) == device_id:
        return
    device_keys = answer.device_keys.get(user, {}).get(device_id)
    if device_keys is None:
        log.warning("cross_signing_failed", reason="the homeserver does not list this device")
        return
    # Both ways, as matrix-rust-sdk does: the self-signing key vouches for the device,
    # and the device for the master key (a client that verified this device may then
    # trust the identity).
    signatures = keys.sign_device(device_keys)
    master_key = keys.public_keys["master"]
    signatures[user_id][master_key] = sign(
        keys.master_key(), user_id, f"ed25519:{device_id}", lambda m: machine.sign(m)[1]
    )
    result = await client.upload_signatures(signatures)
    if result.failures:
        log.warning("cross_signing_failed", reason="the homeserver refused the signature")
        return
    await crypto.keep(SIGNED_DEVICE, device_id)
    log.info("device_cross_signed", device_id=device_id)


def _to_row(keys: CrossSigningKeys, pickle_key: bytes) -> str:
    return json.dumps(dataclasses.asdict(keys.to_record(pickle_key)), separators=(",", ":"))


def _from_row(row: str, pickle_key: bytes) -> CrossSigningKeys:
    try:
        record = CrossSigningRecord(**json.loads(row))
    except (TypeError, ValueError) as exc:
        reason = f"the stored cross-signing keys do not read: {type(exc).__name__}"
        raise CryptoError(reason) from exc
    return CrossSigningKeys.from_record(record, pickle_key)
