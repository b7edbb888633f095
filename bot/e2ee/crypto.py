"""The bot's end of `matrix_crypto.machine.OlmMachine`: its I/O and its persistence.

The machine is sans-IO and synchronous; this class sends the requests it asks for
(keys upload, query and claim, to-device messages) and keeps its state in the store.

Persistence follows one rule: the machine's changes are collected in the same trio
step as the store call that writes them (SQLite's store writes on the trio thread;
PostgreSQL's takes its turn in that step and keeps the calls' order), and rows stay
queued until a write succeeds. So a later write can never put back an
older value over a newer one (an outbound session's message index going backwards
would be a replay to every receiver), and a failed write loses nothing. Three
moments write:

* a sync batch: its to-device events' changes go in the batch's own transaction,
  with the sync token (the server re-delivers them until the token moves);
* before a request whose answer depends on state the machine just made (one-time
  keys before their upload, so a crash re-uploads the same keys, never new ones
  under the same ids);
* before an encrypted event is sent (the outbound session's index has moved).

Network work on the machine (uploads, queries, claims, key shares) is serialised by
one lock: two rooms sharing a key at once would otherwise claim two one-time keys
for one device. Encrypting itself takes no lock and no I/O.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
import trio
from trio_util import RepeatedEvent

from matrix_api import MatrixAPIError, MatrixClient, NotFound
from matrix_api.models import RoomID, SyncResponse, UserID
from matrix_crypto.errors import CryptoError
from matrix_crypto.machine import (
    KeysClaimRequest,
    KeysQueryRequest,
    KeysUploadRequest,
    OlmMachine,
    OutgoingRequest,
    ToDeviceRequest,
)
from matrix_crypto.state import KINDS, CryptoState

from ..store import CryptoRow
from ..store_api import BotStore

__all__ = ["BotCrypto", "DeviceConflict", "SyncCrypto", "stored_crypto"]

log = structlog.get_logger("bot.e2ee")

_OWN = "own"
_SHARE_ROUNDS = 10
_CLOCK_SLACK_MS = 1_000  # the crypto table's kind for what this module keeps of its own


class DeviceConflict(Exception):
    """The server holds keys for this device that the store does not: the store was
    lost (or is another one). Keys are never uploaded twice for one device id."""


@dataclass(frozen=True, slots=True)
class SyncCrypto:
    """What a sync batch changed, for `Store.commit_sync_batch`."""

    rows: list[CryptoRow]


class BotCrypto:
    """One device's crypto, for the runtime's lifetime; make it with `open`."""

    def __init__(
        self,
        client: MatrixClient,
        store: BotStore,
        machine: OlmMachine,
        *,
        published_ms: int = 0,
        own: dict[str, str] | None = None,
        opened_rows: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self._client = client
        self._store = store
        self._machine = machine
        self._unwritten: list[CryptoRow] = []
        self._network = trio.Lock()
        self._wake = RepeatedEvent()
        # Joined members of encrypted rooms the bot sent to, until a membership event
        # in the room's timeline says they changed (one request per room, not per send).
        self._members: dict[RoomID, list[str]] = {}
        self._member_changes = 0
        self.own = own or {}
        """What this module keeps beside the machine's state (kind "own"), by key."""
        self.opened_rows = opened_rows or {}
        """The rows of kinds neither the machine nor this module reads (the key
        backup's markers), by kind and key, as the store had them at `open`."""
        self.published_ms = published_ms
        """When this device's keys went up, on the server's clock (0: not yet). No client
        could send a room key to it for a message older than that."""
        self.room_keys_arrived = RepeatedEvent()
        """Set each time a batch brought room keys: decryptions waiting may retry."""
        self.inbound_sessions_changed = RepeatedEvent()
        """Set each time an inbound session was added or improved (the key backup's cue)."""
        self.verifications: Callable[[list[dict[str, Any]]], None] | None = None
        """Fed each batch's to-device events in `take_sync` (`bot.e2ee.verification`:
        no I/O there, and a batch delivered again is harmless)."""
        self.room_verifications: Callable[[SyncResponse], None] | None = None
        """Fed each batch in `take_sync`: the verification events of its rooms."""
        self.backup_settled = trio.Event()
        """Set once the key backup was opened (and restored from, on a new store) or
        found unusable: a message older than this device waits for it, not for a
        room key that could only come from the backup."""

    @classmethod
    async def open(
        cls, client: MatrixClient, store: BotStore, *, device_id: str, pickle_key: bytes
    ) -> BotCrypto:
        """Restore the device's crypto from the store, or make a new identity for it.

        Raises `DeviceConflict` when the store has no identity for ``device_id`` but
        the server already has keys for it, and `CryptoError` when the stored state
        cannot be read with ``pickle_key``.
        """
        user_id = client.user_id
        assert user_id is not None, "authenticate first"
        own, machine_rows = _split_rows(await store.crypto_rows())
        stored_device = own.get("device_id")
        if stored_device == device_id and machine_rows:
            machine = OlmMachine.restore(
                user_id, device_id, CryptoState.from_rows(machine_rows), pickle_key
            )
            log.info("e2ee_restored", device_id=device_id, ed25519=machine.ed25519)
            published = own.get("published_ms", "0")
            return cls(
                client,
                store,
                machine,
                published_ms=int(published) if published.isdigit() else 0,
                own=own,
                opened_rows=_other_kinds(machine_rows),
            )
        if stored_device is not None and stored_device != device_id:
            # A new device for the same store (re-login): the old identity is no use.
            log.warning("e2ee_device_changed", old_device_id=stored_device, device_id=device_id)
        answer = await client.query_keys({user_id: [device_id]})
        if answer.device_keys.get(UserID(user_id), {}).get(device_id):
            raise DeviceConflict(
                f"the homeserver already has encryption keys for device {device_id}, and "
                "this store has none for it (a lost or replaced store)"
            )
        machine = OlmMachine.create(user_id, device_id, pickle_key)
        # What belongs to the account (its cross-signing keys) stays; the old device's
        # own entries do not.
        kept = {k: v for k, v in own.items() if k not in ("device_id", "published_ms")}
        bot = cls(client, store, machine, own=kept)
        stale = [(kind, key, None) for kind, key, _ in machine_rows]
        bot._unwritten.extend(stale)
        bot._unwritten.append((_OWN, "device_id", device_id))
        await bot._write()
        log.info("e2ee_created", device_id=device_id, ed25519=machine.ed25519)
        return bot

    @property
    def machine(self) -> OlmMachine:
        return self._machine

    @property
    def client(self) -> MatrixClient:
        return self._client

    @property
    def store(self) -> BotStore:
        return self._store

    async def keep(self, key: str, value: str) -> None:
        """Store ``value`` under ``key`` beside the machine's state (now)."""
        self.own[key] = value
        self._unwritten.append((_OWN, key, value))
        await self._write()

    async def persist(self) -> None:
        """Write what the machine changed (e.g. sessions imported from the backup)."""
        await self._write()

    # --- persistence -------------------------------------------------------------------

    def _collect(self) -> list[CryptoRow]:
        """Everything not yet known written, the machine's newest changes last."""
        changes = self._machine.take_changes()
        if not changes.empty:
            self._unwritten.extend(changes.rows())
            if changes.megolm.inbound:
                self.inbound_sessions_changed.set()
        return list(self._unwritten)

    def _published(self) -> None:
        # The server's clock as the bot knows it (its Date headers: whole seconds, so
        # up to a second behind), plus that second: never before the upload.
        now_ms = self._client.server_time_ms() or int(time.time() * 1000)
        self.published_ms = now_ms + _CLOCK_SLACK_MS
        self._unwritten.append((_OWN, "published_ms", str(self.published_ms)))

    def _written(self, rows: Sequence[CryptoRow]) -> None:
        # By identity, not count: with a store whose calls let other tasks run
        # (PostgreSQL's), another write may have collected and written rows meanwhile.
        done = {id(row) for row in rows}
        self._unwritten = [row for row in self._unwritten if id(row) not in done]

    async def _write(self) -> None:
        rows = self._collect()
        await self._store.apply_crypto(rows)
        self._written(rows)

    # --- sync --------------------------------------------------------------------------

    def take_sync(self, response: SyncResponse) -> SyncCrypto:
        """Feed a sync batch to the machine; what to commit with it.

        Synchronous on purpose: call it right before `Store.commit_sync_batch`, with
        no await in between, and call `batch_committed` once the commit succeeded.
        """
        to_device = [_to_device_dict(event) for event in response.to_device]
        results = self._machine.receive_sync(
            to_device=to_device,
            changed=list(response.device_lists.changed),
            left=list(response.device_lists.left),
            one_time_key_counts=response.device_one_time_keys_count,
            unused_fallback_key_types=response.device_unused_fallback_key_types,
        )
        if self.verifications is not None:
            self.verifications(to_device)
        if self.room_verifications is not None:
            self.room_verifications(response)
        keys_arrived = False
        for result in results:
            if result.refused is not None:
                log.warning(
                    "to_device_refused", sender=result.sender, type=result.type,
                    reason=result.refused,
                )  # fmt: skip
            elif result.room_key is not None:
                keys_arrived = True
        self._keys_arrived_in_batch = keys_arrived
        for room_id, room in response.rooms.join.items():
            if any(e.type == "m.room.member" for e in [*room.state, *room.timeline.events]):
                self._forget_members(room_id)
        for room_id in response.rooms.leave:
            self._forget_members(room_id)
        return SyncCrypto(self._collect())

    def _forget_members(self, room_id: RoomID) -> None:
        self._members.pop(room_id, None)
        self._member_changes += 1

    def batch_committed(self, crypto: SyncCrypto) -> None:
        self._written(crypto.rows)
        if self._keys_arrived_in_batch:
            self.room_keys_arrived.set()
        self._wake.set()

    # --- requests ----------------------------------------------------------------------

    async def run(self) -> None:
        """Send what the machine asks for (key uploads, device queries) whenever a
        sync batch may have changed it; runs until cancelled."""
        while True:
            try:
                await self.send_outgoing()
            except (MatrixAPIError, CryptoError) as exc:
                log.warning("e2ee_requests_failed", error=str(exc))
                # The next batch wakes it again; the machine still has them.
            await self._wake.wait()

    async def send_outgoing(self) -> None:
        async with self._network:
            await self._send_all(self._machine.outgoing_requests())

    async def _send_all(self, requests: Iterable[OutgoingRequest]) -> None:
        for request in requests:
            # What the request carries (new one-time keys) is stored before it leaves.
            await self._write()
            response = await self._send(request)
            if isinstance(request, KeysUploadRequest) and request.device_keys is not None:
                self._published()
            for warning in self._machine.mark_request_sent(request.request_id, response):
                log.warning("e2ee_answer_refused", kind=request.kind, detail=warning)
            await self._write()

    async def _send(self, request: OutgoingRequest) -> dict[str, Any]:
        client = self._client
        if isinstance(request, KeysUploadRequest):
            counts = await client.upload_keys(
                device_keys=request.device_keys,
                one_time_keys=request.one_time_keys,
                fallback_keys=request.fallback_keys,
            )
            return {"one_time_key_counts": counts}
        if isinstance(request, KeysQueryRequest):
            answer = await client.query_keys(request.users)
            return {"device_keys": answer.device_keys, "failures": answer.failures}
        if isinstance(request, KeysClaimRequest):
            claimed = await client.claim_keys(request.one_time_keys)
            return {"one_time_keys": claimed.one_time_keys, "failures": claimed.failures}
        if isinstance(request, ToDeviceRequest):
            await client.send_to_device(request.event_type, request.messages, request.txn_id)
            return {}
        raise TypeError(f"unknown request {type(request).__name__}")

    # --- rooms -------------------------------------------------------------------------

    async def _readers(self, room_id: RoomID) -> list[str]:
        """Who may read what the bot sends now: the joined members, and the invited
        ones where the history visibility lets them read from their invite on."""
        members = await self._client.current_members(room_id)
        try:
            visibility = await self._client.get_state_event(room_id, "m.room.history_visibility")
        except NotFound:
            visibility = {}  # the spec's default: shared
        invited_read = visibility.get("history_visibility", "shared") != "joined"
        readers = ("join", "invite") if invited_read else ("join",)
        return sorted(user for user, membership in members.items() if membership in readers)

    async def ensure_devices(self, users: Sequence[str]) -> None:
        """Know the current devices of ``users`` (a sender, before their message is
        checked against them): tracked from now on, queried when unknown or outdated."""
        machine = self._machine
        if machine.devices_current(users):
            return  # known and current: no lock, no request
        machine.update_tracked_users(users)
        await self.send_outgoing()

    async def encrypt(
        self, room_id: RoomID, event_type: str, content: dict[str, Any]
    ) -> dict[str, Any]:
        """``content`` as the ``m.room.encrypted`` content for ``room_id``: the room key
        shared first with every device that lacks it, of every joined member and, unless
        the room's history is visible to joined members only, every invited one (they
        will read what was sent while they were invited, as clients do)."""
        settings = json.loads(self._store.room_encryption(room_id) or "{}")
        users = self._members.get(room_id)
        if users is None:  # read outside the lock: other rooms' sends need not wait for it
            changes = self._member_changes
            users = await self._readers(room_id)
            if changes == self._member_changes:  # else it may be stale already: not kept
                self._members[room_id] = users
        async with self._network:
            # Query, claim, share (share_room_key tracks the members): a few rounds, each
            # answered before the next is asked.
            for _ in range(_SHARE_ROUNDS):
                requests = self._machine.share_room_key(room_id, users, settings)
                if not requests:
                    break
                await self._send_all(requests)
            else:
                raise CryptoError(f"the room key of {room_id} could not be shared")
            encrypted = self._machine.encrypt_room_event(room_id, event_type, content)
            # The outbound session's index has moved: stored before the event leaves.
            await self._write()
        return encrypted


def _split_rows(
    rows: list[tuple[str, str, str]],
) -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    """The store's crypto rows: this module's own entries by key, and the machine's."""
    own = {key: value for kind, key, value in rows if kind == _OWN}
    return own, [row for row in rows if row[0] != _OWN]


def _other_kinds(rows: list[tuple[str, str, str]]) -> dict[str, dict[str, str]]:
    other: dict[str, dict[str, str]] = {}
    for kind, key, value in rows:
        if kind not in KINDS:
            other.setdefault(kind, {})[key] = value
    return other


def _to_device_dict(event: Any) -> dict[str, Any]:
    return {"type": event.type, "sender": event.sender, "content": event.content}


async def stored_crypto(
    store: BotStore, user_id: str, pickle_key: bytes
) -> tuple[str | None, OlmMachine | None]:
    """The device id the store keeps crypto state for, and that state opened with
    ``pickle_key`` (None: none kept). Raises `CryptoError` when it does not open."""
    own, machine_rows = _split_rows(await store.crypto_rows())
    device_id = own.get("device_id")
    if device_id is None or not machine_rows:
        return device_id, None
    state = CryptoState.from_rows(machine_rows)
    return device_id, OlmMachine.restore(user_id, device_id, state, pickle_key)
