"""The account's cross-signing keys in secret storage, under the operator's recovery key.

So that a bot whose store is lost can sign its new device again: the private keys are
kept encrypted in the account's data on the server (``m.secret_storage.*``, the way
clients keep them), under a key only the operator holds. The recovery key comes from
``MATRIX_RECOVERY_KEY``, else from a file beside the store made 0600 when the keys are
first stored (copy it somewhere safe: a store lost with its directory takes the file
with it).
"""

from __future__ import annotations

import secrets
from pathlib import Path

from matrix_api import MatrixClient, NotFound
from matrix_crypto.cross_signing import (
    SECRET_MASTER,
    SECRET_SELF_SIGNING,
    SECRET_USER_SIGNING,
    CrossSigningKeys,
    RecoveryKeyError,
    SecretStorageKey,
    decode_recovery_key,
)
from matrix_crypto.errors import CryptoError

from .pickle_key import write_secret_file

__all__ = [
    "default_storage_key",
    "read_secret",
    "recovery_key_file_for",
    "restore_cross_signing_keys",
    "storage_key_for_new_secrets",
    "storage_key_for_secret",
    "store_cross_signing_keys",
]

DEFAULT_KEY = "m.secret_storage.default_key"


def recovery_key_file_for(store_path: Path) -> Path:
    return store_path.with_name(store_path.name + ".recovery-key")


def storage_key_for_new_secrets(configured: str | None, store_path: Path) -> SecretStorageKey:
    """The key to store new secrets under: the configured recovery key, else the key
    file's, else a new key written to the key file (0600, whole, never rewritten)."""
    text = configured if configured is not None else _read_file(recovery_key_file_for(store_path))
    if text is not None:
        alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
        key_id = "".join(secrets.choice(alphabet) for _ in range(32))
        return SecretStorageKey(key_id, decode_recovery_key(text))
    key = SecretStorageKey.create()
    _write_file(recovery_key_file_for(store_path), key.recovery_key)
    return key


async def store_cross_signing_keys(
    client: MatrixClient, keys: CrossSigningKeys, storage: SecretStorageKey
) -> None:
    """Store the three private keys under ``storage`` (`storage_key_for_secret`). Each
    write is idempotent: a retry repeats them all."""
    for name, seed in keys.export().items():
        await client.put_account_data(name, storage.encrypt(name, seed))


async def restore_cross_signing_keys(
    client: MatrixClient, user_id: str, configured: str | None, store_path: Path
) -> CrossSigningKeys | None:
    """The account's cross-signing keys from secret storage, with the recovery key
    (configured, else the key file's); None when there is no recovery key or nothing
    stored. Raises `CryptoError` (a wrong or malformed recovery key: the message says
    which, never the key) and what the homeserver raises."""
    storage = await default_storage_key(client, configured, store_path)
    if storage is None:
        return None
    exported = {}
    for name in (SECRET_MASTER, SECRET_SELF_SIGNING, SECRET_USER_SIGNING):
        exported[name] = storage.decrypt(name, await client.get_account_data(name))
    return CrossSigningKeys.from_export(user_id, exported)


async def default_storage_key(
    client: MatrixClient, configured: str | None, store_path: Path
) -> SecretStorageKey | None:
    """The account's default secret storage key, opened with the recovery key
    (configured, else the key file's); None when there is no recovery key or no
    default key. Raises `CryptoError` for a wrong or malformed recovery key."""
    text = configured if configured is not None else _read_file(recovery_key_file_for(store_path))
    if text is None:
        return None
    return await _open_default(client, text)


async def _open_default(client: MatrixClient, text: str) -> SecretStorageKey | None:
    try:
        default = await client.get_account_data(DEFAULT_KEY)
    except NotFound:
        return None
    key_id = default.get("key")
    if not isinstance(key_id, str):
        raise CryptoError("the account's default secret storage key names no key")
    description = await client.get_account_data(f"m.secret_storage.key.{key_id}")
    return SecretStorageKey.from_recovery_key(text, key_id, description)


async def storage_key_for_secret(
    client: MatrixClient, configured: str | None, store_path: Path
) -> SecretStorageKey:
    """The key a new secret goes under: the account's default key, opened with the
    recovery key; when the account has none, a new default key (from the configured
    recovery key, the key file's, or a new one written to the key file), published
    first. Raises `CryptoError` when the account has secret storage but there is no
    recovery key to open it (a new default key would orphan what is stored there)."""
    text = configured if configured is not None else _read_file(recovery_key_file_for(store_path))
    if text is not None:
        storage = await _open_default(client, text)
        if storage is not None:
            return storage
    else:
        try:
            await client.get_account_data(DEFAULT_KEY)
        except NotFound:
            pass
        else:
            raise CryptoError(
                "the account has secret storage but no recovery key is configured "
                "(MATRIX_RECOVERY_KEY)"
            )
    storage = storage_key_for_new_secrets(configured, store_path)
    await client.put_account_data(storage.event_type, storage.description())
    await client.put_account_data(DEFAULT_KEY, storage.default_key_content())
    return storage


async def read_secret(client: MatrixClient, storage: SecretStorageKey, name: str) -> str | None:
    """The secret ``name`` from the account's data (None: not stored). Raises
    `CryptoError` when it is not encrypted for ``storage`` or does not decrypt."""
    try:
        content = await client.get_account_data(name)
    except NotFound:
        return None
    return storage.decrypt(name, content)


def _read_file(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecoveryKeyError(f"{path}: cannot be read: {type(exc).__name__}") from exc


def _write_file(path: Path, text: str) -> None:
    try:
        write_secret_file(path, text)
    except OSError as exc:
        raise CryptoError(f"{path}: cannot write the recovery key file: {exc}") from exc
