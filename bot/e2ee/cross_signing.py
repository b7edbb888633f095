"""The bot's account cross-signs its device, so users' clients see it as its owner's.

Runs once the bot takes messages (nothing waits for it). On the first start of an
account the keys are made, stored (the private halves encrypted with the pickle key)
*before* they are uploaded, uploaded (the server may ask for the password: user-
interactive auth), and the device is signed by the self-signing key. Later starts
with the same device do nothing (no request). A new device of an account whose keys
this store holds is signed at its first start.

Not yet: restoring the keys after a lost store from secret storage (issue 20); until
then a store that lost them leaves the new device unsigned, and says so.

Nothing here stops the bot: a failure is logged with what to do, and encryption works
without cross-signing (clients then show the device as not verified by its owner).
"""

from __future__ import annotations

import dataclasses
import json

import structlog

from matrix_api import MatrixAPIError
from matrix_api.models import UserID
from matrix_api.uia import AuthRequired, InteractiveAuthError
from matrix_crypto.cross_signing import CrossSigningKeys, CrossSigningRecord
from matrix_crypto.errors import CryptoError

from .crypto import BotCrypto

__all__ = ["cross_sign_device"]

log = structlog.get_logger("bot.e2ee")

KEYS = "cross_signing"
SIGNED_DEVICE = "cross_signed_device"


async def cross_sign_device(crypto: BotCrypto, *, password: str | None, pickle_key: bytes) -> None:
    """Make sure the account has cross-signing keys and this device is signed by them;
    logs instead of raising for anything the server answers."""
    try:
        await _cross_sign(crypto, password, pickle_key)
    except AuthRequired:
        log.warning(
            "cross_signing_failed",
            reason="the homeserver asks for the password to publish cross-signing keys",
            fix="configure MATRIX_PASSWORD",
        )
    except (MatrixAPIError, InteractiveAuthError, CryptoError, ValueError) as exc:
        log.warning("cross_signing_failed", reason=f"{type(exc).__name__}: {exc}")


async def _cross_sign(crypto: BotCrypto, password: str | None, pickle_key: bytes) -> None:
    machine, client = crypto.machine, crypto.client
    user_id, device_id = machine.user_id, machine.device_id
    stored = crypto.own.get(KEYS)
    if stored is not None and crypto.own.get(SIGNED_DEVICE) == device_id:
        return  # the steady state: no request at all
    keys = _from_row(stored, pickle_key) if stored is not None else None
    answer = await client.query_keys({user_id: []})
    user = UserID(user_id)
    master = answer.master_keys.get(user)
    self_signing = answer.self_signing_keys.get(user)
    if keys is None:
        if master is not None:
            log.warning(
                "cross_signing_unavailable",
                reason="the account has cross-signing keys this store does not hold "
                "(a lost store); this device stays unsigned",
            )
            return
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
    device_keys = answer.device_keys.get(user, {}).get(device_id)
    if device_keys is None:
        log.warning("cross_signing_failed", reason="the homeserver does not list this device")
        return
    result = await client.upload_signatures(keys.sign_device(device_keys))
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
