"""What the crypto layer persists, as plain values the bot's store can keep.

`CryptoState` is everything (read once at start-up); `CryptoChanges` is what changed
since the last `OlmMachine.take_changes` (puts and deletes). Both are frozen dataclasses
of str/int/bool fields. The store keeps them as rows ``(kind, key, value)``: ``value``
is the JSON of one record, ``key`` makes the row unique within its kind, and a change
row with ``value`` None is a delete (`CryptoChanges.rows`, `CryptoState.from_rows`).

Secrets: every ``pickle`` field is a vodozemac pickle, encrypted by vodozemac with the
32-byte pickle key. The rest (ids, public keys, counters) is not secret.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from matrix_crypto.errors import CryptoError
from matrix_crypto.megolm import InboundRecord, MegolmChanges, OutboundRecord, SeenRecord

__all__ = [
    "AccountRecord",
    "CryptoChanges",
    "CryptoRow",
    "CryptoState",
    "DeviceRecord",
    "OlmSessionRecord",
    "TrackedUserRecord",
]

# (kind, key, value); value None in a change means "delete this row".
CryptoRow = tuple[str, str, str | None]

ACCOUNT = "account"
OLM_SESSION = "olm_session"
DEVICE = "device"
TRACKED_USER = "tracked_user"
INBOUND_GROUP = "inbound_group"
OUTBOUND_GROUP = "outbound_group"
MEGOLM_SEEN = "megolm_seen"
KINDS = (ACCOUNT, OLM_SESSION, DEVICE, TRACKED_USER, INBOUND_GROUP, OUTBOUND_GROUP, MEGOLM_SEEN)


@dataclass(frozen=True, slots=True)
class AccountRecord:
    """The device's Olm account. ``keys_uploaded``: its device keys are on the server
    (they are never uploaded again for this device id)."""

    user_id: str
    device_id: str
    pickle: str = field(repr=False)  # never in a log line
    keys_uploaded: bool


@dataclass(frozen=True, slots=True)
class OlmSessionRecord:
    """An Olm session with the device owning ``peer_curve25519``; ``last_used`` orders a
    peer's sessions (highest first for sending, lowest dropped beyond the bound)."""

    peer_curve25519: str
    session_id: str
    last_used: int
    pickle: str = field(repr=False)  # never in a log line


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """Another device as its validated, self-signed device keys describe it."""

    user_id: str
    device_id: str
    curve25519: str
    ed25519: str
    algorithms: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TrackedUserRecord:
    """A user whose devices we follow; ``outdated``: their list must be queried."""

    user_id: str
    outdated: bool


def _key(*parts: object) -> str:
    # JSON keeps composite keys unambiguous whatever characters the ids hold.
    return json.dumps(parts, ensure_ascii=False, separators=(",", ":"))


def _value(record: object) -> str:
    # Records are flat (str, int, bool, tuples of str): a shallow dict is enough, and
    # `dataclasses.asdict` deep-copies, which was a third of storing an outbound
    # session before each encrypted send.
    data = {f.name: getattr(record, f.name) for f in fields(record)}  # type: ignore[arg-type]
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


_R = TypeVar("_R")
_FIELD_TYPES: dict[str, type] = {"str": str, "int": int, "bool": bool, "tuple": tuple}


def _record(cls: type[_R], text: str) -> _R:
    """A record from its JSON; lists become tuples (tuple fields), extra fields ignored."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise TypeError("record is not an object")

    def tuples(item: Any) -> Any:
        return tuple(tuples(i) for i in item) if isinstance(item, list) else item

    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        item: object = tuples(data.get(f.name))
        # Annotations are strings here (postponed evaluation): their first word is enough.
        expected = _FIELD_TYPES.get(str(f.type).split("[", 1)[0])
        if expected is not None and (
            not isinstance(item, expected) or (expected is int and isinstance(item, bool))
        ):
            raise TypeError(f"field {f.name} is not a {expected.__name__}")
        values[f.name] = item
    return cls(**values)


def _row_key(record: object) -> tuple[str, str]:
    if isinstance(record, AccountRecord):
        return ACCOUNT, ACCOUNT
    if isinstance(record, OlmSessionRecord):
        return OLM_SESSION, _key(record.peer_curve25519, record.session_id)
    if isinstance(record, DeviceRecord):
        return DEVICE, _key(record.user_id, record.device_id)
    if isinstance(record, TrackedUserRecord):
        return TRACKED_USER, record.user_id
    if isinstance(record, InboundRecord):
        return INBOUND_GROUP, _key(record.room_id, record.sender_curve25519, record.session_id)
    if isinstance(record, OutboundRecord):
        return OUTBOUND_GROUP, record.room_id
    if isinstance(record, SeenRecord):
        return MEGOLM_SEEN, _key(record.session_id, record.message_index)
    raise TypeError(f"not a crypto record: {type(record).__name__}")


def _put(record: object) -> tuple[str, str, str]:
    kind, key = _row_key(record)
    return kind, key, _value(record)


@dataclass(frozen=True)
class CryptoState:
    """Everything the crypto layer persists (see the module docstring)."""

    account: AccountRecord | None = None
    olm_sessions: tuple[OlmSessionRecord, ...] = ()
    devices: tuple[DeviceRecord, ...] = ()
    tracked_users: tuple[TrackedUserRecord, ...] = ()
    inbound_group_sessions: tuple[InboundRecord, ...] = ()
    outbound_group_sessions: tuple[OutboundRecord, ...] = ()
    seen_megolm_indexes: tuple[SeenRecord, ...] = ()

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[str, str, str]]) -> CryptoState:
        """The state from the store's rows (any order). Raises `CryptoError` for a row
        that cannot be read (a corrupt store: the caller must stop, not start empty).
        Rows of kinds this version does not know are ignored (a newer build's)."""
        by_kind: dict[str, list[Any]] = {kind: [] for kind in KINDS}
        types: dict[str, type[Any]] = {
            ACCOUNT: AccountRecord,
            OLM_SESSION: OlmSessionRecord,
            DEVICE: DeviceRecord,
            TRACKED_USER: TrackedUserRecord,
            INBOUND_GROUP: InboundRecord,
            OUTBOUND_GROUP: OutboundRecord,
            MEGOLM_SEEN: SeenRecord,
        }
        for kind, key, value in rows:
            if kind not in types:
                continue
            try:
                by_kind[kind].append(_record(types[kind], value))
            except (ValueError, TypeError) as exc:
                raise CryptoError(f"unreadable crypto row {kind}/{key}") from exc
        if len(by_kind[ACCOUNT]) > 1:
            raise CryptoError("more than one account in the crypto rows")
        seen = sorted(by_kind[MEGOLM_SEEN], key=lambda s: (s.origin_server_ts, s.session_id))
        return cls(
            account=by_kind[ACCOUNT][0] if by_kind[ACCOUNT] else None,
            olm_sessions=tuple(by_kind[OLM_SESSION]),
            devices=tuple(by_kind[DEVICE]),
            tracked_users=tuple(by_kind[TRACKED_USER]),
            inbound_group_sessions=tuple(by_kind[INBOUND_GROUP]),
            outbound_group_sessions=tuple(by_kind[OUTBOUND_GROUP]),
            seen_megolm_indexes=tuple(seen),
        )

    def records(self) -> list[object]:
        account: list[object] = [self.account] if self.account is not None else []
        return [
            *account,
            *self.olm_sessions,
            *self.devices,
            *self.tracked_users,
            *self.inbound_group_sessions,
            *self.outbound_group_sessions,
            *self.seen_megolm_indexes,
        ]

    def rows(self) -> list[tuple[str, str, str]]:
        """Every row (a full snapshot)."""
        return [_put(record) for record in self.records()]

    def apply(self, changes: CryptoChanges) -> CryptoState:
        """This state with ``changes`` applied (what a store does with the rows)."""
        table: dict[tuple[str, str], str] = {(k, key): v for k, key, v in self.rows()}
        for kind, key, value in changes.rows():
            if value is None:
                table.pop((kind, key), None)
            else:
                table[(kind, key)] = value
        return CryptoState.from_rows((k, key, v) for (k, key), v in table.items())


@dataclass(frozen=True)
class CryptoChanges:
    """What to persist since the last `OlmMachine.take_changes`: puts replace by key,
    deletes name the key. Rows: `rows()`."""

    account: AccountRecord | None = None
    olm_sessions: tuple[OlmSessionRecord, ...] = ()
    olm_sessions_deleted: tuple[tuple[str, str], ...] = ()  # (peer_curve25519, session_id)
    devices: tuple[DeviceRecord, ...] = ()
    devices_deleted: tuple[tuple[str, str], ...] = ()  # (user_id, device_id)
    tracked_users: tuple[TrackedUserRecord, ...] = ()
    tracked_users_deleted: tuple[str, ...] = ()
    megolm: MegolmChanges = field(default_factory=MegolmChanges)

    @property
    def empty(self) -> bool:
        return not (
            self.account is not None
            or self.olm_sessions
            or self.olm_sessions_deleted
            or self.devices
            or self.devices_deleted
            or self.tracked_users
            or self.tracked_users_deleted
            or self.megolm
        )

    def rows(self) -> list[CryptoRow]:
        """The changes as store rows, ``value`` None for a delete. Order matters only
        within one key, and each key appears once."""
        rows: list[CryptoRow] = []
        if self.account is not None:
            rows.append(_put(self.account))
        rows.extend(_put(r) for r in self.olm_sessions)
        rows.extend((OLM_SESSION, _key(p, s), None) for p, s in self.olm_sessions_deleted)
        rows.extend(_put(r) for r in self.devices)
        rows.extend((DEVICE, _key(u, d), None) for u, d in self.devices_deleted)
        rows.extend(_put(r) for r in self.tracked_users)
        rows.extend((TRACKED_USER, u, None) for u in self.tracked_users_deleted)
        megolm = self.megolm
        rows.extend(_put(r) for r in megolm.inbound)
        rows.extend((INBOUND_GROUP, _key(*k), None) for k in megolm.inbound_deleted)
        rows.extend(_put(r) for r in megolm.outbound)
        rows.extend((OUTBOUND_GROUP, room, None) for room in megolm.outbound_deleted)
        rows.extend(_put(r) for r in megolm.seen)
        rows.extend((MEGOLM_SEEN, _key(s, i), None) for s, i in megolm.seen_deleted)
        return rows
