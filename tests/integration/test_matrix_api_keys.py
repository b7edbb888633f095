"""The E2EE endpoints against a real Synapse: device keys signed with vodozemac go up,
come back to another user byte for byte (their signature still verifies), one-time and
fallback keys are counted in /sync and claimed, to-device messages arrive once per
transaction id, and device list changes reach a user sharing a room.

The signing here is a few lines of canonical JSON written for the test, on purpose:
the crypto layer (`matrix_crypto`) is tested on its own.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import vodozemac

from matrix_api import MatrixClient, MatrixError, new_txn_id
from matrix_api.models import SyncResponse, SyncToken, UserID
from matrix_api.testing.synapse import RegisteredUser, SynapseServer
from matrix_helpers import MakeUser, client_for, sync_until

OLM = "m.olm.v1.curve25519-aes-sha2"
MEGOLM = "m.megolm.v1.aes-sha2"
SIGNED_CURVE = "signed_curve25519"


def canonical(value: Any) -> bytes:
    """Matrix canonical JSON: sorted keys, no spaces, UTF-8 unescaped."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode()


class Device:
    """One device of one user: a vodozemac account and its signed key objects."""

    def __init__(self, user_id: str, device_id: str) -> None:
        self.user_id = user_id
        self.device_id = device_id
        self.account = vodozemac.Account()

    @property
    def ed25519(self) -> str:
        return self.account.ed25519_key.to_base64()

    def sign(self, value: dict[str, Any]) -> dict[str, Any]:
        unsigned = {k: v for k, v in value.items() if k not in ("signatures", "unsigned")}
        signature = self.account.sign(canonical(unsigned)).to_base64()
        return {**value, "signatures": {self.user_id: {f"ed25519:{self.device_id}": signature}}}

    def device_keys(self) -> dict[str, Any]:
        return self.sign(
            {
                "user_id": self.user_id,
                "device_id": self.device_id,
                "algorithms": [OLM, MEGOLM],
                "keys": {
                    f"curve25519:{self.device_id}": self.account.curve25519_key.to_base64(),
                    f"ed25519:{self.device_id}": self.ed25519,
                },
            }
        )

    def one_time_keys(self, count: int) -> dict[str, Any]:
        self.account.generate_one_time_keys(count)
        keys = {
            f"{SIGNED_CURVE}:{key_id}": self.sign({"key": key.to_base64()})
            for key_id, key in self.account.one_time_keys.items()
        }
        self.account.mark_keys_as_published()
        return keys

    def fallback_key(self) -> dict[str, Any]:
        # The Python bindings make no fallback key; any curve25519 key will do for the server.
        key = vodozemac.Account().curve25519_key.to_base64()
        return {f"{SIGNED_CURVE}:fallback1": self.sign({"key": key, "fallback": True})}


def verifies(key_object: dict[str, Any], user_id: str, device_id: str, ed25519: str) -> bool:
    """Whether ``key_object`` as received carries a valid signature by ``ed25519``."""
    signed = {k: v for k, v in key_object.items() if k not in ("signatures", "unsigned")}
    signature = key_object["signatures"][user_id][f"ed25519:{device_id}"]
    try:
        vodozemac.Ed25519PublicKey.from_base64(ed25519).verify_signature(
            canonical(signed), vodozemac.Ed25519Signature.from_base64(signature)
        )
    except vodozemac.SignatureException:
        return False
    return True


def device_of(user: RegisteredUser) -> Device:
    return Device(user.user_id, user.device_id)


async def first_sync(client: MatrixClient) -> SyncResponse:
    with trio.fail_after(30):
        return await client.sync()


async def test_device_keys_come_back_to_another_user_as_uploaded(
    synapse: SynapseServer, make_user: MakeUser
) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    device = device_of(alice)
    device_keys = device.device_keys()

    async with client_for(synapse, alice) as a, client_for(synapse, bob) as b:
        with trio.fail_after(30):
            counts = await a.upload_keys(device_keys=device_keys)
            # A retried upload of the same keys is harmless (why upload_keys is idempotent).
            assert await a.upload_keys(device_keys=device_keys) == counts
            everything = await b.query_keys({alice.user_id: [], "@nobody:localhost": []})
            one = await b.query_keys({alice.user_id: [alice.device_id]}, timeout_ms=None)
            unknown_device = await b.query_keys({alice.user_id: ["NOSUCHDEVICE"]})

    assert counts.get(SIGNED_CURVE, 0) == 0  # no one-time keys yet (Synapse says 0)
    got = everything.device_keys[UserID(alice.user_id)][alice.device_id]
    assert {k: v for k, v in got.items() if k != "unsigned"} == device_keys
    assert verifies(got, alice.user_id, alice.device_id, device.ed25519)
    # An unknown user has no devices (Synapse lists it with none; the spec allows absent).
    assert everything.device_keys.get(UserID("@nobody:localhost"), {}) == {}
    assert (everything.failures, everything.skipped) == ({}, [])
    assert one.device_keys == {alice.user_id: {alice.device_id: got}}
    assert unknown_device.device_keys.get(UserID(alice.user_id), {}) == {}


async def test_one_time_keys_are_counted_in_sync_and_claimed_once(
    synapse: SynapseServer, make_user: MakeUser
) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    device = device_of(alice)

    async with client_for(synapse, alice) as a, client_for(synapse, bob) as b:
        since = (await first_sync(a)).next_batch
        otks = device.one_time_keys(5)
        with trio.fail_after(30):
            counts = await a.upload_keys(device_keys=device.device_keys(), one_time_keys=otks)
            # The same keys again, as a retry after a lost answer sends them: no error,
            # nothing counted twice.
            assert await a.upload_keys(one_time_keys=otks) == counts
        _, since = await sync_until(
            a, since, lambda r: r.device_one_time_keys_count.get(SIGNED_CURVE) == 5
        )

        with trio.fail_after(30):
            claimed = await b.claim_keys({alice.user_id: {alice.device_id: SIGNED_CURVE}})
        _, since = await sync_until(
            a, since, lambda r: r.device_one_time_keys_count.get(SIGNED_CURVE) == 4
        )
        with trio.fail_after(30):
            second = await b.claim_keys({alice.user_id: {alice.device_id: SIGNED_CURVE}})
            nobody = await b.claim_keys({"@nobody:localhost": {"X": SIGNED_CURVE}})

    assert counts == {SIGNED_CURVE: 5}
    [(key_id, key)] = claimed.one_time_keys[UserID(alice.user_id)][alice.device_id].items()
    assert otks[key_id] == key
    assert verifies(key, alice.user_id, alice.device_id, device.ed25519)
    [second_id] = second.one_time_keys[UserID(alice.user_id)][alice.device_id]
    assert second_id != key_id  # each key is given out once
    assert (claimed.failures, claimed.skipped) == ({}, [])
    assert nobody.one_time_keys == {}


async def test_a_different_key_under_a_known_id_is_refused(
    synapse: SynapseServer, make_user: MakeUser
) -> None:
    # The other half of why a retried upload is safe: the server tells "same key again"
    # (accepted above) from "another key under that id" (refused here).
    alice = make_user("alice")
    device = device_of(alice)
    [(key_id, key)] = device.one_time_keys(1).items()
    other = device.sign({"key": vodozemac.Account().curve25519_key.to_base64()})

    async with client_for(synapse, alice) as a:
        with trio.fail_after(30):
            await a.upload_keys(one_time_keys={key_id: key})
            with pytest.raises(MatrixError) as refused:
                await a.upload_keys(one_time_keys={key_id: other})

    assert refused.value.status == 400


async def test_a_fallback_key_is_listed_until_it_is_claimed(
    synapse: SynapseServer, make_user: MakeUser
) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    device = device_of(alice)
    fallback = device.fallback_key()

    async with client_for(synapse, alice) as a, client_for(synapse, bob) as b:
        initial = await first_sync(a)
        with trio.fail_after(30):
            await a.upload_keys(device_keys=device.device_keys(), fallback_keys=fallback)
        synced, since = await sync_until(
            a, initial.next_batch, lambda r: r.device_unused_fallback_key_types == [SIGNED_CURVE]
        )
        with trio.fail_after(30):
            # No one-time key left: the fallback key is handed out (and stays on the server).
            claimed = await b.claim_keys({alice.user_id: {alice.device_id: SIGNED_CURVE}})
            again = await b.claim_keys({alice.user_id: {alice.device_id: SIGNED_CURVE}})
        used, since = await sync_until(a, since, lambda r: r.device_unused_fallback_key_types == [])

    # Synapse does fallback keys: the list is there, empty, before any was uploaded.
    assert initial.device_unused_fallback_key_types == []
    assert synced.device_one_time_keys_count.get(SIGNED_CURVE, 0) == 0
    alice_keys = claimed.one_time_keys[UserID(alice.user_id)][alice.device_id]
    assert alice_keys == fallback
    assert again.one_time_keys == claimed.one_time_keys
    assert verifies(
        alice_keys[f"{SIGNED_CURVE}:fallback1"], alice.user_id, alice.device_id, device.ed25519
    )
    assert used.skipped == []


async def test_a_to_device_message_arrives_once_per_transaction_id(
    synapse: SynapseServer, make_user: MakeUser
) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    txn_id = new_txn_id()
    content = {"body": "once", "unicode": "ключ ✓"}

    async with client_for(synapse, alice) as a, client_for(synapse, bob) as b:
        since = (await first_sync(a)).next_batch
        with trio.fail_after(30):
            messages = {alice.user_id: {alice.device_id: content}}
            await b.send_to_device("org.example.test", messages, txn_id)
            # A retry of the same request, as after a lost answer: same transaction id.
            await b.send_to_device("org.example.test", messages, txn_id)
            # Then a marker under a new id, to all of alice's devices: once it is seen,
            # a duplicate of the first (sent before it) would have been seen too.
            marker = {alice.user_id: {"*": {"body": "marker"}}}
            await b.send_to_device("org.example.test", marker, new_txn_id())

        received: list[dict[str, Any]] = []

        def collect(response: SyncResponse) -> bool:
            received.extend(
                {"type": e.type, "sender": e.sender, "content": e.content}
                for e in response.to_device
            )
            return any(r["content"] == {"body": "marker"} for r in received)

        _, since = await sync_until(a, since, collect)

    assert received == [
        {"type": "org.example.test", "sender": bob.user_id, "content": content},
        {"type": "org.example.test", "sender": bob.user_id, "content": {"body": "marker"}},
    ]


async def test_to_device_messages_are_redelivered_until_the_token_moves(
    synapse: SynapseServer, make_user: MakeUser
) -> None:
    # What the crypto layer must tolerate: the same to-device event twice.
    alice, bob = make_user("alice"), make_user("bob")

    async with client_for(synapse, alice) as a, client_for(synapse, bob) as b:
        since = (await first_sync(a)).next_batch
        with trio.fail_after(30):
            await b.send_to_device(
                "org.example.test", {alice.user_id: {alice.device_id: {"n": 1}}}, new_txn_id()
            )
        first, _ = await sync_until(a, since, lambda r: bool(r.to_device))
        with trio.fail_after(30):
            replay = await a.sync(since=since)

    assert [e.content for e in first.to_device] == [{"n": 1}]
    assert [e.content for e in replay.to_device] == [{"n": 1}]


async def test_device_list_changes_reach_a_user_sharing_a_room(
    synapse: SynapseServer, make_user: MakeUser
) -> None:
    alice, bob = make_user("alice"), make_user("bob")

    async with client_for(synapse, alice) as a, client_for(synapse, bob) as b:
        with trio.fail_after(30):
            room_id = await a.create_room(invite=[bob.user_id])
            await b.join_room(room_id)
        start = (await first_sync(a)).next_batch

        with trio.fail_after(30):
            await b.upload_keys(device_keys=device_of(bob).device_keys())
        changed, after_upload = await sync_until(
            a, start, lambda r: bob.user_id in r.device_lists.changed
        )
        with trio.fail_after(30):
            between = await a.keys_changes(start, after_upload)

        with trio.fail_after(30):
            await b.leave_room(room_id)
        left, _ = await sync_until(a, after_upload, lambda r: bob.user_id in r.device_lists.left)

    assert alice.user_id not in changed.device_lists.left
    assert bob.user_id in between.changed
    assert left.skipped == changed.skipped == []


async def test_a_user_sharing_no_room_is_not_announced(
    synapse: SynapseServer, make_user: MakeUser
) -> None:
    alice, carol = make_user("alice"), make_user("carol")

    async with client_for(synapse, alice) as a, client_for(synapse, carol) as c:
        start = (await first_sync(a)).next_batch
        with trio.fail_after(30):
            await c.upload_keys(device_keys=device_of(carol).device_keys())
            end = (await a.sync(since=start)).next_batch
            between = await a.keys_changes(SyncToken(start), SyncToken(end))

    assert carol.user_id not in between.changed
