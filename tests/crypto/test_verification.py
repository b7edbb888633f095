"""SAS verification (matrix_crypto.verification): the bot's machine answering a minimal
initiator written here on vodozemac from the spec, every cancel path, and what a
hostile peer can put in a to-device event."""

from __future__ import annotations

import contextlib
import hashlib
import random
from typing import Any

import pytest
import vodozemac

from matrix_crypto import verification as v
from matrix_crypto.canonical import b64encode, canonical_json
from matrix_crypto.verification import (
    Cancelled,
    Ignored,
    Requested,
    RoomMessageRequest,
    SasShown,
    VerificationMachine,
    VerificationUpdate,
    Verified,
)

BOT = "@bot:example.org"
BOT_DEVICE = "BOTDEVICE"
ALICE = "@alice:example.org"
BOB = "@bob:example.org"
EVE = "@eve:elsewhere.org"
T0 = 1_700_000_000_000
ROOM = "!dm:example.org"


def _ed25519() -> str:
    return vodozemac.Account().ed25519_key.to_base64()


class Initiator:
    """A user's device verifying the bot, from the spec: request, start, key, MAC, done.
    Checks everything the bot sends it (commitment, MACs) the way a client would."""

    def __init__(
        self, user_id: str = ALICE, device_id: str = "ALICEDEV", room_id: str | None = None
    ) -> None:
        self.user_id = user_id
        self.device_id = device_id
        self.room_id = room_id  # a verification in this room (else to-device)
        self.ed25519 = _ed25519()
        self.master = _ed25519()
        self.txn = f"txn-{random.getrandbits(64):x}"
        self.sas = vodozemac.Sas()
        self.start_content: dict[str, Any] = {}
        self.accept: dict[str, Any] = {}
        self.established: vodozemac.EstablishedSas | None = None
        self.bot_key = ""

    def event(self, event_type: str, content: dict[str, Any]) -> dict[str, Any]:
        if self.room_id is not None:
            return {
                "type": event_type,
                "sender": self.user_id,
                "event_id": f"$e{random.getrandbits(64):x}",
                "origin_server_ts": T0,
                "content": {
                    **content,
                    "m.relates_to": {"rel_type": "m.reference", "event_id": self.txn},
                },
            }
        return {
            "type": event_type,
            "sender": self.user_id,
            "content": {"transaction_id": self.txn, **content},
        }

    def request(self, now_ms: int = T0, methods: list[str] | None = None) -> dict[str, Any]:
        methods = ["m.sas.v1"] if methods is None else methods
        if self.room_id is not None:
            # In a room the request is a message, and its event id names the flow.
            return {
                "type": "m.room.message",
                "sender": self.user_id,
                "event_id": self.txn,
                "origin_server_ts": now_ms,
                "content": {
                    "msgtype": v.REQUEST,
                    "body": "Alice is asking to verify your key",
                    "from_device": self.device_id,
                    "methods": methods,
                    "to": BOT,
                },
            }
        content = {"from_device": self.device_id, "methods": methods, "timestamp": now_ms}
        return self.event(v.REQUEST, content)

    def start(self, **overrides: Any) -> dict[str, Any]:
        content = {
            "from_device": self.device_id,
            "method": "m.sas.v1",
            "key_agreement_protocols": ["curve25519-hkdf-sha256", "curve25519"],
            "hashes": ["sha256"],
            "message_authentication_codes": [
                "hkdf-hmac-sha256.v2",
                "org.matrix.msc3783.hkdf-hmac-sha256",
                "hkdf-hmac-sha256",
            ],
            "short_authentication_string": ["decimal", "emoji"],
            **overrides,
        }
        event = self.event(v.START, content)
        self.start_content = event["content"]
        return event

    def take_accept(self, content: dict[str, Any]) -> None:
        self.accept = content

    def key(self) -> dict[str, Any]:
        return self.event(v.KEY, {"key": self.sas.public_key.to_base64()})

    def take_key(self, content: dict[str, Any]) -> None:
        """The bot's key: checked against its commitment, then the shared secret."""
        self.bot_key = content["key"]
        expected = hashlib.sha256(self.bot_key.encode() + canonical_json(self.start_content))
        assert self.accept["commitment"] == b64encode(expected.digest()), "commitment"
        self.established = self.sas.diffie_hellman(
            vodozemac.Curve25519PublicKey.from_base64(self.bot_key)
        )

    def sas_bytes(self) -> tuple[list[int], tuple[int, int, int]]:
        assert self.established is not None
        info = (
            f"MATRIX_KEY_VERIFICATION_SAS|{self.user_id}|{self.device_id}|"
            f"{self.sas.public_key.to_base64()}|{BOT}|{BOT_DEVICE}|{self.bot_key}|{self.txn}"
        )
        sas_bytes = self.established.bytes(info)
        return list(sas_bytes.emoji_indices), sas_bytes.decimals

    def _calc(self, text: str, info: str) -> str:
        assert self.established is not None
        if self.accept["message_authentication_code"] == "hkdf-hmac-sha256":
            return self.established.calculate_mac_invalid_base64(text, info)
        return self.established.calculate_mac(text, info)

    def mac(
        self,
        *,
        keys: dict[str, str] | None = None,
        tamper: str | None = None,
        keys_tag: str | None = None,
    ) -> dict[str, Any]:
        info = (
            f"MATRIX_KEY_VERIFICATION_MAC{self.user_id}{self.device_id}{BOT}{BOT_DEVICE}{self.txn}"
        )
        if keys is None:
            keys = {
                f"ed25519:{self.device_id}": self.ed25519,
                f"ed25519:{self.master}": self.master,
            }
        mac = {key_id: self._calc(key, info + key_id) for key_id, key in keys.items()}
        if tamper is not None:
            mac[tamper] = self._calc("not the key", info + tamper)
        tag = keys_tag or self._calc(",".join(sorted(mac)), info + "KEY_IDS")
        return self.event(v.MAC, {"mac": mac, "keys": tag})

    def check_bot_mac(self, content: dict[str, Any], bot_ed25519: str, bot_master: str) -> None:
        info = (
            f"MATRIX_KEY_VERIFICATION_MAC{BOT}{BOT_DEVICE}{self.user_id}{self.device_id}{self.txn}"
        )
        mac = content["mac"]
        assert content["keys"] == self._calc(",".join(sorted(mac)), info + "KEY_IDS")
        assert mac[f"ed25519:{BOT_DEVICE}"] == self._calc(
            bot_ed25519, info + f"ed25519:{BOT_DEVICE}"
        )
        assert mac[f"ed25519:{bot_master}"] == self._calc(
            bot_master, info + f"ed25519:{bot_master}"
        )

    def done(self) -> dict[str, Any]:
        return self.event(v.DONE, {})

    def cancel(self, code: str = "m.user", reason: str = "no") -> dict[str, Any]:
        return self.event(v.CANCEL, {"code": code, "reason": reason})


class Bot:
    """The machine under test with the keys a bot knows, and its sent messages."""

    def __init__(self, *peers: Initiator, allowed: set[str] | None = None) -> None:
        self.ed25519 = _ed25519()
        self.master = _ed25519()
        self.peers = {(p.user_id, p.device_id): p for p in peers}
        self.allowed = allowed
        self.machine = VerificationMachine(
            BOT,
            BOT_DEVICE,
            self.ed25519,
            device_key=self._device_key,
            master_key=self._master_key,
            allowed=lambda user: allowed is None or user in allowed,
        )
        self.now = T0

    def _device_key(self, user_id: str, device_id: str) -> str | None:
        peer = self.peers.get((user_id, device_id))
        return None if peer is None else peer.ed25519

    def _master_key(self, user_id: str) -> str | None:
        if user_id == BOT:
            return self.master
        return next((p.master for p in self.peers.values() if p.user_id == user_id), None)

    def feed(self, event: object, *, after_ms: int = 1000) -> list[VerificationUpdate]:
        """A to-device event, or a room event (one with an ``event_id``) of `ROOM`."""
        self.now += after_ms
        if isinstance(event, dict) and "event_id" in event:
            return self.machine.receive_room_event(ROOM, event, self.now)
        return self.machine.receive(event, self.now)

    def sent(self) -> list[tuple[str, str, str, dict[str, Any]]]:
        """(type, user, device, content) of each message to send, (type, room, "",
        content) for a room message; marks them sent."""
        out = []
        for request in self.machine.outgoing_requests():
            if isinstance(request, RoomMessageRequest):
                out.append((request.event_type, request.room_id, "", request.content))
            else:
                for user, devices in request.messages.items():
                    for device, content in devices.items():
                        out.append((request.event_type, user, device, content))
            self.machine.mark_request_sent(request.request_id)
        return out

    def one(self, event_type: str, peer: Initiator) -> dict[str, Any]:
        sent = self.sent()
        to = (peer.user_id, peer.device_id) if peer.room_id is None else (peer.room_id, "")
        assert [(t, u, d) for t, u, d, _ in sent] == [(event_type, *to)]
        return sent[0][3]


def _cancels(bot: Bot) -> list[tuple[str, str, str]]:
    return [(u, d, c["code"]) for t, u, d, c in bot.sent() if t == v.CANCEL]


def _to_keys_exchanged(bot: Bot, alice: Initiator, **start: Any) -> SasShown:
    bot.feed(alice.request(bot.now))
    ready = bot.one(v.READY, alice)
    if alice.room_id is None:
        assert ready["transaction_id"] == alice.txn
    else:
        assert ready["m.relates_to"] == {"rel_type": "m.reference", "event_id": alice.txn}
    assert (ready["from_device"], ready["methods"]) == (BOT_DEVICE, ["m.sas.v1"])
    assert bot.feed(alice.start(**start)) == []
    alice.take_accept(bot.one(v.ACCEPT, alice))
    (shown,) = bot.feed(alice.key())
    sent = bot.sent()
    assert [t for t, *_ in sent] == [v.KEY, v.MAC]  # the bot's MAC goes at once
    alice.take_key(sent[0][3])
    alice.check_bot_mac(sent[1][3], bot.ed25519, bot.master)
    assert isinstance(shown, SasShown)
    return shown


# ---------------------------------------------------------------------------- the flow


@pytest.mark.parametrize(
    ("macs", "chosen"),
    [
        (None, "hkdf-hmac-sha256.v2"),
        (["org.matrix.msc3783.hkdf-hmac-sha256"], "org.matrix.msc3783.hkdf-hmac-sha256"),
        (["hkdf-hmac-sha256"], "hkdf-hmac-sha256"),
    ],
)
def test_a_user_verifies_the_bot(macs: list[str] | None, chosen: str) -> None:
    alice = Initiator()
    bot = Bot(alice)
    start = {} if macs is None else {"message_authentication_codes": macs}
    (requested,) = bot.feed(alice.request(bot.now))
    assert requested == Requested(ALICE, "ALICEDEV", alice.txn)
    bot.one(v.READY, alice)
    bot.feed(alice.start(**start))
    accept = bot.one(v.ACCEPT, alice)
    assert accept["message_authentication_code"] == chosen
    assert accept["key_agreement_protocol"] == "curve25519-hkdf-sha256"
    assert accept["hash"] == "sha256"
    assert accept["short_authentication_string"] == ["decimal", "emoji"]
    assert accept["method"] == "m.sas.v1"
    alice.take_accept(accept)
    (shown,) = bot.feed(alice.key())
    key, mac = bot.sent()
    alice.take_key(key[3])
    alice.check_bot_mac(mac[3], bot.ed25519, bot.master)
    # Both sides show the same seven emoji and three numbers.
    emoji, decimals = alice.sas_bytes()
    assert isinstance(shown, SasShown)
    assert [e.number for e in shown.emoji] == emoji
    assert shown.decimals == decimals
    assert all(1000 <= d <= 9191 for d in decimals)
    assert [e.description for e in shown.emoji] == [v.EMOJI[i].description for i in emoji]
    # Alice's user confirms: her MAC; the bot checks it and says done.
    assert bot.feed(alice.mac()) == []
    assert bot.one(v.DONE, alice) == {"transaction_id": alice.txn}
    (verified,) = bot.feed(alice.done())
    assert verified == Verified(
        ALICE, "ALICEDEV", alice.txn, shown.emoji, shown.decimals, alice.ed25519, alice.master
    )
    assert bot.sent() == []
    assert bot.machine.active() == []
    # Late or replayed messages of a finished verification change nothing.
    for late in (alice.done(), alice.mac(), alice.key(), alice.cancel()):
        (ignored,) = bot.feed(late)
        assert isinstance(ignored, Ignored)
    assert bot.sent() == []


def test_a_start_without_a_request_is_answered() -> None:
    # Deprecated, but the spec says clients should handle it.
    alice = Initiator()
    bot = Bot(alice)
    (requested,) = bot.feed(alice.start())
    assert isinstance(requested, Requested)
    alice.take_accept(bot.one(v.ACCEPT, alice))
    bot.feed(alice.key())
    key, _ = bot.sent()
    alice.take_key(key[3])
    bot.feed(alice.mac())
    bot.one(v.DONE, alice)
    (verified,) = bot.feed(alice.done())
    assert isinstance(verified, Verified)


def test_the_bot_mac_leaves_out_a_master_key_it_does_not_have() -> None:
    alice = Initiator()
    bot = Bot(alice)
    bot.machine = VerificationMachine(
        BOT, BOT_DEVICE, bot.ed25519, device_key=bot._device_key, master_key=lambda u: None
    )
    bot.feed(alice.request(bot.now))
    bot.sent()
    bot.feed(alice.start())
    alice.take_accept(bot.one(v.ACCEPT, alice))
    bot.feed(alice.key())
    key, mac = bot.sent()
    alice.take_key(key[3])
    assert list(mac[3]["mac"]) == [f"ed25519:{BOT_DEVICE}"]
    # And Alice's master key, unknown to this machine, is not reported as verified.
    bot.feed(alice.mac())
    bot.sent()
    (verified,) = bot.feed(alice.done())
    assert isinstance(verified, Verified)
    assert verified.master_key is None


def test_a_mac_with_only_the_device_key_verifies_the_device_only() -> None:
    alice = Initiator()
    bot = Bot(alice)
    _to_keys_exchanged(bot, alice)
    bot.feed(alice.mac(keys={f"ed25519:{alice.device_id}": alice.ed25519}))
    bot.one(v.DONE, alice)
    (verified,) = bot.feed(alice.done())
    assert isinstance(verified, Verified)
    assert verified.master_key is None


def test_an_unknown_extra_key_in_the_mac_is_not_verified_nor_refused() -> None:
    alice = Initiator()
    bot = Bot(alice)
    _to_keys_exchanged(bot, alice)
    other = _ed25519()
    keys = {f"ed25519:{alice.device_id}": alice.ed25519, f"ed25519:{other}": other}
    bot.feed(alice.mac(keys=keys))
    bot.one(v.DONE, alice)
    (verified,) = bot.feed(alice.done())
    assert isinstance(verified, Verified)
    assert verified.master_key is None


# ------------------------------------------------------------------------ cancel paths


def _last_cancel(updates: list[VerificationUpdate]) -> Cancelled:
    cancels = [u for u in updates if isinstance(u, Cancelled)]
    assert cancels, updates
    return cancels[-1]


def test_a_user_not_allowed_gets_m_user_and_no_flow() -> None:
    eve = Initiator(EVE, "EVEDEV")
    bot = Bot(eve, allowed={ALICE})
    cancel = _last_cancel(bot.feed(eve.request(bot.now)))
    assert (cancel.code, cancel.by_us) == ("m.user", True)
    assert _cancels(bot) == [(EVE, "EVEDEV", "m.user")]
    assert bot.machine.active() == []
    # A replay or a start in that transaction stays quiet; a fresh start is refused too.
    assert isinstance(bot.feed(eve.request(bot.now))[0], Ignored)
    eve.txn = "another"
    assert _last_cancel(bot.feed(eve.start())).code == "m.user"
    # Messages of unknown transactions from someone not allowed: no answer at all.
    eve.txn = "a third"
    bot.sent()
    bot.feed(eve.event(v.READY, {"from_device": "EVEDEV", "methods": ["m.sas.v1"]}))
    assert bot.sent() == []


@pytest.mark.parametrize("offset_ms", [-(10 * 60_000 + 1), 5 * 60_000 + 1])
def test_a_request_too_old_or_in_the_future_is_ignored(offset_ms: int) -> None:
    alice = Initiator()
    bot = Bot(alice)
    (ignored,) = bot.feed(alice.request(bot.now + 1000 + offset_ms), after_ms=1000)
    assert isinstance(ignored, Ignored)
    assert bot.sent() == []


@pytest.mark.parametrize("timestamp", [None, "1700000000000", 1.5e12, True])
def test_a_request_without_an_integer_timestamp_is_ignored(timestamp: object) -> None:
    alice = Initiator()
    bot = Bot(alice)
    event = alice.request()
    event["content"]["timestamp"] = timestamp
    assert isinstance(bot.feed(event)[0], Ignored)
    assert bot.sent() == []


def test_a_request_without_sas_is_ignored_not_cancelled() -> None:
    # Spec: another device of the bot's account might support the method.
    alice = Initiator()
    bot = Bot(alice)
    (ignored,) = bot.feed(alice.request(bot.now + 1000, methods=["m.qr_code.show.v1"]))
    assert isinstance(ignored, Ignored)
    assert bot.sent() == []


@pytest.mark.parametrize(
    "start",
    [
        {"method": "m.reciprocate.v1"},
        {"key_agreement_protocols": ["curve25519"]},
        {"hashes": ["sha512"]},
        {"message_authentication_codes": ["hmac-sha256"]},
        {"short_authentication_string": ["colours"]},
    ],
)
def test_nothing_in_common_is_m_unknown_method(start: dict[str, Any]) -> None:
    alice = Initiator()
    bot = Bot(alice)
    bot.feed(alice.request(bot.now))
    bot.sent()
    cancel = _last_cancel(bot.feed(alice.start(**start)))
    assert cancel.code == "m.unknown_method"
    assert _cancels(bot) == [(ALICE, "ALICEDEV", "m.unknown_method")]
    assert bot.machine.active() == []


@pytest.mark.parametrize(
    "start",
    [
        {"hashes": "sha256"},
        {"key_agreement_protocols": None},
        {"message_authentication_codes": [1, 2]},
        {"short_authentication_string": ["emoji"] * 1000},
        {"hashes": ["sha256", "x" * 100_000]},
        {"extra": 1.5},  # canonical JSON has no floats: no commitment possible
        {"extra": "x" * 100_000},
    ],
)
def test_a_malformed_start_is_m_invalid_message(start: dict[str, Any]) -> None:
    alice = Initiator()
    bot = Bot(alice)
    bot.feed(alice.request(bot.now))
    bot.sent()
    assert _last_cancel(bot.feed(alice.start(**start))).code == "m.invalid_message"
    assert _cancels(bot) == [(ALICE, "ALICEDEV", "m.invalid_message")]


def test_the_commitment_binds_the_start_the_bot_received() -> None:
    # A man in the middle who changes the start (say, drops emoji) is caught by the
    # initiator's commitment check: the bot hashed what it received.
    alice = Initiator()
    bot = Bot(alice)
    bot.feed(alice.request(bot.now))
    bot.sent()
    tampered = alice.start(short_authentication_string=["decimal"])
    alice.start()  # what Alice believes she sent
    bot.feed(tampered)
    alice.take_accept(bot.one(v.ACCEPT, alice))
    bot.feed(alice.key())
    key, _ = bot.sent()
    with pytest.raises(AssertionError, match="commitment"):
        alice.take_key(key[3])


@pytest.mark.parametrize(
    "key", ["", "not base64!", "A" * 43, "A" * 5000, 42, None, b64encode(bytes(32))]
)
def test_a_bad_key_is_m_invalid_message(key: object) -> None:
    alice = Initiator()
    bot = Bot(alice)
    bot.feed(alice.request(bot.now))
    bot.feed(alice.start())
    bot.sent()
    assert _last_cancel(bot.feed(alice.event(v.KEY, {"key": key}))).code == "m.invalid_message"
    assert _cancels(bot) == [(ALICE, "ALICEDEV", "m.invalid_message")]


@pytest.mark.parametrize("step", ["ready", "accept", "key_early", "mac_early", "done_early"])
def test_out_of_order_is_m_unexpected_message(step: str) -> None:
    alice = Initiator()
    bot = Bot(alice)
    bot.feed(alice.request(bot.now))
    bot.sent()
    if step == "mac_early" or step == "done_early":
        bot.feed(alice.start())
        alice.take_accept(bot.one(v.ACCEPT, alice))
    events = {
        "ready": alice.event(v.READY, {"from_device": "ALICEDEV", "methods": ["m.sas.v1"]}),
        "accept": alice.event(v.ACCEPT, {"commitment": "x"}),
        "key_early": alice.key(),  # before any start
        "mac_early": alice.event(v.MAC, {"mac": {"ed25519:A": "x"}, "keys": "y"}),
        "done_early": alice.done(),
    }
    assert _last_cancel(bot.feed(events[step])).code == "m.unexpected_message"
    assert _cancels(bot) == [(ALICE, "ALICEDEV", "m.unexpected_message")]
    assert bot.machine.active() == []


def test_done_before_the_mac_is_m_unexpected_message() -> None:
    alice = Initiator()
    bot = Bot(alice)
    _to_keys_exchanged(bot, alice)
    assert _last_cancel(bot.feed(alice.done())).code == "m.unexpected_message"


def test_a_start_from_another_device_than_the_request_is_refused() -> None:
    alice = Initiator()
    bot = Bot(alice)
    bot.feed(alice.request(bot.now))
    bot.sent()
    start = alice.start()
    start["content"]["from_device"] = "OTHERDEV"
    assert _last_cancel(bot.feed(start)).code == "m.unexpected_message"


def test_a_changed_message_in_the_same_step_is_refused() -> None:
    alice = Initiator()
    bot = Bot(alice)
    bot.feed(alice.request(bot.now))
    bot.feed(alice.start())
    bot.sent()
    assert _last_cancel(bot.feed(alice.start(hashes=["sha256", "x"]))).code == (
        "m.unexpected_message"
    )


def test_a_wrong_key_list_mac_is_m_key_mismatch() -> None:
    alice = Initiator()
    bot = Bot(alice)
    _to_keys_exchanged(bot, alice)
    assert _last_cancel(bot.feed(alice.mac(keys_tag="A" * 43))).code == "m.key_mismatch"
    assert _cancels(bot) == [(ALICE, "ALICEDEV", "m.key_mismatch")]


def test_a_wrong_device_key_mac_is_m_key_mismatch() -> None:
    # The MAC of the key the bot knows for the device does not match: another key.
    alice = Initiator()
    bot = Bot(alice)
    _to_keys_exchanged(bot, alice)
    forged = {f"ed25519:{alice.device_id}": _ed25519()}
    assert _last_cancel(bot.feed(alice.mac(keys=forged))).code == "m.key_mismatch"


def test_a_wrong_master_key_mac_is_m_key_mismatch() -> None:
    alice = Initiator()
    bot = Bot(alice)
    _to_keys_exchanged(bot, alice)
    event = alice.mac(tamper=f"ed25519:{alice.master}")
    assert _last_cancel(bot.feed(event)).code == "m.key_mismatch"


def test_a_mac_without_the_device_key_is_m_key_mismatch() -> None:
    alice = Initiator()
    bot = Bot(alice)
    _to_keys_exchanged(bot, alice)
    event = alice.mac(keys={f"ed25519:{alice.master}": alice.master})
    assert _last_cancel(bot.feed(event)).code == "m.key_mismatch"


def test_a_device_whose_keys_the_bot_does_not_know_is_m_key_mismatch() -> None:
    alice = Initiator()
    stranger = Initiator(ALICE, "NEWDEVICE")
    bot = Bot(alice)
    _to_keys_exchanged(bot, stranger)
    assert _last_cancel(bot.feed(stranger.mac())).code == "m.key_mismatch"


def test_a_mac_from_the_wrong_shared_secret_is_m_key_mismatch() -> None:
    # A man in the middle with his own key exchange: his MACs do not verify.
    alice = Initiator()
    bot = Bot(alice)
    _to_keys_exchanged(bot, alice)
    mallory = vodozemac.Sas().diffie_hellman(vodozemac.Sas().public_key)
    alice.established = mallory
    assert _last_cancel(bot.feed(alice.mac())).code == "m.key_mismatch"


def test_their_cancel_ends_the_flow_without_an_answer() -> None:
    alice = Initiator()
    bot = Bot(alice)
    _to_keys_exchanged(bot, alice)
    (cancelled,) = bot.feed(alice.cancel("m.mismatched_sas", "The emoji did not match\x1b[31m"))
    assert cancelled == Cancelled(
        ALICE, "ALICEDEV", alice.txn, "m.mismatched_sas", "The emoji did not match?[31m", False
    )
    assert bot.sent() == []
    assert bot.machine.active() == []


def test_a_cancel_from_another_user_does_not_end_the_flow() -> None:
    alice = Initiator()
    bob = Initiator(BOB, "BOBDEV")
    bot = Bot(alice, bob)
    bot.feed(alice.request(bot.now))
    bot.sent()
    bob.txn = alice.txn
    assert isinstance(bot.feed(bob.cancel())[0], Ignored)
    assert bot.machine.active() == [(ALICE, "ALICEDEV", alice.txn)]


def test_another_users_message_in_a_flow_is_m_user_mismatch_for_them_only() -> None:
    alice = Initiator()
    bob = Initiator(BOB, "BOBDEV")
    bot = Bot(alice, bob)
    bot.feed(alice.request(bot.now))
    bot.sent()
    bob.txn = alice.txn
    (ignored,) = bot.feed(bob.start())
    assert isinstance(ignored, Ignored)
    assert _cancels(bot) == [(BOB, "BOBDEV", "m.user_mismatch")]
    bot.feed(bob.key())  # names no device: nobody to tell
    assert bot.sent() == []
    # Alice's verification goes on.
    bot.feed(alice.start())
    alice.take_accept(bot.one(v.ACCEPT, alice))


def test_an_unknown_transaction_is_m_unknown_transaction_when_it_names_a_device() -> None:
    alice = Initiator()
    bot = Bot(alice)
    (ignored,) = bot.feed(alice.event(v.READY, {"from_device": "ALICEDEV", "methods": []}))
    assert isinstance(ignored, Ignored)
    assert _cancels(bot) == [(ALICE, "ALICEDEV", "m.unknown_transaction")]
    mac = alice.event(v.MAC, {"mac": {"ed25519:ALICEDEV": "x"}, "keys": "y"})
    for event in (alice.key(), mac, alice.done(), alice.cancel()):
        assert isinstance(bot.feed(event)[0], Ignored)
    assert bot.sent() == []


def test_the_overall_timeout_is_ten_minutes() -> None:
    alice = Initiator()
    bot = Bot(alice)
    bot.feed(alice.request(bot.now))
    bot.sent()
    deadline = bot.machine.next_deadline_ms()
    assert deadline == bot.now + 10 * 60_000
    assert bot.machine.expire(deadline - 1) == []
    (cancel,) = bot.machine.expire(deadline)
    assert (cancel.code, cancel.by_us) == ("m.timeout", True)
    assert _cancels(bot) == [(ALICE, "ALICEDEV", "m.timeout")]
    assert bot.machine.next_deadline_ms() is None


def test_a_silent_peer_in_the_sas_times_out_sooner() -> None:
    alice = Initiator()
    bot = Bot(alice)
    _to_keys_exchanged(bot, alice)
    deadline = bot.machine.next_deadline_ms()
    assert deadline == bot.now + 2 * 60_000
    # A message arriving after the deadline finds the flow timed out first.
    updates = bot.feed(alice.mac(), after_ms=2 * 60_000)
    assert [u.code for u in updates if isinstance(u, Cancelled)] == ["m.timeout"]
    assert isinstance(updates[-1], Ignored)
    assert _cancels(bot) == [(ALICE, "ALICEDEV", "m.timeout")]


def test_exact_replays_are_ignored_at_every_step() -> None:
    alice = Initiator()
    bot = Bot(alice)
    request = alice.request(bot.now)
    bot.feed(request)
    bot.sent()
    assert isinstance(bot.feed(request)[0], Ignored)
    start = alice.start()
    bot.feed(start)
    alice.take_accept(bot.one(v.ACCEPT, alice))
    assert isinstance(bot.feed(start)[0], Ignored)
    assert isinstance(bot.feed(request)[0], Ignored)
    key = alice.key()
    bot.feed(key)
    sent = bot.sent()
    alice.take_key(sent[0][3])
    assert isinstance(bot.feed(key)[0], Ignored)
    mac = alice.mac()
    bot.feed(mac)
    bot.one(v.DONE, alice)
    assert isinstance(bot.feed(mac)[0], Ignored)
    assert bot.sent() == []
    (verified,) = bot.feed(alice.done())
    assert isinstance(verified, Verified)


def test_a_second_verification_from_the_same_device_cancels_both() -> None:
    alice = Initiator()
    bot = Bot(alice)
    bot.feed(alice.request(bot.now))
    bot.sent()
    first = alice.txn
    alice.txn = "second"
    updates = bot.feed(alice.request(bot.now))
    cancelled = {u.transaction_id for u in updates if isinstance(u, Cancelled)}
    assert cancelled == {first, "second"}
    assert _cancels(bot) == [(ALICE, "ALICEDEV", "m.unexpected_message")] * 2
    assert bot.machine.active() == []


def test_flows_are_capped_per_user_and_in_all() -> None:
    bot = Bot()
    for n in range(v.MAX_FLOWS_PER_USER):
        bot.feed(Initiator(ALICE, f"DEV{n}").request(bot.now))
    assert _last_cancel(bot.feed(Initiator(ALICE, "ONEMORE").request(bot.now))).code == "m.user"
    for n in range(v.MAX_FLOWS):
        bot.feed(Initiator(f"@u{n}:example.org", "D").request(bot.now))
        bot.sent()
    assert len(bot.machine.active()) == v.MAX_FLOWS
    cancel = _last_cancel(bot.feed(Initiator("@late:example.org", "D").request(bot.now)))
    assert cancel.code == "m.user"


def test_our_own_messages_are_ignored() -> None:
    bot = Bot()
    echo = {
        "type": v.REQUEST,
        "sender": BOT,
        "content": {
            "transaction_id": "t",
            "from_device": BOT_DEVICE,
            "methods": ["m.sas.v1"],
            "timestamp": T0,
        },
    }
    assert isinstance(bot.feed(echo)[0], Ignored)
    assert bot.sent() == []


# ------------------------------------------------------------------------------ hostile


@pytest.mark.parametrize(
    "event",
    [
        None,
        "m.key.verification.request",
        [],
        {"type": 7},
        {"type": v.REQUEST},
        {"type": v.REQUEST, "sender": 5, "content": {}},
        {"type": v.REQUEST, "sender": "x" * 100_000, "content": {}},
        {"type": v.REQUEST, "sender": ALICE, "content": []},
        {"type": v.REQUEST, "sender": ALICE, "content": {"transaction_id": 5}},
        {"type": v.REQUEST, "sender": ALICE, "content": {"transaction_id": "t" * 100_000}},
        {"type": v.REQUEST, "sender": ALICE, "content": {"transaction_id": "a\nb"}},
        {
            "type": v.REQUEST,
            "sender": ALICE,
            "content": {
                "transaction_id": "t",
                "from_device": "D" * 100_000,
                "methods": ["m.sas.v1"],
                "timestamp": T0,
            },
        },
        {
            "type": v.START,
            "sender": ALICE,
            "content": {"transaction_id": "t", "from_device": ["D"], "method": "m.sas.v1"},
        },
        {"type": v.MAC, "sender": ALICE, "content": {"transaction_id": "t", "mac": {}}},
    ],
)
def test_malformed_events_are_ignored_without_answer(event: object) -> None:
    bot = Bot(Initiator())
    for update in bot.feed(event):
        assert isinstance(update, Ignored)
    assert bot.sent() == []
    assert bot.machine.active() == []


def test_events_of_other_types_give_nothing() -> None:
    bot = Bot()
    assert bot.feed({"type": "m.room.encrypted", "sender": ALICE, "content": {}}) == []
    assert bot.feed({"type": "m.room_key_request", "sender": ALICE, "content": {}}) == []


@pytest.mark.parametrize(
    "content",
    [
        {"mac": "x", "keys": "y"},
        {"mac": {"ed25519:ALICEDEV": 5}, "keys": "y"},
        {"mac": {"ed25519:ALICEDEV": "x"}, "keys": None},
        {"mac": {f"ed25519:K{n}": "x" for n in range(1000)}, "keys": "y"},
        {"mac": {"ed25519:ALICEDEV": "x" * 100_000}, "keys": "y"},
        {"mac": {"ed25519:ALICEDEV": "x"}, "keys": "y" * 100_000},
        {"mac": {"k" * 100_000: "x"}, "keys": "y"},
    ],
)
def test_a_malformed_mac_is_m_invalid_message(content: dict[str, Any]) -> None:
    alice = Initiator()
    bot = Bot(alice)
    _to_keys_exchanged(bot, alice)
    assert _last_cancel(bot.feed(alice.event(v.MAC, content))).code == "m.invalid_message"


def test_a_flood_stays_bounded() -> None:
    bot = Bot()
    for n in range(2000):
        peer = Initiator(f"@u{n % 50}:example.org", f"D{n}")
        bot.feed(peer.request(bot.now), after_ms=1)
        bot.feed(peer.event(v.READY, {"from_device": peer.device_id, "methods": []}), after_ms=1)
        assert len(bot.machine.outgoing_requests()) <= v.MAX_OUTBOX + v.MAX_FLOWS
        assert len(bot.machine.active()) <= v.MAX_FLOWS
    assert len(bot.machine._finished) <= v.MAX_FINISHED


_MUTANTS: list[object] = [None, 0, -1, 2**70, 1.5, "", "x" * 5000, [], {}, [None], True]


def _mutated_flow(rng: random.Random, room_id: str | None) -> None:
    alice = Initiator(room_id=room_id)
    bot = Bot(alice)
    for step in ("request", "start", "key", "mac", "done"):
        if step == "request":
            event = alice.request(bot.now)
        elif step == "mac":
            event = alice.mac() if alice.established else alice.event(v.MAC, {})
        else:
            event = getattr(alice, step)()
        if rng.random() < 0.5:
            content = event["content"]
            content[rng.choice([*content, "extra"])] = rng.choice(_MUTANTS)
        for update in bot.feed(event):
            assert isinstance(update, VerificationUpdate)
        for event_type, _, _, content in bot.sent():
            if event_type == v.ACCEPT:
                alice.take_accept(content)
            elif event_type == v.KEY:
                with contextlib.suppress(AssertionError):  # a mutated start: commitment
                    alice.take_key(content)


def test_random_mutations_never_raise() -> None:
    """Every message of a real flow, mutated at random, fed in order."""
    rng = random.Random(20)
    for n in range(300):
        _mutated_flow(rng, ROOM if n % 2 else None)


# ----------------------------------------------------------------------------- in a room


def test_a_user_verifies_the_bot_in_a_room() -> None:
    alice = Initiator(room_id=ROOM)
    alice.txn = "$request-event"
    bot = Bot(alice)
    shown = _to_keys_exchanged(bot, alice)
    emoji, decimals = alice.sas_bytes()
    assert ([e.number for e in shown.emoji], shown.decimals) == (emoji, decimals)
    assert bot.feed(alice.mac()) == []
    done = bot.one(v.DONE, alice)
    assert done == {"m.relates_to": {"rel_type": "m.reference", "event_id": alice.txn}}
    assert "transaction_id" not in done
    (verified,) = bot.feed(alice.done())
    assert verified == Verified(
        ALICE, "ALICEDEV", alice.txn, shown.emoji, shown.decimals, alice.ed25519, alice.master
    )


def test_in_a_room_only_requests_to_the_bot_and_their_references_count() -> None:
    alice = Initiator(room_id=ROOM)
    bot = Bot(alice)
    to_bob = alice.request()
    to_bob["content"]["to"] = BOB
    assert isinstance(bot.feed(to_bob)[0], Ignored)
    text = {**alice.request(), "content": {"msgtype": "m.text", "body": "hi"}}
    assert bot.feed(text) == []
    bot.feed(alice.request(bot.now))
    bot.one(v.READY, alice)
    # Our own messages come back in the room: ignored.
    echo = {**alice.start(), "sender": BOT}
    assert isinstance(bot.feed(echo)[0], Ignored)
    # Without a reference (or another relation) a message belongs to no request.
    for relates in (None, {"rel_type": "m.thread", "event_id": alice.txn}, "x"):
        event = alice.start()
        event["content"]["m.relates_to"] = relates
        assert isinstance(bot.feed(event)[0], Ignored)
    # The same id over to-device, or from another room, is not this flow.
    over_to_device = Initiator()
    over_to_device.txn = alice.txn
    assert isinstance(bot.feed(over_to_device.start())[0], Ignored)
    other_room = alice.start()
    assert isinstance(bot.machine.receive_room_event("!other:x", other_room, bot.now)[0], Ignored)
    assert bot.sent() == []
    assert bot.machine.active() == [(ALICE, "ALICEDEV", alice.txn)]


def test_in_a_room_a_start_without_request_is_ignored() -> None:
    alice = Initiator(room_id=ROOM)
    bot = Bot(alice)
    assert isinstance(bot.feed(alice.start())[0], Ignored)
    assert bot.sent() == []


def test_in_a_room_a_user_not_allowed_gets_m_user_in_the_room() -> None:
    eve = Initiator(EVE, "EVEDEV", room_id=ROOM)
    bot = Bot(eve, allowed={ALICE})
    assert _last_cancel(bot.feed(eve.request(bot.now))).code == "m.user"
    cancel = bot.one(v.CANCEL, eve)
    assert cancel["code"] == "m.user"
    assert cancel["m.relates_to"] == {"rel_type": "m.reference", "event_id": eve.txn}


@pytest.mark.parametrize(
    "event",
    [
        {"type": "m.room.message", "sender": ALICE, "event_id": "$e", "content": None},
        {"type": "m.room.message", "sender": ALICE, "content": {"msgtype": v.REQUEST}},
        {"type": v.START, "sender": ALICE, "event_id": "$e", "content": {"m.relates_to": []}},
        {"type": v.REQUEST, "sender": ALICE, "event_id": "$e", "content": {}},
        {"type": v.KEY, "sender": 7, "event_id": "$e", "content": {}},
    ],
)
def test_malformed_room_events_are_ignored(event: dict[str, Any]) -> None:
    bot = Bot(Initiator(room_id=ROOM))
    for update in bot.feed(event):
        assert isinstance(update, Ignored)
    assert bot.machine.receive_room_event(ROOM, "junk", bot.now) == []
    assert bot.machine.receive_room_event("x" * 1000, event, bot.now) == []
    assert bot.sent() == []


def test_a_flood_of_strangers_is_not_answered_past_the_outbox() -> None:
    bot = Bot(allowed={ALICE})
    cancelled = 0
    for n in range(500):
        stranger = Initiator(f"@s{n}:elsewhere.org", "D")
        cancelled += sum(isinstance(u, Cancelled) for u in bot.feed(stranger.request(bot.now)))
    assert cancelled == v.MAX_OUTBOX // 2
    assert len(bot.machine.outgoing_requests()) == v.MAX_OUTBOX // 2
