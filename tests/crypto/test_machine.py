"""OlmMachine end to end: two machines exchange keys through a server played by the
test, share a room key, encrypt and decrypt; restarts from persisted changes; and what
hostile servers and devices can send."""

from __future__ import annotations

import copy
import dataclasses
import json
import select
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import vodozemac
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from matrix_crypto import backup
from matrix_crypto.canonical import b64encode
from matrix_crypto.errors import CryptoError, DecryptionError, MissingRoomKey, UnverifiedSender
from matrix_crypto.identity import Identity
from matrix_crypto.machine import (
    KeysClaimRequest,
    KeysQueryRequest,
    KeysUploadRequest,
    OlmMachine,
    OutgoingRequest,
    ToDeviceRequest,
)
from matrix_crypto.state import CryptoChanges, CryptoState

ALICE = "@alice:example.org"
BOT = "@bot:example.org"
CAROL = "@carol:example.org"
ROOM = "!room:example.org"
KEY = bytes(range(32))


class Store:
    """The bot's crypto table: rows (kind, key) -> value, written from take_changes."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], str] = {}
        self.applied = CryptoState()  # the same changes through CryptoState.apply

    def save(self, machine: OlmMachine) -> None:
        changes = machine.take_changes()
        self.applied = self.applied.apply(changes)
        for kind, key, value in changes.rows():
            if value is None:
                self.rows.pop((kind, key), None)
            else:
                self.rows[(kind, key)] = json.loads(json.dumps(value))  # a real store's copy

    def state(self) -> CryptoState:
        return CryptoState.from_rows((k, key, v) for (k, key), v in self.rows.items())


class Server:
    """Just enough of a homeserver's E2EE endpoints, with JSON round trips in between."""

    def __init__(self) -> None:
        self.device_keys: dict[str, dict[str, Any]] = defaultdict(dict)
        self.otks: dict[tuple[str, str], dict[str, Any]] = defaultdict(dict)
        self.fallback: dict[tuple[str, str], tuple[str, Any, bool]] = {}  # id, key, used
        self.inbox: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        self.stores: dict[tuple[str, str], Store] = defaultdict(Store)
        self.seen_txn: set[tuple[str, str]] = set()
        self.sent: list[OutgoingRequest] = []

    def handle(self, machine: OlmMachine, request: OutgoingRequest) -> dict[str, Any]:
        self.sent.append(request)
        event_type = request.event_type if isinstance(request, ToDeviceRequest) else ""
        return self.serve(
            (machine.user_id, machine.device_id),
            request.kind,
            request.body,
            event_type,
            request.request_id,
        )

    def serve(
        self, me: tuple[str, str], kind: str, body: Any, event_type: str = "", txn_id: str = ""
    ) -> dict[str, Any]:
        """One request of ``kind`` (an OutgoingRequest.kind) from device ``me``."""
        body = json.loads(json.dumps(body))
        if kind == "keys_upload":
            if body.get("device_keys"):
                existing = self.device_keys[me[0]].get(me[1])
                assert existing in (None, body["device_keys"]), "device keys uploaded twice"
                self.device_keys[me[0]][me[1]] = body["device_keys"]
            for key_id, value in (body.get("one_time_keys") or {}).items():
                existing = self.otks[me].get(key_id)
                assert existing in (None, value), "one time key already exists"
                self.otks[me][key_id] = value
            for key_id, value in (body.get("fallback_keys") or {}).items():
                self.fallback[me] = (key_id, value, False)
            return {"one_time_key_counts": {"signed_curve25519": len(self.otks[me])}}
        if kind == "keys_query":
            return {
                "device_keys": {
                    user: dict(self.device_keys.get(user, {})) for user in body["device_keys"]
                },
                "failures": {},
            }
        if kind == "keys_claim":
            answer: dict[str, dict[str, Any]] = {}
            for user, devices in body["one_time_keys"].items():
                for device in devices:
                    pool = self.otks[(user, device)]
                    if pool:
                        key_id = sorted(pool)[0]
                        answer.setdefault(user, {})[device] = {key_id: pool.pop(key_id)}
                    elif (user, device) in self.fallback:
                        key_id, value, _ = self.fallback[(user, device)]
                        self.fallback[(user, device)] = (key_id, value, True)
                        answer.setdefault(user, {})[device] = {key_id: value}
            return {"one_time_keys": answer, "failures": {}}
        assert kind == "to_device", kind
        if (me[0], txn_id) in self.seen_txn:
            return {}
        self.seen_txn.add((me[0], txn_id))
        for user, devices in body["messages"].items():
            for device, content in devices.items():
                event = {"type": event_type, "sender": me[0], "content": content}
                self.inbox[(user, device)].append(event)
        return {}

    def run(self, machine: OlmMachine, requests: list[OutgoingRequest]) -> list[str]:
        """Send like the bot: persist first, then send, mark, persist."""
        warnings: list[str] = []
        for request in requests:
            self.stores[(machine.user_id, machine.device_id)].save(machine)
            warnings += machine.mark_request_sent(request.request_id, self.handle(machine, request))
            self.stores[(machine.user_id, machine.device_id)].save(machine)
        return warnings

    def sync(self, machine: OlmMachine, *, keep: bool = False, **extra: Any) -> list[Any]:
        me = (machine.user_id, machine.device_id)
        events = json.loads(json.dumps(self.inbox[me]))
        if not keep:
            self.inbox[me] = []
        fallback = self.fallback.get(me)
        results = machine.receive_sync(
            to_device=events,
            changed=extra.get("changed", []),
            left=extra.get("left", []),
            one_time_key_counts={"signed_curve25519": len(self.otks[me])},
            unused_fallback_key_types=["signed_curve25519"] if fallback and not fallback[2] else [],
        )
        if not keep:
            self.stores[me].save(machine)  # with the sync token
        return results

    def settle(self, *machines: OlmMachine) -> None:
        for machine in machines:
            self.run(machine, machine.outgoing_requests())

    def share(self, machine: OlmMachine, users: list[str], **kwargs: Any) -> int:
        rounds = 0
        while requests := machine.share_room_key(ROOM, users, {}, **kwargs):
            rounds += 1
            assert rounds < 5, "share_room_key does not converge"
            self.run(machine, requests)
        return rounds


def _message(sender: str, event_id: str, content: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "m.room.encrypted",
        "sender": sender,
        "event_id": event_id,
        "origin_server_ts": 1_700_000_000_000,
        "room_id": ROOM,
        "content": json.loads(json.dumps(content)),
    }


@pytest.fixture
def server() -> Server:
    return Server()


@pytest.fixture
def pair(server: Server) -> tuple[OlmMachine, OlmMachine]:
    bot = OlmMachine.create(BOT, "BOTDEV", KEY)
    alice = OlmMachine.create(ALICE, "ALICEDEV", KEY)
    server.settle(bot, alice)
    return bot, alice


def _send(
    server: Server, sender: OlmMachine, receiver: OlmMachine, text: str, event_id: str
) -> dict[str, Any]:
    server.share(sender, [sender.user_id, receiver.user_id])
    server.sync(receiver)
    content = sender.encrypt_room_event(ROOM, "m.room.message", {"msgtype": "m.text", "body": text})
    server.stores[(sender.user_id, sender.device_id)].save(sender)  # before it leaves
    return _message(sender.user_id, event_id, content)


def test_two_machines_round_trip_and_restart(
    server: Server, pair: tuple[OlmMachine, OlmMachine]
) -> None:
    bot, alice = pair
    kinds = [type(r) for r in server.sent]
    assert kinds == [KeysUploadRequest, KeysUploadRequest]
    upload = server.sent[0].body
    assert set(upload) == {"device_keys", "one_time_keys", "fallback_keys"}
    assert len(upload["one_time_keys"]) == 25

    assert server.share(alice, [ALICE, BOT]) == 3  # query, claim, share
    assert [type(r) for r in server.sent[2:]] == [
        KeysQueryRequest,
        KeysClaimRequest,
        ToDeviceRequest,
    ]
    results = server.sync(bot)
    assert len(results) == 1
    assert results[0].refused is None
    assert results[0].decrypted_type == "m.room_key"
    assert results[0].sender_device == "ALICEDEV"
    assert results[0].room_key is not None
    room, session = results[0].room_key
    assert room == ROOM

    content = alice.encrypt_room_event(
        ROOM,
        "m.room.message",
        {
            "msgtype": "m.text",
            "body": "a private hello",
            "m.relates_to": {"rel_type": "m.thread", "event_id": "$root"},
        },
    )
    assert content["algorithm"] == "m.megolm.v1.aes-sha2"
    assert content["session_id"] == session
    assert content["m.relates_to"] == {"rel_type": "m.thread", "event_id": "$root"}
    assert "private hello" not in json.dumps(content)
    server.stores[(ALICE, "ALICEDEV")].save(alice)
    event = _message(ALICE, "$1", content)
    # The bot tracks alice only once asked: then the device is known from the query.
    bot.update_tracked_users([ALICE])
    server.settle(bot)
    plain = bot.decrypt_room_event(ROOM, event)
    assert (plain.type, plain.sender, plain.device_id) == ("m.room.message", ALICE, "ALICEDEV")
    assert plain.content["body"] == "a private hello"
    assert plain.content["m.relates_to"]["rel_type"] == "m.thread"
    assert "private hello" not in repr(plain)

    # Restarted from what was persisted, the bot still decrypts it (and the next one).
    server.stores[(BOT, "BOTDEV")].save(bot)
    restored = OlmMachine.restore(BOT, "BOTDEV", server.stores[(BOT, "BOTDEV")].state(), KEY)
    assert restored.ed25519 == bot.ed25519
    assert restored.decrypt_room_event(ROOM, event).content["body"] == "a private hello"
    second = _send(server, alice, restored, "again", "$2")
    assert restored.decrypt_room_event(ROOM, second).content["body"] == "again"

    # The bot answers: alice's device gets the bot's room key and decrypts the reply.
    alice.update_tracked_users([BOT])
    server.settle(alice)
    reply = _send(server, restored, alice, "pong", "$3")
    got = alice.decrypt_room_event(ROOM, reply)
    assert (got.sender, got.device_id, got.content["body"]) == (BOT, "BOTDEV", "pong")
    # And the bot reads its own message (its outbound session is also inbound).
    assert restored.decrypt_room_event(ROOM, reply).device_id == "BOTDEV"

    # CryptoState.apply (for callers that keep the state as a value) agrees with rows.
    for store in server.stores.values():
        assert store.applied == store.state()
        assert CryptoState.from_rows(store.applied.rows()) == store.applied

    # Alice restarted too: her outbound session continues (no index reused).
    alice2 = OlmMachine.restore(ALICE, "ALICEDEV", server.stores[(ALICE, "ALICEDEV")].state(), KEY)
    third = _send(server, alice2, restored, "third", "$4")
    assert restored.decrypt_room_event(ROOM, third).content["body"] == "third"
    assert restored.decrypt_room_event(ROOM, third).message_index == 2


def test_device_keys_are_uploaded_once_per_device_id(
    server: Server, pair: tuple[OlmMachine, OlmMachine]
) -> None:
    bot, _ = pair
    assert bot.keys_uploaded
    assert bot.outgoing_requests() == []
    restored = OlmMachine.restore(BOT, "BOTDEV", server.stores[(BOT, "BOTDEV")].state(), KEY)
    assert restored.keys_uploaded
    assert restored.outgoing_requests() == []
    # The server used up 20 one-time keys: only one-time keys are topped up.
    restored.receive_sync(
        to_device=[],
        one_time_key_counts={"signed_curve25519": 5},
        unused_fallback_key_types=["signed_curve25519"],
    )
    (upload,) = restored.outgoing_requests()
    assert isinstance(upload, KeysUploadRequest)
    assert upload.device_keys is None
    assert len(upload.one_time_keys) == 20
    assert upload.fallback_keys == {}
    # Same request until answered; syncs meanwhile do not add keys.
    restored.receive_sync(to_device=[], one_time_key_counts={"signed_curve25519": 0})
    assert restored.outgoing_requests() == [upload]


def test_upload_lost_before_its_answer_is_repeated_identically(server: Server) -> None:
    bot = OlmMachine.create(BOT, "BOTDEV", KEY)
    store = Store()
    (upload,) = bot.outgoing_requests()
    store.save(bot)  # persisted before sending; the answer is lost in a crash
    server.handle(bot, upload)
    again = OlmMachine.restore(BOT, "BOTDEV", store.state(), KEY)
    (repeat,) = again.outgoing_requests()
    assert repeat.body == upload.body  # accepted by the server: same ids, same keys
    again.mark_request_sent(repeat.request_id, server.handle(again, repeat))
    assert again.outgoing_requests() == []


def test_fallback_key_rotated_when_used(
    server: Server, pair: tuple[OlmMachine, OlmMachine]
) -> None:
    bot, _ = pair
    bot.receive_sync(
        to_device=[], one_time_key_counts={"signed_curve25519": 25}, unused_fallback_key_types=[]
    )
    (upload,) = bot.outgoing_requests()
    assert isinstance(upload, KeysUploadRequest)
    assert len(upload.fallback_keys) == 1
    assert upload.one_time_keys == {}


def test_redelivered_to_device_after_a_lost_commit(
    server: Server, pair: tuple[OlmMachine, OlmMachine]
) -> None:
    bot, alice = pair
    server.share(alice, [ALICE, BOT])
    first = server.sync(bot, keep=True)  # the batch's commit did not happen
    again = server.sync(bot, keep=True)  # the same events again, same process
    assert first[0].room_key is not None
    assert again[0].refused is None
    assert again[0].ignored == "already known"
    # A process restarted from the state before the batch decrypts them afresh.
    before = OlmMachine.restore(BOT, "BOTDEV", server.stores[(BOT, "BOTDEV")].state(), KEY)
    assert server.sync(before)[0].room_key == first[0].room_key


def test_replayed_pre_key_message_after_its_commit_is_refused(
    server: Server, pair: tuple[OlmMachine, OlmMachine]
) -> None:
    bot, alice = pair
    server.share(alice, [ALICE, BOT])
    replay = copy.deepcopy(server.inbox[(BOT, "BOTDEV")])
    server.sync(bot)
    later = OlmMachine.restore(BOT, "BOTDEV", server.stores[(BOT, "BOTDEV")].state(), KEY)
    (result,) = later.receive_sync(to_device=replay)
    assert result.refused is not None
    assert result.room_key is None


def test_hostile_sync_input_never_raises(pair: tuple[OlmMachine, OlmMachine]) -> None:
    bot, _ = pair
    garbage: list[Any] = [
        None,
        5,
        "x",
        [],
        {},
        {"type": "m.room.encrypted"},
        {"type": "m.room.encrypted", "sender": ALICE, "content": None},
        {
            "type": "m.room.encrypted",
            "sender": ALICE,
            "content": {
                "algorithm": "m.olm.v1.curve25519-aes-sha2",
                "sender_key": "x" * 100_000,
                "ciphertext": {},
            },
        },
        {
            "type": "m.room.encrypted",
            "sender": ALICE,
            "content": {
                "algorithm": "m.olm.v1.curve25519-aes-sha2",
                "sender_key": Identity.create(ALICE, "X").curve25519,
                "ciphertext": {
                    bot.curve25519: {"type": 0, "body": b64encode(b"\x03" + bytes(200))}
                },
            },
        },
        {
            "type": "m.room.encrypted",
            "sender": ALICE,
            "content": {
                "algorithm": "m.olm.v1.curve25519-aes-sha2",
                "sender_key": Identity.create(ALICE, "X").curve25519,
                "ciphertext": {bot.curve25519: {"type": 1, "body": "A" * 70_000}},
            },
        },
        {"type": "m.room.encrypted", "sender": 7, "content": {}},
        {"type": "m.room_key", "sender": ALICE, "content": {"session_key": "x"}},  # in the clear
        {
            "type": "m.room.encrypted",
            "sender": ALICE,
            "content": {"algorithm": "m.megolm.v1.aes-sha2"},
        },
    ]
    results = bot.receive_sync(
        to_device=garbage,
        changed=[None, 5, ALICE, ["x"]],
        left=[{}, "@nobody:x"],
        one_time_key_counts={"signed_curve25519": "many", 5: 5},  # type: ignore[dict-item]
        unused_fallback_key_types=[None, 3],
    )
    assert len(results) == len(garbage)
    for event, result in zip(garbage, results, strict=True):
        if isinstance(event, dict) and event.get("type") == "m.room_key":
            assert result.ignored == "unencrypted to-device event"
            assert result.room_key is None
        else:
            assert result.refused, event
    assert not bot.take_changes().megolm  # no room key got in
    # Whole sections of the wrong type.
    assert bot.receive_sync(to_device=None, changed=None, left=5) == []  # type: ignore[arg-type]
    assert bot.receive_sync(to_device={"a": 1}, changed="@x:y", left={}) == []  # type: ignore[arg-type]


def test_hostile_answers_to_requests_never_raise(server: Server) -> None:
    bot = OlmMachine.create(BOT, "BOTDEV", KEY)
    now = [1000.0]
    bot._clock = lambda: now[0]  # the machine's monotonic clock, for the retry delay
    server.settle(bot)
    bot.update_tracked_users([ALICE])
    for answer in (None, [], {"device_keys": "x"}, {"device_keys": {ALICE: None}}):
        (query,) = bot.outgoing_requests()
        assert isinstance(query, KeysQueryRequest)
        assert bot.mark_request_sent(query.request_id, answer) == []
        assert ALICE in bot.outdated_users()
        # Unanswered: asked again only after the retry delay, not at every sync.
        assert bot.outgoing_requests() == []
        now[0] += 301
    (query,) = bot.outgoing_requests()
    warnings = bot.mark_request_sent(
        query.request_id, {"device_keys": {ALICE: {"D": {"junk": 1}, "E": None}}}
    )
    assert sorted(warnings) == [
        f"device D of {ALICE} refused: user_id or device_id differs from where the keys are listed",
        f"device E of {ALICE} refused: device keys are not an object",
    ]
    assert ALICE not in bot.outdated_users()  # answered: no device passes
    assert bot.devices(ALICE) == []
    assert bot.mark_request_sent("no-such-request", {"x": 1}) == []
    # A claim answered with garbage: the device is skipped, and sharing still ends.
    alice = OlmMachine.create(ALICE, "ALICEDEV", KEY)
    server.settle(alice)
    bot.receive_sync(to_device=[], changed=[ALICE])
    (query,) = bot.outgoing_requests()
    bot.mark_request_sent(query.request_id, server.handle(bot, query))
    (claim,) = bot.share_room_key(ROOM, [ALICE])
    assert isinstance(claim, KeysClaimRequest)
    bot.mark_request_sent(claim.request_id, {"one_time_keys": {ALICE: {"ALICEDEV": "junk"}}})
    assert bot.share_room_key(ROOM, [ALICE], {}) == []  # nobody to share with (retried later)


def test_claimed_key_not_signed_by_the_device_is_refused(
    server: Server, pair: tuple[OlmMachine, OlmMachine]
) -> None:
    bot, _alice = pair
    bot.update_tracked_users([ALICE, BOT])
    server.settle(bot)
    (claim,) = bot.share_room_key(ROOM, [ALICE, BOT])
    assert isinstance(claim, KeysClaimRequest)
    mallory = Identity.create(ALICE, "ALICEDEV")  # same ids, other keys: the server's forgery
    forged = mallory.one_time_keys_for({})
    key_id = sorted(forged)[0]
    warnings = bot.mark_request_sent(
        claim.request_id, {"one_time_keys": {ALICE: {"ALICEDEV": {key_id: forged[key_id]}}}}
    )
    assert warnings == [
        f"one-time key of device ALICEDEV of {ALICE}: the one-time key is not signed by the device"
    ]
    assert bot.share_room_key(ROOM, [ALICE, BOT]) == []


def test_device_whose_keys_change_is_refused(
    server: Server, pair: tuple[OlmMachine, OlmMachine]
) -> None:
    bot, alice = pair
    bot.update_tracked_users([ALICE])
    server.settle(bot)
    impostor = Identity.create(ALICE, "ALICEDEV")
    server.device_keys[ALICE]["ALICEDEV"] = impostor.device_keys()
    bot.receive_sync(to_device=[], changed=[ALICE])
    (query,) = bot.outgoing_requests()
    warnings = bot.mark_request_sent(query.request_id, server.handle(bot, query))
    assert warnings == [f"device ALICEDEV of {ALICE} refused: ed25519 key changed"]
    assert [d.ed25519 for d in bot.devices(ALICE)] == [alice.ed25519]


def test_room_event_from_a_forged_sender_is_refused(
    server: Server, pair: tuple[OlmMachine, OlmMachine]
) -> None:
    bot, alice = pair
    carol = OlmMachine.create(CAROL, "CAROLDEV", KEY)
    server.settle(carol)
    bot.update_tracked_users([ALICE, CAROL])
    server.settle(bot)
    event = _send(server, alice, bot, "I am carol", "$1")
    forged = {**event, "sender": CAROL}
    with pytest.raises(UnverifiedSender):
        bot.decrypt_room_event(ROOM, forged)
    # The deprecated clear device_id must match too.
    forged = copy.deepcopy(event)
    forged["content"]["device_id"] = "OTHERDEV"
    with pytest.raises(UnverifiedSender):
        bot.decrypt_room_event(ROOM, forged)
    assert bot.decrypt_room_event(ROOM, event).sender == ALICE


def test_room_key_from_a_device_not_known_yet(
    server: Server, pair: tuple[OlmMachine, OlmMachine]
) -> None:
    """The key is kept; the message is refused until the device is known, and the
    sender's device list is queried next."""
    bot, alice = pair
    event = _send(server, alice, bot, "hello", "$1")
    with pytest.raises(UnverifiedSender):
        bot.decrypt_room_event(ROOM, event)
    assert ALICE in bot.outdated_users()
    server.settle(bot)
    assert bot.decrypt_room_event(ROOM, event).content["body"] == "hello"


def test_room_key_whose_claims_contradict_the_known_device(
    server: Server, pair: tuple[OlmMachine, OlmMachine]
) -> None:
    """An Olm message proves its curve key; the ed25519 key and device id it claims
    inside must be those of the known device with that curve key."""
    bot, _ = pair
    mallory = Identity.create(ALICE, "PEERDEV")  # a real device of alice's account
    server.device_keys[ALICE]["PEERDEV"] = mallory.device_keys()
    bot.update_tracked_users([ALICE])
    server.settle(bot)
    pool = server.otks[(BOT, "BOTDEV")]
    otk = pool.pop(sorted(pool)[0])
    session = mallory.account.create_outbound_session(
        vodozemac.Curve25519PublicKey.from_base64(bot.curve25519),
        vodozemac.Curve25519PublicKey.from_base64(otk["key"]),
    )
    group = vodozemac.GroupSession()
    room_key = {
        "algorithm": "m.megolm.v1.aes-sha2",
        "room_id": ROOM,
        "session_id": group.session_id,
        "session_key": group.session_key.to_base64(),
    }
    other_ed25519 = Identity.create(ALICE, "X").ed25519
    cases = [
        (other_ed25519, "PEERDEV", "claimed ed25519 key differs"),
        (mallory.ed25519, "ALICEDEV", "claimed device id differs"),
        (mallory.ed25519, "PEERDEV", None),  # the honest one is stored
    ]
    for ed25519, device_id, refused in cases:
        payload = {
            "sender": ALICE,
            "sender_device": device_id,
            "keys": {"ed25519": ed25519},
            "recipient": BOT,
            "recipient_keys": {"ed25519": bot.ed25519},
            "type": "m.room_key",
            "content": room_key,
        }
        message_type, raw = session.encrypt(json.dumps(payload).encode()).to_parts()
        event = {
            "type": "m.room.encrypted",
            "sender": ALICE,
            "content": {
                "algorithm": "m.olm.v1.curve25519-aes-sha2",
                "sender_key": mallory.curve25519,
                "ciphertext": {bot.curve25519: {"type": message_type, "body": b64encode(raw)}},
            },
        }
        (result,) = bot.receive_sync(to_device=[event])
        if refused is None:
            assert result.refused is None
            assert result.room_key == (ROOM, group.session_id)
        else:
            assert result.refused is not None
            assert refused in result.refused
            assert result.room_key is None


def test_missing_room_key_then_arrives(server: Server, pair: tuple[OlmMachine, OlmMachine]) -> None:
    bot, alice = pair
    bot.update_tracked_users([ALICE])
    server.settle(bot)
    server.share(alice, [ALICE, BOT])
    content = alice.encrypt_room_event(ROOM, "m.room.message", {"body": "late"})
    event = _message(ALICE, "$late", content)
    with pytest.raises(MissingRoomKey):
        bot.decrypt_room_event(ROOM, event)
    (result,) = server.sync(bot)
    assert result.room_key == (ROOM, content["session_id"])
    assert bot.decrypt_room_event(ROOM, event).content["body"] == "late"


@pytest.mark.parametrize(
    "event",
    [
        None,
        {},
        {"sender": ALICE},
        {"sender": ALICE, "event_id": "$x", "content": None},
        {
            "sender": ALICE,
            "event_id": "$x",
            "content": {"algorithm": "m.megolm.v1.aes-sha2", "session_id": "s", "ciphertext": "!!"},
        },
        {"sender": ALICE, "event_id": "$x", "type": "m.room.message", "content": {}},
    ],
    ids=["none", "empty", "no-id", "no-content", "bad-ciphertext", "not-encrypted"],
)
def test_malformed_room_events(pair: tuple[OlmMachine, OlmMachine], event: Any) -> None:
    bot, _ = pair
    with pytest.raises(DecryptionError):
        bot.decrypt_room_event(ROOM, event)


def test_replayed_megolm_index_under_another_event_id(
    server: Server, pair: tuple[OlmMachine, OlmMachine]
) -> None:
    bot, alice = pair
    bot.update_tracked_users([ALICE])
    server.settle(bot)
    event = _send(server, alice, bot, "once", "$1")
    bot.decrypt_room_event(ROOM, event)
    bot.decrypt_room_event(ROOM, event)  # the same event again: fine
    with pytest.raises(DecryptionError):
        bot.decrypt_room_event(ROOM, {**event, "event_id": "$2"})


def test_member_leaving_rotates_the_session(
    server: Server, pair: tuple[OlmMachine, OlmMachine]
) -> None:
    bot, alice = pair
    carol = OlmMachine.create(CAROL, "CAROLDEV", KEY)
    server.settle(carol)
    server.share(bot, [BOT, ALICE, CAROL])
    first = bot.encrypt_room_event(ROOM, "m.room.message", {"body": "1"})
    assert [r.room_key for r in server.sync(alice)] == [(ROOM, first["session_id"])]
    assert [r.room_key for r in server.sync(carol)] == [(ROOM, first["session_id"])]
    bot.receive_sync(to_device=[], left=[CAROL])
    server.share(bot, [BOT, ALICE])
    second = bot.encrypt_room_event(ROOM, "m.room.message", {"body": "2"})
    assert second["session_id"] != first["session_id"]
    (result,) = server.sync(alice)
    assert result.room_key == (ROOM, second["session_id"])
    assert server.sync(carol) == []  # carol never gets the new key


def test_device_without_one_time_keys_is_skipped_and_sharing_ends(server: Server) -> None:
    bot = OlmMachine.create(BOT, "BOTDEV", KEY)
    server.settle(bot)
    lonely = Identity.create(ALICE, "NOKEYS")
    server.device_keys[ALICE]["NOKEYS"] = lonely.device_keys()  # keys, but no one-time key
    assert server.share(bot, [BOT, ALICE]) == 2  # query, claim (empty answer), nothing to share
    bot.encrypt_room_event(ROOM, "m.room.message", {"body": "x"})
    # Not claimed again at once: no request per message for a device that has no keys.
    assert bot.share_room_key(ROOM, [BOT, ALICE]) == []


def test_unanswered_to_device_share_is_offered_again_with_the_same_id(
    server: Server, pair: tuple[OlmMachine, OlmMachine]
) -> None:
    bot, _ = pair
    bot.update_tracked_users([ALICE, BOT])
    server.settle(bot)
    requests = bot.share_room_key(ROOM, [BOT, ALICE])
    (claim,) = requests
    assert isinstance(claim, KeysClaimRequest)
    server.run(bot, requests)
    (share,) = bot.share_room_key(ROOM, [BOT, ALICE])
    assert isinstance(share, ToDeviceRequest)
    # The send failed: the same request (same transaction id) comes back.
    assert bot.share_room_key(ROOM, [BOT, ALICE]) == [share]
    assert share in bot.outgoing_requests()
    server.run(bot, [share])
    assert bot.share_room_key(ROOM, [BOT, ALICE]) == []
    assert share not in bot.outgoing_requests()


def test_restore_refuses_the_wrong_key_device_or_rows(
    server: Server, pair: tuple[OlmMachine, OlmMachine]
) -> None:
    bot, _ = pair
    server.share(bot, [BOT, ALICE])
    server.stores[(BOT, "BOTDEV")].save(bot)
    state = server.stores[(BOT, "BOTDEV")].state()
    assert CryptoState.from_rows(state.rows()) == state
    with pytest.raises(CryptoError):
        OlmMachine.restore(BOT, "BOTDEV", state, bytes(32))
    with pytest.raises(CryptoError):
        OlmMachine.restore(BOT, "OTHERDEV", state, KEY)
    with pytest.raises(CryptoError):
        OlmMachine.restore(BOT, "BOTDEV", CryptoState(), KEY)
    rows = state.rows()
    for bad in ("not json", "[]", json.dumps({"user_id": 5})):
        with pytest.raises(CryptoError):
            CryptoState.from_rows([*rows[1:], ("account", "account", bad)])
    # Rows of a kind this version does not know are left alone.
    assert CryptoState.from_rows([*rows, ("future", "k", "v")]) == state


def test_take_changes_is_empty_when_nothing_changed(
    server: Server, pair: tuple[OlmMachine, OlmMachine]
) -> None:
    bot, _ = pair
    bot.take_changes()
    assert bot.take_changes().empty
    bot.receive_sync(
        to_device=[],
        one_time_key_counts={"signed_curve25519": 25},
        unused_fallback_key_types=["signed_curve25519"],
    )
    assert bot.outgoing_requests() == []
    assert bot.take_changes().empty


def test_one_time_keys_topped_up_only_from_a_stated_count(
    pair: tuple[OlmMachine, OlmMachine],
) -> None:
    bot, _ = pair
    # No count for signed_curve25519 (or a nonsense one): nothing is assumed.
    for counts in ({}, {"signed_curve25519": -1}, {"signed_curve25519": True}, {"other": 0}):
        bot.receive_sync(to_device=[], one_time_key_counts=counts)
        assert bot.outgoing_requests() == []
    bot.receive_sync(to_device=[], one_time_key_counts={"signed_curve25519": 0})
    (upload,) = bot.outgoing_requests()
    assert isinstance(upload, KeysUploadRequest)
    assert len(upload.one_time_keys) == 25
    # An answer without counts: wait for the next sync rather than guess.
    bot.mark_request_sent(upload.request_id, {})
    assert bot.outgoing_requests() == []


def test_a_top_up_upload_goes_after_the_query(pair: tuple[OlmMachine, OlmMachine]) -> None:
    bot, _ = pair
    bot.update_tracked_users([ALICE])
    bot.receive_sync(to_device=[], one_time_key_counts={"signed_curve25519": 0})
    assert [type(r) for r in bot.outgoing_requests()] == [KeysQueryRequest, KeysUploadRequest]
    fresh = OlmMachine.create(BOT, "NEWDEV", KEY)
    fresh.update_tracked_users([ALICE])
    assert [type(r) for r in fresh.outgoing_requests()] == [KeysUploadRequest, KeysQueryRequest]


# -- against matrix-rust-sdk ---------------------------------------------------------

_PEER = Path(__file__).with_name("rust_crypto_peer.mjs")
_WASM = _PEER.parent.parent / "e2ee_client/node_modules/@matrix-org/matrix-sdk-crypto-wasm"
_JS_KINDS = {0: "keys_upload", 1: "keys_query", 2: "keys_claim", 3: "to_device"}


class RustPeer:
    """matrix-rust-sdk's OlmMachine in Node, one JSON line per call, each answer
    awaited at most 30 s (a broken peer fails the test, never hangs it)."""

    def __init__(self, server: Server, user_id: str, device_id: str) -> None:
        self.server = server
        self.me = (user_id, device_id)
        self.process = subprocess.Popen(
            ["node", str(_PEER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=_PEER.parent,
        )
        self.call("init", user=user_id, device=device_id)

    def call(self, op: str, **args: Any) -> Any:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], 30)
        assert ready, f"the rust peer did not answer {op}"
        answer = json.loads(self.process.stdout.readline())
        assert answer["ok"], answer.get("error")
        return answer["result"]

    def run(self, requests: list[dict[str, Any]] | None) -> None:
        for request in requests or []:
            kind = _JS_KINDS[request["type"]]
            response = self.server.serve(
                self.me, kind, request["body"], request.get("event_type") or "", request["id"]
            )
            self.call("mark", id=request["id"], type=request["type"], response=response)

    def sync(self) -> Any:
        events, self.server.inbox[self.me] = self.server.inbox[self.me], []
        counts = {"signed_curve25519": len(self.server.otks[self.me])}
        return self.call("sync", to_device=events, counts=counts, fallback=["signed_curve25519"])

    def close(self) -> None:
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()
        self.process.kill()
        self.process.wait(timeout=10)


@pytest.fixture
def rust(server: Server) -> Iterator[RustPeer]:
    if shutil.which("node") is None or not _WASM.is_dir():
        pytest.skip("node or tests/e2ee_client's packages (npm ci) are not installed")
    peer = RustPeer(server, ALICE, "ALICEDEV")
    try:
        yield peer
    finally:
        peer.close()


def test_interop_with_matrix_rust_sdk(server: Server, rust: RustPeer) -> None:
    """Olm and Megolm both ways with the implementation Element uses, across a restart
    of our side, a rotation on theirs, and a lost Olm session on ours."""
    bot = OlmMachine.create(BOT, "BOTDEV", KEY)
    server.settle(bot)
    rust.run(rust.call("outgoing"))

    # Theirs -> ours: they claim our one-time key, Olm pre-key message, Megolm event.
    rust.call("track", users=[ALICE, BOT])
    rust.run(rust.call("outgoing"))
    rust.run([rust.call("missing", users=[ALICE, BOT])])
    rust.run(rust.call("share", room=ROOM, users=[ALICE, BOT]))
    content = rust.call("encrypt", room=ROOM, type="m.room.message", content={"body": "from rust"})
    (result,) = server.sync(bot)
    assert (result.decrypted_type, result.refused) == ("m.room_key", None)
    bot.update_tracked_users([ALICE])
    server.settle(bot)
    event = _message(ALICE, "$r1", content)
    plain = bot.decrypt_room_event(ROOM, event)
    assert (plain.content, plain.sender, plain.device_id) == (
        {"body": "from rust"},
        ALICE,
        "ALICEDEV",
    )

    # Ours -> theirs: our room key over the Olm session they opened; relations in clear.
    server.share(bot, [BOT, ALICE])
    relation = {"rel_type": "m.thread", "event_id": "$r1"}
    ours = bot.encrypt_room_event(
        ROOM, "m.room.message", {"body": "from us", "m.relates_to": relation}
    )
    server.stores[(BOT, "BOTDEV")].save(bot)
    (shared,) = rust.sync()
    assert shared["type"] == "m.room_key"
    got = rust.call("decrypt", room=ROOM, event=_message(BOT, "$p1", ours))
    assert got["event"]["content"] == {"body": "from us", "m.relates_to": relation}
    assert (got["sender"], got["device"]) == (BOT, "BOTDEV")

    # Our side restarts from what it persisted; they rotate (a normal Olm message now).
    restored = OlmMachine.restore(BOT, "BOTDEV", server.stores[(BOT, "BOTDEV")].state(), KEY)
    rust.call("invalidate", room=ROOM)
    rust.run(rust.call("share", room=ROOM, users=[ALICE, BOT]))
    assert [
        e["content"]["ciphertext"][bot.curve25519]["type"] for e in server.inbox[(BOT, "BOTDEV")]
    ] == [1]
    (result,) = server.sync(restored)
    assert result.room_key is not None
    rotated = rust.call("encrypt", room=ROOM, type="m.room.message", content={"body": "rotated"})
    assert restored.decrypt_room_event(ROOM, _message(ALICE, "$r2", rotated)).content == {
        "body": "rotated"
    }
    again = restored.encrypt_room_event(ROOM, "m.room.message", {"body": "after restart"})
    got = rust.call("decrypt", room=ROOM, event=_message(BOT, "$p2", again))
    assert got["event"]["content"] == {"body": "after restart"}
    # Our Olm session with them lost: their next room key is undecryptable, we start a
    # new session (m.dummy), and they switch to it.
    server.stores[(BOT, "BOTDEV")].save(restored)
    state = dataclasses.replace(server.stores[(BOT, "BOTDEV")].state(), olm_sessions=())
    lost = OlmMachine.restore(BOT, "BOTDEV", state, KEY)
    rust.call("invalidate", room=ROOM)
    rust.run(rust.call("share", room=ROOM, users=[ALICE, BOT]))
    (result,) = server.sync(lost)
    assert result.refused is not None
    for _ in range(2):  # the claim, then the m.dummy
        server.run(lost, lost.outgoing_requests())
    assert [e["type"] for e in rust.sync()] == ["m.dummy"]
    rust.call("invalidate", room=ROOM)
    rust.run(rust.call("share", room=ROOM, users=[ALICE, BOT]))
    (result,) = server.sync(lost)
    assert result.room_key is not None


def test_wedged_olm_session_is_replaced(
    server: Server, pair: tuple[OlmMachine, OlmMachine]
) -> None:
    """The bot cannot decrypt a device's Olm messages (here: it lost the session): it
    claims a new one-time key of that device, sends an m.dummy through a new session,
    and the device's next messages use that session."""
    bot, alice = pair
    now = [5000.0]
    server.share(alice, [ALICE, BOT])
    server.sync(bot)
    server.share(bot, [BOT, ALICE])  # bot answers through alice's session
    server.sync(alice)
    server.stores[(BOT, "BOTDEV")].save(bot)
    state = dataclasses.replace(server.stores[(BOT, "BOTDEV")].state(), olm_sessions=())
    lost = OlmMachine.restore(BOT, "BOTDEV", state, KEY)
    lost._clock = lambda: now[0]

    alice._groups.discard_outbound(ROOM)  # a new room key, over alice's old session
    server.share(alice, [ALICE, BOT])
    (result,) = server.sync(lost)
    assert result.refused == "no Olm session with this sender decrypts the message"
    claim, upload = lost.outgoing_requests()  # and its own top-up (alice used a key)
    assert isinstance(upload, KeysUploadRequest)
    server.run(lost, [upload])
    assert isinstance(claim, KeysClaimRequest)
    assert claim.one_time_keys == {ALICE: {"ALICEDEV": "signed_curve25519"}}
    server.run(lost, [claim])
    (dummy,) = lost.outgoing_requests()
    assert isinstance(dummy, ToDeviceRequest)
    server.run(lost, [dummy])
    assert lost.outgoing_requests() == []
    (got,) = server.sync(alice)
    assert (got.decrypted_type, got.refused) == ("m.dummy", None)

    alice._groups.discard_outbound(ROOM)
    server.share(alice, [ALICE, BOT])
    (result,) = server.sync(lost)
    assert result.room_key is not None  # through the new session

    # Another undecryptable message within the hour: no new claim (one-time keys are
    # the device's to lose, and anyone can send a garbage message in its name).
    alice._groups.discard_outbound(ROOM)
    server.share(alice, [ALICE, BOT])
    event = server.inbox[(BOT, "BOTDEV")][0]
    body = event["content"]["ciphertext"][bot.curve25519]["body"]
    event["content"]["ciphertext"][bot.curve25519]["body"] = body[:-8] + "AAAAAAAA"
    (result,) = server.sync(lost)
    assert result.refused == "no Olm session with this sender decrypts the message"
    assert lost.outgoing_requests() == []
    now[0] += 3601
    lost.receive_sync(to_device=[event])
    assert [type(r) for r in lost.outgoing_requests()] == [KeysClaimRequest]


def test_undecryptable_olm_from_an_unknown_device_queries_first(
    server: Server, pair: tuple[OlmMachine, OlmMachine]
) -> None:
    bot, alice = pair
    server.share(alice, [ALICE, BOT])
    server.sync(bot)
    server.share(bot, [BOT, ALICE])
    server.sync(alice)
    server.stores[(BOT, "BOTDEV")].save(bot)
    state = dataclasses.replace(
        server.stores[(BOT, "BOTDEV")].state(), olm_sessions=(), devices=(), tracked_users=()
    )
    lost = OlmMachine.restore(BOT, "BOTDEV", state, KEY)
    alice._groups.discard_outbound(ROOM)
    server.share(alice, [ALICE, BOT])
    server.sync(lost)
    assert ALICE in lost.outdated_users()
    query, upload = lost.outgoing_requests()  # and its own one-time key top-up
    assert isinstance(upload, KeysUploadRequest)
    assert isinstance(query, KeysQueryRequest)
    server.run(lost, [query, upload])
    (claim,) = lost.outgoing_requests()
    assert isinstance(claim, KeysClaimRequest)


def test_inbound_sessions_megolm_drops_are_deleted_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """megolm.py bounds the inbound sessions per sender key; what it drops leaves the
    store too (requested by megolm)."""
    from matrix_crypto import megolm

    monkeypatch.setattr(megolm, "SESSIONS_PER_SENDER_LIMIT", 1)
    groups = megolm.GroupSessions(KEY)
    sender = Identity.create(ALICE, "A")
    ids = []
    for _ in range(2):
        outbound = vodozemac.GroupSession()
        ids.append(outbound.session_id)
        content = {
            "algorithm": "m.megolm.v1.aes-sha2",
            "room_id": ROOM,
            "session_id": outbound.session_id,
            "session_key": outbound.session_key.to_base64(),
        }
        outcome = groups.add_room_key(
            content, sender_curve25519=sender.curve25519, sender_ed25519=sender.ed25519
        )
        assert outcome.stored
    changes = CryptoChanges(megolm=groups.take_changes())
    deletes = [(k, key) for k, key, v in changes.rows() if v is None]
    assert deletes == [
        ("inbound_group", json.dumps([ROOM, sender.curve25519, ids[0]], separators=(",", ":")))
    ]
    state = CryptoState().apply(changes)
    assert [r.session_id for r in state.inbound_group_sessions] == [ids[1]]


def test_no_pickle_or_key_in_a_repr(server: Server, pair: tuple[OlmMachine, OlmMachine]) -> None:
    bot, alice = pair
    server.share(alice, [ALICE, BOT])
    results = server.sync(bot, keep=True)
    changes = bot.take_changes()
    shown = repr(changes) + repr(results)
    assert "session_key" not in shown
    records = [changes.account, *changes.olm_sessions, *changes.megolm.inbound]
    assert len(records) >= 3
    for record in records:
        assert record is not None
        assert record.pickle not in shown


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(junk=_json, ciphertext=_json, message_type=_json, body=_json)
def test_receive_sync_never_raises_property(
    pair: tuple[OlmMachine, OlmMachine], junk: Any, ciphertext: Any, message_type: Any, body: Any
) -> None:
    """Random JSON anywhere in a to-device event, around real keys: refused, never raised."""
    bot, alice = pair
    events = [
        junk,
        {"type": "m.room.encrypted", "sender": ALICE, "content": junk},
        {
            "type": "m.room.encrypted",
            "sender": ALICE,
            "content": {
                "algorithm": "m.olm.v1.curve25519-aes-sha2",
                "sender_key": alice.curve25519,
                "ciphertext": ciphertext,
            },
        },
        {
            "type": "m.room.encrypted",
            "sender": ALICE,
            "content": {
                "algorithm": "m.olm.v1.curve25519-aes-sha2",
                "sender_key": alice.curve25519,
                "ciphertext": {bot.curve25519: {"type": message_type, "body": body}},
            },
        },
    ]
    results = bot.receive_sync(
        to_device=events,
        changed=junk,
        left=junk,
        one_time_key_counts=junk,
        unused_fallback_key_types=junk,
    )
    assert len(results) == len(events)
    assert all(r.room_key is None for r in results)
    with pytest.raises(DecryptionError):
        bot.decrypt_room_event(ROOM, {"sender": ALICE, "event_id": "$j", "content": junk})
    assert isinstance(bot.mark_request_sent("unknown", junk), list)


def test_a_new_device_restored_from_the_backup_reads_what_the_old_one_could(
    server: Server, pair: tuple[OlmMachine, OlmMachine]
) -> None:
    """The bot's backup of a key it had from alice's device restores trusted on a new
    device (an authenticated entry); the same key filed by anyone who knows only the
    backup's public key restores untrusted, and its events are refused."""
    bot, alice = pair
    bot.update_tracked_users([ALICE])
    server.settle(bot)
    before = _send(server, alice, bot, "before the loss", "$before")
    assert bot.decrypt_room_event(ROOM, before).content["body"] == "before the loss"
    [(key, (first, trusted))] = bot.backup_states().items()
    assert (first, trusted) == (0, True)
    to_back_up = bot.room_key_to_back_up(*key)
    assert to_back_up is not None
    assert to_back_up.authenticated
    assert bot.room_key_to_back_up(ROOM, "unknown", "unknown") is None
    backup_key = backup.BackupKey.create()
    ours = backup.authenticated_backup_data(backup_key, BOT, to_back_up)
    anyones = backup.backup_data(backup_key.public_key, to_back_up)
    gap = alice.encrypt_room_event(ROOM, "m.room.message", {"body": "in the gap"})
    in_the_gap = _message(ALICE, "$gap", gap)

    for device_id, data, readable in (("NEWDEV", ours, True), ("OTHERDEV", anyones, False)):
        new = OlmMachine.create(BOT, device_id, KEY)
        server.settle(new)
        new.update_tracked_users([ALICE])
        server.settle(new)
        with pytest.raises(MissingRoomKey):
            new.decrypt_room_event(ROOM, in_the_gap)
        restored = backup.decrypt_session(
            backup_key, data, room_id=ROOM, session_id=to_back_up.session_id, user_id=BOT
        )
        assert new.import_backed_up([restored]) == 1
        assert new.import_backed_up([restored]) == 0  # already known
        assert not new.take_changes().empty
        if readable:
            assert new.decrypt_room_event(ROOM, in_the_gap).content["body"] == "in the gap"
        else:
            with pytest.raises(UnverifiedSender):
                new.decrypt_room_event(ROOM, in_the_gap)
