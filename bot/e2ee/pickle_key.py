"""The key the crypto state is encrypted with in the store.

From the settings (``BOT_PICKLE_KEY``) when the operator gives one; otherwise a
random key in a file beside the store, created once with mode 0600 (never widened
by the umask, never rewritten). With the key file, whoever can read the store's
directory can read the key too: a configured key kept elsewhere protects the
crypto state of a copied store.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = [
    "PickleKeyError",
    "existing_pickle_key",
    "key_file_for",
    "load_pickle_key",
    "write_secret_file",
]

KEY_BYTES = 32


class PickleKeyError(Exception):
    """The key file exists but cannot be used; the message says why (never the key)."""


def key_file_for(store_path: Path) -> Path:
    return store_path.with_name(store_path.name + ".pickle-key")


def load_pickle_key(configured: bytes | None, store_path: Path) -> bytes:
    """The configured key, else the key file's (created on first use)."""
    if configured is not None:
        return configured
    path = key_file_for(store_path)
    if path.exists():
        return _read(path)
    key = secrets.token_bytes(KEY_BYTES)
    try:
        write_secret_file(path, key.hex())
    except FileExistsError:  # another start made it first: theirs is the key
        return _read(path)
    except OSError as exc:
        raise PickleKeyError(f"{path}: cannot create the key file: {exc}") from exc
    return key


def write_secret_file(path: Path, text: str) -> None:
    """``text`` in a new file at ``path``, mode 0600 whatever the umask. Written whole
    under another name, then linked into place: a crash never leaves half of it, and of
    two writers the first link wins (the other gets `FileExistsError`)."""
    temporary = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, text.encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def existing_pickle_key(configured: bytes | None, store_path: Path) -> bytes | None:
    """The configured key, else the key file's; None when there is none yet (never
    creates one: for the maintenance commands)."""
    if configured is not None:
        return configured
    path = key_file_for(store_path)
    return _read(path) if path.exists() else None


def _read(path: Path) -> bytes:
    try:
        text = path.read_text(encoding="ascii").strip()
        key = bytes.fromhex(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PickleKeyError(f"{path}: not a key file written by the bot: {exc}") from exc
    if len(key) != KEY_BYTES:
        raise PickleKeyError(f"{path}: not a key file written by the bot (wrong length)")
    return key
