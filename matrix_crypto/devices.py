"""Other devices: validating ``/keys/query`` answers, the device cache, and which users
are tracked (we share encrypted rooms with them) and outdated (their device list must be
queried again).

Trust model: a device is known by its self-signed device keys. The first ed25519 key
seen for a (user, device id) is kept; a later answer with another ed25519 key for that
device id is refused (a server swapping keys under a known device), and the caller logs it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import vodozemac

from matrix_crypto.canonical import verify

__all__ = [
    "MAX_DEVICES_PER_USER",
    "Device",
    "DeviceTracker",
    "QueryOutcome",
    "parse_device_keys",
    "parse_keys_query",
]

# Far more than any real account; bounds what one hostile answer makes us keep.
MAX_DEVICES_PER_USER = 500
_MAX_ID_CHARS = 255
_MAX_ALGORITHMS = 16


@dataclass(frozen=True, slots=True)
class Device:
    """Another device (or one of ours) as its signed device keys describe it."""

    user_id: str
    device_id: str
    curve25519: str
    ed25519: str
    algorithms: tuple[str, ...]


def _id(value: object) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= _MAX_ID_CHARS:
        return value
    return None


def _key_ok(
    value: object, parse: type[vodozemac.Curve25519PublicKey | vodozemac.Ed25519PublicKey]
) -> bool:
    if not isinstance(value, str) or len(value) > 64:
        return False
    try:
        parse.from_base64(value)
    except ValueError:
        return False
    return True


def parse_device_keys(user_id: str, device_id: str, obj: object) -> Device | str:
    """The `Device` of ``device_keys[user_id][device_id]`` of a ``/keys/query`` answer, or
    the reason it is refused: ids that differ from the map keys, missing or malformed
    keys, algorithms not a list of strings, or no valid self-signature. Never raises."""
    if not isinstance(obj, dict):
        return "device keys are not an object"
    if obj.get("user_id") != user_id or obj.get("device_id") != device_id:
        return "user_id or device_id differs from where the keys are listed"
    if _id(user_id) is None or _id(device_id) is None:
        return "user_id or device_id is empty or too long"
    keys = obj.get("keys")
    if not isinstance(keys, dict):
        return "keys is not an object"
    curve = keys.get(f"curve25519:{device_id}")
    ed = keys.get(f"ed25519:{device_id}")
    if not _key_ok(curve, vodozemac.Curve25519PublicKey):
        return "missing or malformed curve25519 key"
    if not _key_ok(ed, vodozemac.Ed25519PublicKey):
        return "missing or malformed ed25519 key"
    assert isinstance(curve, str)
    assert isinstance(ed, str)
    algorithms = obj.get("algorithms")
    if (
        not isinstance(algorithms, list)
        or len(algorithms) > _MAX_ALGORITHMS
        or not all(isinstance(a, str) for a in algorithms)
    ):
        return "algorithms is not a list of strings"
    if not verify(obj, user_id, f"ed25519:{device_id}", ed):
        return "device keys are not signed by their own ed25519 key"
    return Device(user_id, device_id, curve, ed, tuple(algorithms))


@dataclass(frozen=True, slots=True)
class QueryOutcome:
    """A validated ``/keys/query`` answer.

    ``devices`` has an entry for every requested user the server answered for: their
    complete current device list (devices missing from it are gone). ``refused`` lists
    (user_id, device_id, reason) for devices left out (the caller logs them as warnings);
    a refused device with a known ed25519 key keeps its cached entry. ``unanswered`` are
    requested users the answer did not cover (their server failed): still outdated.
    """

    devices: dict[str, dict[str, Device]] = field(default_factory=dict)
    refused: list[tuple[str, str, str]] = field(default_factory=list)
    unanswered: set[str] = field(default_factory=set)


def parse_keys_query(
    response: object,
    requested: Iterable[str],
    cached: Mapping[str, Mapping[str, Device]],
) -> QueryOutcome:
    """Validate a ``/keys/query`` answer for ``requested`` users against the cache.
    Users not requested are ignored. Never raises."""
    outcome = QueryOutcome()
    wanted = set(requested)
    device_keys = response.get("device_keys") if isinstance(response, dict) else None
    if not isinstance(device_keys, dict):
        outcome.unanswered.update(wanted)
        return outcome
    for user_id in wanted:
        per_user = device_keys.get(user_id)
        if not isinstance(per_user, dict):
            outcome.unanswered.add(user_id)
            continue
        known = cached.get(user_id, {})
        result: dict[str, Device] = {}
        for count, (device_id, obj) in enumerate(per_user.items()):
            if count >= MAX_DEVICES_PER_USER:
                outcome.refused.append((user_id, "*", "too many devices"))
                break
            parsed = parse_device_keys(user_id, device_id, obj)
            previous = known.get(device_id)
            if isinstance(parsed, str):
                outcome.refused.append((user_id, device_id, parsed))
            elif previous is not None and previous.ed25519 != parsed.ed25519:
                outcome.refused.append((user_id, device_id, "ed25519 key changed"))
            else:
                result[device_id] = parsed
                continue
            if previous is not None:
                result[device_id] = previous  # a bad answer does not remove a known device
        outcome.devices[user_id] = result
    return outcome


class DeviceTracker:
    """Tracked users, outdated users and the device cache, with what changed since the
    last `take_dirty` (for the store).

    A user becomes tracked when the caller says it shares an encrypted room with them
    (`track`), outdated when tracked newly or named in ``device_lists.changed``, and is
    forgotten (devices included) when named in ``device_lists.left``.
    """

    def __init__(self) -> None:
        self.devices: dict[str, dict[str, Device]] = {}
        self.tracked: set[str] = set()
        self.outdated: set[str] = set()
        # Bumped each time a user is marked outdated: an answer to a query sent before
        # the last bump does not make the user up to date.
        self._epoch: dict[str, int] = {}
        self._dirty_users: set[str] = set()
        self._dirty_devices: set[tuple[str, str]] = set()
        self._deleted_devices: set[tuple[str, str]] = set()

    # -- persistence -----------------------------------------------------------------

    def restore_user(self, user_id: str, *, outdated: bool) -> None:
        self.tracked.add(user_id)
        if outdated:
            self.outdated.add(user_id)

    def restore_device(self, device: Device) -> None:
        self.devices.setdefault(device.user_id, {})[device.device_id] = device

    def take_dirty(
        self,
    ) -> tuple[set[str], set[tuple[str, str]], set[tuple[str, str]]]:
        """(users whose tracked/outdated state changed, devices to put, devices to delete).
        A user in the first set who is not in `tracked` is to be deleted."""
        out = (set(self._dirty_users), set(self._dirty_devices), set(self._deleted_devices))
        self._dirty_users.clear()
        self._dirty_devices.clear()
        self._deleted_devices.clear()
        return out

    # -- tracking --------------------------------------------------------------------

    def _mark_outdated(self, user_id: str) -> None:
        self._epoch[user_id] = self._epoch.get(user_id, 0) + 1
        if user_id not in self.outdated:
            self.outdated.add(user_id)
            self._dirty_users.add(user_id)

    def track(self, users: Iterable[str]) -> None:
        """Start tracking ``users`` (members of encrypted rooms); new ones are outdated."""
        for user_id in users:
            if _id(user_id) is None or user_id in self.tracked:
                continue
            self.tracked.add(user_id)
            self._dirty_users.add(user_id)
            self._mark_outdated(user_id)

    def mark_changed(self, users: Iterable[str]) -> None:
        """``device_lists.changed``: tracked users among them are outdated."""
        for user_id in users:
            if isinstance(user_id, str) and user_id in self.tracked:
                self._mark_outdated(user_id)

    def forget(self, users: Iterable[str]) -> None:
        """``device_lists.left``: we share no encrypted room any more; drop their devices."""
        for user_id in users:
            if not isinstance(user_id, str) or user_id not in self.tracked:
                continue
            self.tracked.discard(user_id)
            self.outdated.discard(user_id)
            self._epoch.pop(user_id, None)
            self._dirty_users.add(user_id)
            for device_id in self.devices.pop(user_id, {}):
                self._dirty_devices.discard((user_id, device_id))
                self._deleted_devices.add((user_id, device_id))

    def epochs(self, users: Iterable[str]) -> dict[str, int]:
        return {u: self._epoch.get(u, 0) for u in users}

    # -- answers ---------------------------------------------------------------------

    def apply_query(self, outcome: QueryOutcome, epochs: Mapping[str, int]) -> None:
        """Store a validated answer to a query sent when the users had ``epochs``."""
        for user_id, devices in outcome.devices.items():
            if user_id not in self.tracked:
                continue  # left while the query was in flight
            old = self.devices.get(user_id, {})
            for device_id in old.keys() - devices.keys():
                self._deleted_devices.add((user_id, device_id))
                self._dirty_devices.discard((user_id, device_id))
            for device_id, device in devices.items():
                if old.get(device_id) != device:
                    self._dirty_devices.add((user_id, device_id))
                    self._deleted_devices.discard((user_id, device_id))
            self.devices[user_id] = dict(devices)
            if self._epoch.get(user_id, 0) == epochs.get(user_id) and user_id in self.outdated:
                self.outdated.discard(user_id)
                self._dirty_users.add(user_id)

    def device(self, user_id: str, device_id: str) -> Device | None:
        return self.devices.get(user_id, {}).get(device_id)

    def by_curve25519(self, user_id: str, curve25519: str) -> Device | None:
        for device in self.devices.get(user_id, {}).values():
            if device.curve25519 == curve25519:
                return device
        return None

    def user_devices(self, user_id: str) -> list[Device]:
        return list(self.devices.get(user_id, {}).values())
