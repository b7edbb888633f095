"""bot.e2ee.verification: who may verify the bot, what it looks up before answering, what
the operator reads in the log, how sends that fail are retried, and the signature of a
verified user's master key. The protocol itself is tested in tests/crypto."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import trio
import trio.testing
import vodozemac
from structlog.testing import capture_logs

from bot.config import AllowList, Settings
from bot.e2ee.crypto import BotCrypto
from bot.e2ee.verification import BotVerifications
from matrix_api import NetworkError
from matrix_api.models import KeysQueryResponse, SignaturesUploadResponse, UserID, decode_sync
from matrix_crypto.canonical import verify
from matrix_crypto.cross_signing import CrossSigningKeys
from matrix_crypto.devices import Device
from matrix_crypto.verification import EMOJI, Verified

BOT = "@bot:example.org"
BOT_DEVICE = "BOTDEVICE"
ALICE = "@alice:example.org"
OPS = "@ops:other.org"
EVE = "@eve:elsewhere.org"
KEY = bytes(range(32))
NOW_S = 1_800_000_000.0


def _ed25519() -> str:
    return vodozemac.Account().ed25519_key.to_base64()


@dataclass
class _Machine:
    user_id: str = BOT
    device_id: str = BOT_DEVICE
    ed25519: str = field(default_factory=_ed25519)
    known: dict[str, list[Device]] = field(default_factory=dict)

    def devices(self, user_id: str) -> list[Device]:
        return self.known.get(user_id, [])


class _Client:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any], str]] = []
        self.fail_sends = 0
        self.masters: dict[str, dict[str, Any]] = {}
        self.signed: list[Mapping[str, Any]] = []
        self.queried: list[str] = []
        self.room_sent: list[tuple[str, str, dict[str, Any], str]] = []

    async def send_to_device(
        self, event_type: str, messages: Mapping[str, Any], txn_id: str
    ) -> None:
        if self.fail_sends:
            self.fail_sends -= 1
            raise NetworkError("connection refused", maybe_processed=False)
        self.sent.append((event_type, dict(messages), txn_id))

    async def send_event(
        self, room_id: str, event_type: str, content: Mapping[str, Any], txn_id: str
    ) -> str:
        # The real client (EncryptingClient) encrypts in an encrypted room.
        self.room_sent.append((room_id, event_type, dict(content), txn_id))
        return "$sent"

    async def query_keys(self, users: Mapping[str, Any], **_: Any) -> KeysQueryResponse:
        self.queried.extend(users)
        return KeysQueryResponse(
            master_keys={UserID(u): self.masters[u] for u in users if u in self.masters}
        )

    async def upload_signatures(self, signed: Mapping[str, Any]) -> SignaturesUploadResponse:
        self.signed.append(signed)
        return SignaturesUploadResponse()


class _Crypto:
    def __init__(self) -> None:
        self.machine = _Machine()
        self.client = _Client()
        self.own: dict[str, str] = {}
        self.ensured: list[str] = []
        self.on_ensure: dict[str, Device] = {}

    async def ensure_devices(self, users: list[str]) -> None:
        self.ensured.extend(users)
        for user in users:
            if user in self.on_ensure:
                self.machine.known.setdefault(user, []).append(self.on_ensure[user])


def _bot(crypto: _Crypto, *, pickle_key: bytes | None = KEY) -> BotVerifications:
    settings = Settings(
        homeserver="https://example.org",
        user_id=BOT,
        allowed=AllowList(servers=frozenset({"example.org"})),
        admins=frozenset({OPS}),
    )
    return BotVerifications(cast("BotCrypto", crypto), settings, pickle_key, clock=lambda: NOW_S)


def _request(sender: str, device: str, txn: str = "txn1") -> dict[str, Any]:
    return {
        "type": "m.key.verification.request",
        "sender": sender,
        "content": {
            "transaction_id": txn,
            "from_device": device,
            "methods": ["m.sas.v1"],
            "timestamp": int(NOW_S * 1000),
        },
    }


def _start(sender: str, device: str, txn: str = "txn1") -> dict[str, Any]:
    return {
        "type": "m.key.verification.start",
        "sender": sender,
        "content": {
            "transaction_id": txn,
            "from_device": device,
            "method": "m.sas.v1",
            "key_agreement_protocols": ["curve25519-hkdf-sha256"],
            "hashes": ["sha256"],
            "message_authentication_codes": ["hkdf-hmac-sha256.v2"],
            "short_authentication_string": ["decimal", "emoji"],
        },
    }


def _master_object(user_id: str) -> tuple[str, dict[str, Any]]:
    key = _ed25519()
    return key, {"user_id": user_id, "usage": ["master"], "keys": {f"ed25519:{key}": key}}


def _types(client: _Client) -> list[tuple[str, str]]:
    return [(t, next(iter(m))) for t, m, _ in client.sent]


async def _round(bot: BotVerifications) -> None:
    """One pass of `run`'s work (look-ups, sends, signatures), then stop."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(bot.run)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()


async def test_an_allowed_user_is_looked_up_then_answered_and_the_sas_logged() -> None:
    crypto = _Crypto()
    alice_device = Device(ALICE, "ALICEDEV", "curve", _ed25519(), ())
    crypto.on_ensure[ALICE] = alice_device
    master, obj = _master_object(ALICE)
    crypto.client.masters[ALICE] = obj
    bot = _bot(crypto)
    with capture_logs() as logs:
        bot.receive([_request(ALICE, "ALICEDEV"), {"type": "m.room.encrypted"}, "junk"])
        await _round(bot)
        assert crypto.ensured == [ALICE]
        assert crypto.client.queried == [ALICE]
        assert _types(crypto.client) == [("m.key.verification.ready", ALICE)]
        bot.receive([_start(ALICE, "ALICEDEV")])
        key = vodozemac.Sas().public_key.to_base64()
        bot.receive(
            [
                {
                    "type": "m.key.verification.key",
                    "sender": ALICE,
                    "content": {"transaction_id": "txn1", "key": key},
                }
            ]
        )
        await _round(bot)
    assert [t for t, _ in _types(crypto.client)] == [
        "m.key.verification.ready",
        "m.key.verification.accept",
        "m.key.verification.key",
        "m.key.verification.mac",
    ]
    # The bot knows Alice's master key (for checking her MAC).
    assert bot._master_key(ALICE) == master
    [requested] = [e for e in logs if e["event"] == "verification_requested"]
    assert requested["user_id"] == ALICE
    [sas] = [e for e in logs if e["event"] == "verification_sas"]
    assert sas["user_id"] == ALICE
    assert sas["device_id"] == "ALICEDEV"
    assert len(sas["emoji"]) == 7
    assert all(name in {e.description for e in EMOJI} for name in sas["emoji"])
    assert len(sas["decimals"]) == 3
    # Nothing secret in the operator's line: no key, no MAC.
    assert key not in json.dumps(sas)
    assert crypto.machine.ed25519 not in json.dumps(sas)


async def test_an_admin_outside_the_allowed_users_may_verify_a_stranger_may_not() -> None:
    crypto = _Crypto()
    crypto.on_ensure[OPS] = Device(OPS, "OPSDEV", "curve", _ed25519(), ())
    bot = _bot(crypto)
    with capture_logs() as logs:
        bot.receive([_request(OPS, "OPSDEV", "t1"), _request(EVE, "EVEDEV", "t2")])
        await _round(bot)
    sent = {(t, u, m[u][next(iter(m[u]))].get("code")) for t, m, _ in crypto.client.sent for u in m}
    assert sent == {
        ("m.key.verification.ready", OPS, None),
        ("m.key.verification.cancel", EVE, "m.user"),
    }
    [cancelled] = [e for e in logs if e["event"] == "verification_cancelled"]
    assert (cancelled["user_id"], cancelled["code"], cancelled["by_bot"]) == (EVE, "m.user", True)
    assert crypto.ensured == [OPS]  # nothing looked up for a stranger


async def test_a_device_the_bot_cannot_see_is_refused_before_any_emoji() -> None:
    crypto = _Crypto()  # ensure_devices finds nothing for Alice
    bot = _bot(crypto)
    bot.receive([_request(ALICE, "NEWDEVICE")])
    await _round(bot)
    assert [(t, m[ALICE]["NEWDEVICE"].get("code")) for t, m, _ in crypto.client.sent] == [
        ("m.key.verification.ready", None),
        ("m.key.verification.cancel", "m.key_mismatch"),
    ]
    assert bot.machine.active() == []


async def test_a_failed_send_is_retried_in_order_then_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    crypto = _Crypto()
    crypto.on_ensure[ALICE] = Device(ALICE, "ALICEDEV", "curve", _ed25519(), ())
    bot = _bot(crypto)
    crypto.client.fail_sends = 1
    bot.receive([_request(ALICE, "ALICEDEV")])
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bot.run)
            with trio.fail_after(10):
                while not crypto.client.sent:  # noqa: ASYNC110  # the fake has no event
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert [e["attempt"] for e in logs if e["event"] == "verification_send_failed"] == [1]
    # Retried with the same transaction id: the server delivers it once.
    assert len(crypto.client.sent) == 1
    # A message the server keeps refusing goes after three tries (no endless loop).
    crypto.client.fail_sends = 3
    bot.machine.cancel("txn1", "m.user", "bye", int(NOW_S * 1000))
    for _ in range(3):
        await bot._send()
    assert bot.machine.outgoing_requests() == []
    assert len(crypto.client.sent) == 1


async def test_a_verified_users_master_key_is_signed_with_the_user_signing_key() -> None:
    crypto = _Crypto()
    keys = CrossSigningKeys.create(BOT)
    record = dataclasses.asdict(keys.to_record(KEY))
    crypto.own["cross_signing"] = json.dumps(record)
    crypto.own["cross_signed_device"] = BOT_DEVICE
    master, obj = _master_object(ALICE)
    crypto.client.masters[ALICE] = obj
    bot = _bot(crypto)
    # Our own master key goes into our MAC only once it signed this device.
    assert bot._master_key(BOT) == keys.public_keys["master"]
    verified = Verified(ALICE, "ALICEDEV", "t", EMOJI[:7], (1000, 2000, 3000), "ed", master)
    with capture_logs() as logs:
        bot._note(verified)
        await bot._sign()
    [signed] = crypto.client.signed
    body = signed[ALICE][master]
    user_signing = keys.public_keys["user_signing"]
    assert verify(body, BOT, f"ed25519:{user_signing}", user_signing)
    assert [e["event"] for e in logs][-1] == "verification_user_signed"


async def test_no_signature_when_the_key_changed_or_the_bot_has_no_keys() -> None:
    crypto = _Crypto()
    bot = _bot(crypto)
    assert bot._master_key(BOT) is None  # no cross-signing: the MAC has the device key only
    master, obj = _master_object(ALICE)
    crypto.client.masters[ALICE] = obj
    verified = Verified(ALICE, "ALICEDEV", "t", EMOJI[:7], (1000, 2000, 3000), "ed", master)
    with capture_logs() as logs:
        bot._note(verified)
        await bot._sign()
        keys = CrossSigningKeys.create(BOT)
        crypto.own["cross_signing"] = json.dumps(dataclasses.asdict(keys.to_record(KEY)))
        crypto.client.masters[ALICE] = _master_object(ALICE)[1]  # replaced since
        bot._note(verified)
        await bot._sign()
    assert crypto.client.signed == []
    reasons = [e["reason"] for e in logs if e["event"] == "verification_user_not_signed"]
    assert reasons == [
        "the bot has no cross-signing keys",
        "the user's master key changed since it was verified",
    ]


async def test_a_request_in_a_room_timeline_is_answered_in_the_room() -> None:
    crypto = _Crypto()
    crypto.on_ensure[ALICE] = Device(ALICE, "ALICEDEV", "curve", _ed25519(), ())
    bot = _bot(crypto)
    request = {
        "type": "m.room.message",
        "event_id": "$request",
        "sender": ALICE,
        "origin_server_ts": int(NOW_S * 1000),
        "content": {
            "msgtype": "m.key.verification.request",
            "body": "verify?",
            "from_device": "ALICEDEV",
            "methods": ["m.sas.v1"],
            "to": BOT,
        },
    }
    chatter = {**request, "event_id": "$hi", "content": {"msgtype": "m.text", "body": "hi"}}
    batch = decode_sync(
        json.dumps(
            {
                "next_batch": "s1",
                "rooms": {
                    "join": {"!dm:example.org": {"timeline": {"events": [chatter, request]}}}
                },
            }
        ).encode()
    )
    bot.receive_rooms(batch)
    await _round(bot)
    assert [(r, t, c["m.relates_to"]) for r, t, c, _ in crypto.client.room_sent] == [
        (
            "!dm:example.org",
            "m.key.verification.ready",
            {"rel_type": "m.reference", "event_id": "$request"},
        )
    ]
    assert crypto.client.sent == []  # nothing over to-device


async def test_a_flow_the_bot_answered_before_a_restart_is_not_replayed() -> None:
    """A start-up sync brings back the room's recent history, the bot's own answers too:
    a verification a previous run took part in is left alone (its state is gone)."""
    crypto = _Crypto()
    crypto.on_ensure[ALICE] = Device(ALICE, "ALICEDEV", "curve", _ed25519(), ())
    bot = _bot(crypto)
    ts = int(NOW_S * 1000)
    request = {
        "type": "m.room.message",
        "event_id": "$old",
        "sender": ALICE,
        "origin_server_ts": ts,
        "content": {
            "msgtype": "m.key.verification.request",
            "body": "verify?",
            "from_device": "ALICEDEV",
            "methods": ["m.sas.v1"],
            "to": BOT,
        },
    }
    relates = {"rel_type": "m.reference", "event_id": "$old"}
    our_ready = {
        "type": "m.key.verification.ready",
        "event_id": "$ready",
        "sender": BOT,
        "origin_server_ts": ts,
        "content": {"from_device": BOT_DEVICE, "methods": ["m.sas.v1"], "m.relates_to": relates},
    }
    their_start = {**_start(ALICE, "ALICEDEV"), "event_id": "$start", "origin_server_ts": ts}
    their_start["content"] = {**their_start["content"], "m.relates_to": relates}
    del their_start["content"]["transaction_id"]
    fresh = {**request, "event_id": "$new"}
    timeline = [request, our_ready, their_start, fresh]
    body = {
        "next_batch": "s1",
        "rooms": {"join": {"!dm:example.org": {"timeline": {"events": timeline}}}},
    }
    bot.receive_rooms(decode_sync(json.dumps(body).encode()))
    await _round(bot)
    # Only the new request is answered.
    answered = [(t, c["m.relates_to"]["event_id"]) for _, t, c, _ in crypto.client.room_sent]
    assert answered == [("m.key.verification.ready", "$new")]
