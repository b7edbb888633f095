"""Canonical JSON, unpadded base64 and ed25519 signatures on JSON objects.

Canonical JSON is the Matrix spec's appendix: keys sorted by code point, no
whitespace, UTF-8 without ``\\u`` escapes for non-ASCII, integers only (in the
range every JSON implementation keeps exactly). Signed JSON excludes ``signatures``
and ``unsigned`` from the signed bytes.

`verify` and `b64decode` take input from outside: they refuse it by returning
False / raising ValueError, never anything else.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Mapping

import vodozemac

__all__ = [
    "MAX_DEPTH",
    "Signer",
    "b64decode",
    "b64encode",
    "canonical_json",
    "sign",
    "verify",
]

# The spec's integer range ("must be in the range [-(2**53)+1, (2**53)-1]").
_MIN_INT = -(2**53) + 1
_MAX_INT = 2**53 - 1
# Deeper nesting than any Matrix object needs; bounds the work on hostile input.
MAX_DEPTH = 64

# Signs bytes, returns the unpadded base64 ed25519 signature (an `Identity.sign`).
Signer = Callable[[bytes], str]


def _check(value: object, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ValueError("JSON nested too deeply")
    if value is None or isinstance(value, bool | str):
        return
    if isinstance(value, int):
        if not _MIN_INT <= value <= _MAX_INT:
            raise ValueError("integer out of the canonical JSON range")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError("JSON object keys must be strings")
            _check(item, depth + 1)
        return
    if isinstance(value, list | tuple):
        for item in value:
            _check(item, depth + 1)
        return
    # Floats included: canonical JSON has no representation for them.
    raise TypeError(f"not canonical JSON: {type(value).__name__}")


def canonical_json(obj: object) -> bytes:
    """The canonical JSON bytes of ``obj``.

    Raises TypeError for a value JSON cannot hold canonically (floats, non-string
    keys, other types) and ValueError for out-of-range integers, nesting deeper than
    `MAX_DEPTH`, or strings that are not valid Unicode (lone surrogates).
    """
    _check(obj, 0)
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("string is not valid Unicode") from None


def b64encode(data: bytes) -> str:
    """Unpadded standard base64, as Matrix writes keys, signatures and ciphertexts."""
    return base64.b64encode(data).rstrip(b"=").decode("ascii")


def b64decode(text: object) -> bytes:
    """Decode Matrix base64 (unpadded; padding tolerated). ValueError for anything else,
    including non-strings, URL-safe alphabet and stray characters."""
    if not isinstance(text, str):
        raise ValueError("base64 value is not a string")
    stripped = text.rstrip("=")
    padding = len(text) - len(stripped)
    if len(stripped) % 4 == 1 or (padding and (padding > 2 or len(text) % 4)):
        raise ValueError("bad base64 length")
    try:
        return base64.b64decode(stripped + "=" * (-len(stripped) % 4), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ValueError("not base64") from None


def _signed_part(obj: Mapping[str, object]) -> dict[str, object]:
    return {k: v for k, v in obj.items() if k not in ("signatures", "unsigned")}


def sign(obj: Mapping[str, object], user_id: str, key_id: str, signer: Signer) -> dict[str, object]:
    """A copy of ``obj`` with ``signatures[user_id][key_id]`` added (other signatures kept).

    ``key_id`` is the full id, e.g. ``ed25519:DEVICEID``. Raises like `canonical_json`
    for an object that is not canonical JSON (our own objects: a bug, not input).
    """
    signature = signer(canonical_json(_signed_part(obj)))
    out = dict(obj)
    existing = obj.get("signatures")
    signatures: dict[str, object] = dict(existing) if isinstance(existing, Mapping) else {}
    mine = signatures.get(user_id)
    by_key: dict[str, object] = dict(mine) if isinstance(mine, Mapping) else {}
    by_key[key_id] = signature
    signatures[user_id] = by_key
    out["signatures"] = signatures
    return out


def verify(obj: object, user_id: str, key_id: str, ed25519_base64: str) -> bool:
    """Whether ``obj`` carries a valid signature by ``ed25519_base64`` under
    ``signatures[user_id][key_id]``. False for anything malformed; never raises."""
    try:
        if not isinstance(obj, Mapping):
            return False
        signatures = obj.get("signatures")
        if not isinstance(signatures, Mapping):
            return False
        by_user = signatures.get(user_id)
        if not isinstance(by_user, Mapping):
            return False
        signature = by_user.get(key_id)
        if not isinstance(signature, str) or not isinstance(ed25519_base64, str):
            return False
        message = canonical_json(_signed_part(obj))
        key = vodozemac.Ed25519PublicKey.from_base64(ed25519_base64)
        key.verify_signature(message, vodozemac.Ed25519Signature.from_base64(signature))
    except (ValueError, TypeError, RecursionError):
        # vodozemac's Key/Signature exceptions are ValueErrors.
        return False
    return True
