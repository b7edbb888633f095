"""A person with a device of their own in encrypted rooms, written in Python.

The js client (js_client.py) is the independent client, but it always sends a room
key before the message it is for. This person is `matrix_crypto.OlmMachine` driven by
a `MatrixClient` against the real Synapse, so a test can hold a room key back
(`prepare_share` returns the to-device requests carrying it, unsent) and send it
when it chooses (`release`).

While `run` syncs, the person keeps its keys uploaded, answers what its machine asks
for (key queries, claims) and takes its to-device events, so the bot can query its
device, claim its one-time keys and share room keys with it.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import trio

from matrix_api import MatrixClient, new_txn_id
from matrix_api.models import EventID, RoomEvent, RoomID, SyncResponse, SyncToken
from matrix_api.testing.synapse import RegisteredUser, SynapseServer
from matrix_crypto.errors import MissingRoomKey, UnverifiedSender
from matrix_crypto.machine import (
    DecryptedEvent,
    KeysClaimRequest,
    KeysQueryRequest,
    KeysUploadRequest,
    OlmMachine,
    OutgoingRequest,
    ToDeviceRequest,
    ToDeviceResult,
)

__all__ = ["EncryptedPerson", "open_encrypted_person"]

ENCRYPTED = "m.room.encrypted"
# Rounds of requests answered before a wish of the machine is given up as a loop.
_ROUNDS = 8


class EncryptedPerson:
    """One user on one device, with its own Olm machine (nothing persisted)."""

    def __init__(self, synapse: SynapseServer, user: RegisteredUser) -> None:
        self.user = user
        self.client = MatrixClient(
            synapse.base_url,
            access_token=user.access_token,
            user_id=user.user_id,
            device_id=user.device_id,
        )
        self.machine = OlmMachine.create(user.user_id, user.device_id, secrets.token_bytes(32))
        self.timeline: dict[RoomID, list[RoomEvent]] = {}
        self.refused: list[ToDeviceResult] = []
        self.room_keys: list[tuple[str, str]] = []
        # Requests sent only by `release`, never by the sync loop.
        self._held: set[str] = set()
        self._network = trio.Lock()  # one exchange with the server at a time
        self._since: SyncToken | None = None
        self._synced = trio.Event()

    # --- requests -------------------------------------------------------------------

    async def _send(self, request: OutgoingRequest) -> None:
        client = self.client
        response: dict[str, Any]
        if isinstance(request, KeysUploadRequest):
            counts = await client.upload_keys(
                device_keys=request.device_keys,
                one_time_keys=request.one_time_keys,
                fallback_keys=request.fallback_keys,
            )
            response = {"one_time_key_counts": counts}
        elif isinstance(request, KeysQueryRequest):
            answer = await client.query_keys(request.users)
            response = {"device_keys": answer.device_keys, "failures": answer.failures}
        elif isinstance(request, KeysClaimRequest):
            claimed = await client.claim_keys(request.one_time_keys)
            response = {"one_time_keys": claimed.one_time_keys, "failures": claimed.failures}
        elif isinstance(request, ToDeviceRequest):
            await client.send_to_device(request.event_type, request.messages, request.txn_id)
            response = {}
        else:
            raise TypeError(f"unknown request {type(request).__name__}")
        warnings = self.machine.mark_request_sent(request.request_id, response)
        assert not warnings, warnings

    async def send_outgoing(self) -> None:
        """Everything the machine asks for, except the held requests."""
        async with self._network:
            for _ in range(_ROUNDS):
                wanted = [
                    r for r in self.machine.outgoing_requests() if r.request_id not in self._held
                ]
                if not wanted:
                    return
                for request in wanted:
                    await self._send(request)
            raise AssertionError(f"the machine still asks after {_ROUNDS} rounds: {wanted}")

    # --- sync -----------------------------------------------------------------------

    def _take(self, response: SyncResponse) -> None:
        results = self.machine.receive_sync(
            to_device=[
                {"type": e.type, "sender": e.sender, "content": e.content}
                for e in response.to_device
            ],
            changed=list(response.device_lists.changed),
            left=list(response.device_lists.left),
            one_time_key_counts=response.device_one_time_keys_count,
            unused_fallback_key_types=response.device_unused_fallback_key_types,
        )
        for result in results:
            if result.refused is not None:
                self.refused.append(result)
            if result.room_key is not None:
                self.room_keys.append(result.room_key)
        for room_id, room in response.rooms.join.items():
            self.timeline.setdefault(room_id, []).extend(room.timeline.events)
        self._since = response.next_batch
        self._synced.set()
        self._synced = trio.Event()

    async def start(self) -> None:
        """Keys uploaded, then a first sync (the server's one-time key count, which
        the machine tops its keys up from)."""
        await self.send_outgoing()
        self._take(await self.client.sync(timeout_ms=0))
        await self.send_outgoing()

    async def run(self) -> None:
        """Sync, take each batch, answer the machine; until cancelled."""
        while True:
            self._take(await self.client.sync(since=self._since, timeout_ms=1000))
            await self.send_outgoing()

    async def wait_until(
        self, condition: Callable[[], bool], *, what: str, timeout: float = 60.0
    ) -> None:
        """Until ``condition`` holds after some sync batch (needs `run` going)."""
        with trio.move_on_after(timeout):
            while not condition():
                await self._synced.wait()
            return
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    # --- rooms ----------------------------------------------------------------------

    def encrypted_from(self, room_id: RoomID, sender: str) -> list[RoomEvent]:
        return [
            e
            for e in self.timeline.get(room_id, [])
            if e.sender == sender and e.type == ENCRYPTED and e.state_key is None
        ]

    async def decrypt(self, room_id: RoomID, event: RoomEvent) -> DecryptedEvent:
        """``event`` decrypted, its sender's device checked; waits (bounded by the
        caller) for its room key or the sender's device keys to arrive."""
        raw = msgspec.to_builtins(event)
        raw["room_id"] = room_id
        while True:
            try:
                return self.machine.decrypt_room_event(room_id, raw)
            except MissingRoomKey:
                await self._synced.wait()
            except UnverifiedSender:
                # The sender's device not queried yet: the machine asks for it.
                await self.send_outgoing()
                await self._synced.wait()

    async def prepare_share(
        self, room_id: RoomID, members: Sequence[str], encryption: Mapping[str, Any]
    ) -> list[ToDeviceRequest]:
        """Ready to encrypt in ``room_id``: its members' devices queried and Olm
        sessions claimed, but the to-device requests carrying the room key returned
        unsent (held: the sync loop does not send them either)."""
        async with self._network:
            for _ in range(_ROUNDS):
                requests = self.machine.share_room_key(room_id, members, encryption)
                shares = [r for r in requests if isinstance(r, ToDeviceRequest)]
                if shares or not requests:
                    self._held.update(r.request_id for r in shares)
                    return shares
                for request in requests:
                    await self._send(request)
        raise AssertionError(f"the room key of {room_id} is not ready after {_ROUNDS} rounds")

    async def release(self, held: Sequence[ToDeviceRequest]) -> None:
        """Send held room key shares."""
        async with self._network:
            for request in held:
                await self._send(request)
                self._held.discard(request.request_id)

    async def send_encrypted(
        self, room_id: RoomID, content: Mapping[str, Any], *, encryption: Mapping[str, Any]
    ) -> EventID:
        """``content`` (an m.room.message) encrypted with the room's outbound session,
        its key shared first (and sent) if it has not been."""
        members = sorted(await self.client.joined_members(room_id))
        await self.release(await self.prepare_share(room_id, members, encryption))
        return await self.send_prepared(room_id, content)

    async def send_prepared(self, room_id: RoomID, content: Mapping[str, Any]) -> EventID:
        """``content`` encrypted with the session `prepare_share` made, whether or
        not its key was sent."""
        encrypted = self.machine.encrypt_room_event(room_id, "m.room.message", content)
        return await self.client.send_event(room_id, ENCRYPTED, encrypted, new_txn_id())


@asynccontextmanager
async def open_encrypted_person(
    synapse: SynapseServer, user: RegisteredUser
) -> AsyncIterator[EncryptedPerson]:
    """``user``'s device with its keys uploaded, syncing for the block."""
    person = EncryptedPerson(synapse, user)
    async with person.client:
        await person.start()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(person.run)
            yield person
            nursery.cancel_scope.cancel()
