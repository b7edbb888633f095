"""Answers of the end-to-end encryption key endpoints, and the E2EE parts of /sync.

Key objects (a device's keys, a claimed one-time key) stay plain dicts exactly as
decoded: the crypto layer verifies signatures over their canonical JSON, so nothing
here may add, drop or retype a field inside them. Only the maps around them are
checked: an entry of the wrong type (a device that is not an object, a count that
is not an integer, a user id that is not a string) is dropped and recorded in
``skipped``, and the rest of the answer is kept. A part the spec requires that is
missing or not even an object fails the whole answer (`msgspec.DecodeError`, which
the client raises as `BadResponse`): nothing in it could be trusted then.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .events import SkippedEvent
from .identifiers import UserID
from .mending import decode_mended

__all__ = [
    "DeviceLists",
    "KeysClaimResponse",
    "KeysQueryResponse",
    "decode_key_changes",
    "decode_key_object_maps",
    "decode_keys_claim",
    "decode_keys_query",
    "decode_keys_upload",
    "device_lists_from",
    "key_counts_from",
    "key_types_from",
]


class DeviceLists(msgspec.Struct, frozen=True):
    """Users whose devices changed (``changed``) or who no longer share an encrypted
    room with us (``left``): /sync's ``device_lists`` and the /keys/changes answer."""

    changed: list[UserID] = msgspec.field(default_factory=list)
    left: list[UserID] = msgspec.field(default_factory=list)


class KeysQueryResponse(msgspec.Struct, frozen=True):
    """The /keys/query answer.

    ``device_keys[user_id][device_id]`` is the device's signed key object, raw; a
    user or device the server does not know is absent (the spec records no failure
    for it). ``failures`` maps each remote server that could not be reached to what
    went wrong there.

    ``master_keys``, ``self_signing_keys`` and ``user_signing_keys`` map a user id to
    that user's cross-signing key object, raw (with the signatures the server holds
    for it); a user without one is absent. Only the querier's own user-signing key is
    ever given.
    """

    device_keys: dict[UserID, dict[str, dict[str, Any]]] = msgspec.field(default_factory=dict)
    failures: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    skipped: list[SkippedEvent] = msgspec.field(default_factory=list)
    """What was dropped, with where and why; empty for a clean answer."""
    master_keys: dict[UserID, dict[str, Any]] = msgspec.field(default_factory=dict)
    self_signing_keys: dict[UserID, dict[str, Any]] = msgspec.field(default_factory=dict)
    user_signing_keys: dict[UserID, dict[str, Any]] = msgspec.field(default_factory=dict)


class KeysClaimResponse(msgspec.Struct, frozen=True):
    """The /keys/claim answer.

    ``one_time_keys[user_id][device_id]`` maps ``<algorithm>:<key_id>`` to the key
    object, raw (a fallback key when the device had no one-time key left). A device
    with nothing to claim is absent.
    """

    one_time_keys: dict[UserID, dict[str, dict[str, Any]]] = msgspec.field(default_factory=dict)
    failures: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    skipped: list[SkippedEvent] = msgspec.field(default_factory=list)


_object = msgspec.json.Decoder(dict[str, Any])
_NO_EVENT_ARRAYS: tuple[str, ...] = ()


def _decode_object(body: bytes, skipped: list[SkippedEvent]) -> dict[str, Any]:
    """The answer as a dict; too-deep values become ``null`` and lone surrogates
    U+FFFD (`decode_mended`), each recorded, instead of sinking the whole answer."""
    return decode_mended(_object, body, skipped, _NO_EVENT_ARRAYS)


def _required_object(top: dict[str, Any], key: str) -> dict[str, Any]:
    value = top.get(key)
    if not isinstance(value, dict):
        raise msgspec.DecodeError(f"`{key}` must be an object, got {type(value).__name__}")
    return value


def _optional_object(top: dict[str, Any], key: str) -> dict[str, Any]:
    value = top.get(key, {})
    if not isinstance(value, dict):
        raise msgspec.DecodeError(f"`{key}` must be an object, got {type(value).__name__}")
    return value


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _objects_by_device(
    by_user: dict[str, Any], where: str, skipped: list[SkippedEvent]
) -> dict[UserID, dict[str, dict[str, Any]]]:
    """``{user: {device: object}}`` with every entry that is not an object dropped."""
    kept: dict[UserID, dict[str, dict[str, Any]]] = {}
    for user_id, devices in by_user.items():
        if not isinstance(devices, dict):
            skipped.append(
                SkippedEvent(f"{where}.{user_id}", f"not an object: {_type_name(devices)}")
            )
            continue
        user_devices: dict[str, dict[str, Any]] = {}
        for device_id, value in devices.items():
            if isinstance(value, dict):
                user_devices[device_id] = value
            else:
                skipped.append(
                    SkippedEvent(
                        f"{where}.{user_id}.{device_id}", f"not an object: {_type_name(value)}"
                    )
                )
        kept[UserID(user_id)] = user_devices
    return kept


def _objects_by_user(
    top: dict[str, Any], key: str, skipped: list[SkippedEvent]
) -> dict[UserID, dict[str, Any]]:
    """``top[key]``, ``{user: object}``, with every entry that is not an object dropped;
    absent is empty, and so is a value that is not an object (recorded): the device
    keys beside it are still good."""
    by_user = top.get(key)
    if by_user is None:
        return {}
    if not isinstance(by_user, dict):
        skipped.append(SkippedEvent(key, f"not an object: {_type_name(by_user)}"))
        return {}
    kept: dict[UserID, dict[str, Any]] = {}
    for user_id, value in by_user.items():
        if isinstance(value, dict):
            kept[UserID(user_id)] = value
        else:
            skipped.append(SkippedEvent(f"{key}.{user_id}", f"not an object: {_type_name(value)}"))
    return kept


def _failures(top: dict[str, Any], skipped: list[SkippedEvent]) -> dict[str, dict[str, Any]]:
    failures = top.get("failures", {})
    if not isinstance(failures, dict):
        skipped.append(SkippedEvent("failures", f"not an object: {_type_name(failures)}"))
        return {}
    kept: dict[str, dict[str, Any]] = {}
    for server, failure in failures.items():
        if isinstance(failure, dict):
            kept[server] = failure
        else:
            skipped.append(
                SkippedEvent(f"failures.{server}", f"not an object: {_type_name(failure)}")
            )
    return kept


def key_counts_from(raw: Any, where: str, skipped: list[SkippedEvent]) -> dict[str, int]:
    """A ``{algorithm: count}`` map (/keys/upload's ``one_time_key_counts``, /sync's
    ``device_one_time_keys_count``) without the counts that are not whole numbers of
    at least 0. ``None`` (absent) is ``{}``: the spec lets the server leave zeros out."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        skipped.append(SkippedEvent(where, f"not an object: {_type_name(raw)}"))
        return {}
    counts: dict[str, int] = {}
    for algorithm, count in raw.items():
        # bool is an int to Python, not to JSON.
        if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
            counts[algorithm] = count
        else:
            skipped.append(
                SkippedEvent(f"{where}.{algorithm}", f"not a count: {_type_name(count)}")
            )
    return counts


def _strings(raw: Any, where: str, skipped: list[SkippedEvent]) -> list[str]:
    if not isinstance(raw, list):
        skipped.append(SkippedEvent(where, f"not a list: {_type_name(raw)}"))
        return []
    kept: list[str] = []
    for index, value in enumerate(raw):
        if isinstance(value, str):
            kept.append(value)
        else:
            skipped.append(SkippedEvent(f"{where}[{index}]", f"not a string: {_type_name(value)}"))
    return kept


def key_types_from(raw: Any, where: str, skipped: list[SkippedEvent]) -> list[str] | None:
    """/sync's ``device_unused_fallback_key_types``: None when absent (the server
    does not do fallback keys, so none is to be uploaded), which is not ``[]`` (the
    fallback key was used: upload a new one). A value that is not a list is recorded
    and read as None: a garbled answer must not trigger an upload."""
    if raw is None:
        return None
    if not isinstance(raw, list):
        skipped.append(SkippedEvent(where, f"not a list: {_type_name(raw)}"))
        return None
    return _strings(raw, where, skipped)


def _user_ids(raw: Any, where: str, skipped: list[SkippedEvent]) -> list[UserID]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        skipped.append(SkippedEvent(where, f"not a list: {_type_name(raw)}"))
        return []
    kept: list[UserID] = []
    for index, user_id in enumerate(raw):
        if isinstance(user_id, str) and user_id.startswith("@"):
            kept.append(UserID(user_id))
        else:
            skipped.append(SkippedEvent(f"{where}[{index}]", "not a user id"))
    return kept


def device_lists_from(raw: Any, where: str, skipped: list[SkippedEvent]) -> DeviceLists:
    """``{"changed": [...], "left": [...]}`` with what is not a user id dropped;
    None (absent, as on an initial /sync) is empty lists."""
    if raw is None:
        return DeviceLists()
    if not isinstance(raw, dict):
        skipped.append(SkippedEvent(where, f"not an object: {_type_name(raw)}"))
        return DeviceLists()
    prefix = f"{where}." if where else ""
    return DeviceLists(
        changed=_user_ids(raw.get("changed"), f"{prefix}changed", skipped),
        left=_user_ids(raw.get("left"), f"{prefix}left", skipped),
    )


def decode_keys_upload(body: bytes) -> dict[str, int]:
    """The /keys/upload answer: ``one_time_key_counts`` (required by the spec); an
    algorithm not in it has a count of 0."""
    skipped: list[SkippedEvent] = []
    top = _decode_object(body, skipped)
    return key_counts_from(
        _required_object(top, "one_time_key_counts"), "one_time_key_counts", skipped
    )


def decode_keys_query(body: bytes) -> KeysQueryResponse:
    skipped: list[SkippedEvent] = []
    top = _decode_object(body, skipped)
    device_keys = _objects_by_device(_optional_object(top, "device_keys"), "device_keys", skipped)
    failures = _failures(top, skipped)
    return KeysQueryResponse(
        device_keys,
        failures,
        skipped,
        master_keys=_objects_by_user(top, "master_keys", skipped),
        self_signing_keys=_objects_by_user(top, "self_signing_keys", skipped),
        user_signing_keys=_objects_by_user(top, "user_signing_keys", skipped),
    )


def decode_key_object_maps(
    body: bytes, key: str
) -> tuple[dict[UserID, dict[str, dict[str, Any]]], list[SkippedEvent]]:
    """An answer whose ``key`` (optional) is ``{user: {id: object}}``, as
    /keys/signatures/upload's ``failures``: that map with its wrong-typed entries
    dropped, and what was dropped."""
    skipped: list[SkippedEvent] = []
    top = _decode_object(body, skipped)
    return _objects_by_device(_optional_object(top, key), key, skipped), skipped


def decode_keys_claim(body: bytes) -> KeysClaimResponse:
    skipped: list[SkippedEvent] = []
    top = _decode_object(body, skipped)
    one_time_keys = _objects_by_device(
        _required_object(top, "one_time_keys"), "one_time_keys", skipped
    )
    return KeysClaimResponse(one_time_keys, _failures(top, skipped), skipped)


def decode_key_changes(body: bytes) -> DeviceLists:
    """The /keys/changes answer (its entries that are not user ids dropped)."""
    skipped: list[SkippedEvent] = []
    return device_lists_from(_decode_object(body, skipped), "", skipped)
