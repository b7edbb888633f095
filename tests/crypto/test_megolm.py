"""matrix_crypto.megolm against vodozemac on the other side: room keys, decryption and its
refusals (wrong room, replays, garbage, forwarded keys), outbound rotation, persistence."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import vodozemac
from hypothesis import given, settings
from hypothesis import strategies as st

from matrix_crypto import megolm
from matrix_crypto.errors import CryptoError, DecryptionError, MissingRoomKey
from matrix_crypto.megolm import (
    ALGORITHM,
    GroupSessions,
    RotationSettings,
)

ROOM = "!room:example.org"
OTHER_ROOM = "!other:example.org"
PICKLE_KEY = bytes(range(32))
BOT_CURVE = "BotCurve25519Key"
BOT_ED = "BotEd25519Key"
ALICE_CURVE = "AliceCurve25519Key"
ALICE_ED = "AliceEd25519Key"
SECRET = "the quick secret plaintext 0xC0FFEE"
WEEK = 604_800_000


class Sender:
    """A peer's outbound session, raw vodozemac: encrypts whatever bytes a test wants."""

    def __init__(self, curve: str = ALICE_CURVE) -> None:
        self.session = vodozemac.GroupSession()
        self.curve = curve

    @property
    def session_id(self) -> str:
        return self.session.session_id

    def room_key(self, room_id: str = ROOM) -> dict[str, str]:
        return {
            "algorithm": ALGORITHM,
            "room_id": room_id,
            "session_id": self.session.session_id,
            "session_key": self.session.session_key.to_base64(),
        }

    def encrypt_bytes(self, plaintext: bytes, **extra: Any) -> dict[str, Any]:
        content: dict[str, Any] = {
            "algorithm": ALGORITHM,
            "sender_key": self.curve,
            "ciphertext": self.session.encrypt(plaintext).to_base64(),
            "session_id": self.session.session_id,
            "device_id": "ALICEDEVICE",
        }
        content.update(extra)
        return content

    def encrypt(self, body: str = SECRET, room_id: str = ROOM, **extra: Any) -> dict[str, Any]:
        payload = {
            "type": "m.room.message",
            "content": {"msgtype": "m.text", "body": body},
            "room_id": room_id,
        }
        return self.encrypt_bytes(json.dumps(payload).encode(), **extra)


def receiver_with(sender: Sender, room_id: str = ROOM) -> GroupSessions:
    sessions = GroupSessions(PICKLE_KEY)
    outcome = sessions.add_room_key(
        sender.room_key(room_id), sender_curve25519=sender.curve, sender_ed25519=ALICE_ED
    )
    assert outcome.stored, outcome
    return sessions


def forwarded(sender: Sender, index: int = 0, **overrides: Any) -> dict[str, Any]:
    inbound = vodozemac.InboundGroupSession(sender.session.session_key)
    exported = inbound.export_at(max(index, inbound.first_known_index))
    assert exported is not None
    content: dict[str, Any] = {
        "algorithm": ALGORITHM,
        "room_id": ROOM,
        "sender_key": sender.curve,
        "sender_claimed_ed25519_key": ALICE_ED,
        "session_id": sender.session_id,
        "session_key": exported.to_base64(),
        "forwarding_curve25519_key_chain": ["ForwarderCurve"],
    }
    content.update(overrides)
    return content


def prepare(
    sessions: GroupSessions,
    devices: list[tuple[str, str]],
    *,
    now_ms: int = 1_000,
    settings: RotationSettings | None = None,
    room_id: str = ROOM,
) -> megolm.OutboundPlan:
    return sessions.prepare_outbound(
        room_id,
        now_ms=now_ms,
        settings=settings or RotationSettings(),
        devices=devices,
        own_curve25519=BOT_CURVE,
        own_ed25519=BOT_ED,
    )


# ----------------------------------------------------------------------- decrypting


def test_a_room_key_lets_us_decrypt_and_the_result_names_the_sender_keys() -> None:
    alice = Sender()
    sessions = receiver_with(alice)
    encrypted = alice.encrypt()

    got = sessions.decrypt(ROOM, "$e1", 1_700_000_000_000, encrypted)

    assert got.event_type == "m.room.message"
    assert got.content == {"msgtype": "m.text", "body": SECRET}
    assert (got.room_id, got.event_id, got.session_id) == (ROOM, "$e1", alice.session_id)
    assert got.message_index == 0
    assert (got.sender_curve25519, got.sender_claimed_ed25519) == (ALICE_CURVE, ALICE_ED)
    assert got.trusted is True
    assert got.device_id == "ALICEDEVICE"


def test_without_the_deprecated_sender_key_the_session_is_found_by_id() -> None:
    alice = Sender()
    sessions = receiver_with(alice)
    encrypted = alice.encrypt()
    del encrypted["sender_key"], encrypted["device_id"]

    got = sessions.decrypt(ROOM, "$e1", 0, encrypted)

    assert got.sender_curve25519 == ALICE_CURVE
    assert got.device_id is None


def test_unknown_session_is_a_missing_room_key_naming_room_and_session() -> None:
    alice = Sender()
    sessions = GroupSessions(PICKLE_KEY)

    with pytest.raises(MissingRoomKey) as caught:
        sessions.decrypt(ROOM, "$e1", 0, alice.encrypt())

    assert (caught.value.room_id, caught.value.session_id) == (ROOM, alice.session_id)


def test_a_key_shared_for_another_room_does_not_decrypt_this_room() -> None:
    alice = Sender()
    sessions = receiver_with(alice, room_id=OTHER_ROOM)

    with pytest.raises(MissingRoomKey):
        sessions.decrypt(ROOM, "$e1", 0, alice.encrypt(room_id=ROOM))


def test_a_plaintext_for_another_room_is_refused() -> None:
    alice = Sender()
    sessions = receiver_with(alice)

    with pytest.raises(DecryptionError, match="another room") as caught:
        sessions.decrypt(ROOM, "$e1", 0, alice.encrypt(room_id=OTHER_ROOM))
    assert SECRET not in str(caught.value)


def test_the_same_index_under_another_event_id_is_a_replay() -> None:
    alice = Sender()
    sessions = receiver_with(alice)
    encrypted = alice.encrypt()
    sessions.decrypt(ROOM, "$original", 0, encrypted)

    with pytest.raises(DecryptionError, match="replayed"):
        sessions.decrypt(ROOM, "$copy", 0, encrypted)
    # The same event again (a restart re-decrypting its inbox) is fine.
    assert sessions.decrypt(ROOM, "$original", 0, encrypted).content["body"] == SECRET


def test_a_refused_event_does_not_claim_its_index() -> None:
    alice = Sender()
    sessions = receiver_with(alice)
    wrong_room = alice.encrypt(room_id=OTHER_ROOM)
    with pytest.raises(DecryptionError):
        sessions.decrypt(ROOM, "$bad", 0, wrong_room)

    assert sessions.take_changes().seen == ()


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda c: c.update(algorithm="m.olm.v1.curve25519-aes-sha2"), "not a megolm"),
        (lambda c: c.update(ciphertext="!!! not base64 !!!"), "malformed ciphertext"),
        (lambda c: c.update(ciphertext=""), "missing ciphertext"),
        (lambda c: c.update(ciphertext=123), "missing ciphertext"),
        (lambda c: c.update(ciphertext="A" * 70_000), "missing ciphertext"),
        (lambda c: c.update(ciphertext=c["ciphertext"][:-12]), "ciphertext|signature"),
        (lambda c: c.pop("session_id"), "session_id"),
        (lambda c: c.update(session_id=["x"]), "session_id"),
        (lambda c: c.update(sender_key=42), "sender_key"),
        (lambda c: c.update(sender_key=""), "sender_key"),
    ],
)
def test_malformed_content_is_a_decryption_error(mutate: Any, reason: str) -> None:
    alice = Sender()
    sessions = receiver_with(alice)
    encrypted = alice.encrypt()
    mutate(encrypted)

    with pytest.raises(DecryptionError, match=reason) as caught:
        sessions.decrypt(ROOM, "$e1", 0, encrypted)
    assert SECRET not in str(caught.value)


def test_a_flipped_ciphertext_byte_fails_the_signature_check() -> None:
    alice = Sender()
    sessions = receiver_with(alice)
    encrypted = alice.encrypt()
    raw = bytearray(base64.b64decode(encrypted["ciphertext"] + "=="))
    raw[10] ^= 0x01
    encrypted["ciphertext"] = base64.b64encode(bytes(raw)).decode().rstrip("=")

    with pytest.raises(DecryptionError, match="signature or MAC"):
        sessions.decrypt(ROOM, "$e1", 0, encrypted)


def test_garbage_ciphertext_for_an_unknown_session_is_refused_not_retried() -> None:
    sessions = GroupSessions(PICKLE_KEY)
    content = {"algorithm": ALGORITHM, "session_id": "nope", "ciphertext": "AAAA"}

    with pytest.raises(DecryptionError):
        sessions.decrypt(ROOM, "$e1", 0, content)


@pytest.mark.parametrize(
    ("room_id", "event_id", "content"),
    [
        (ROOM, "$e1", None),
        (ROOM, "$e1", ["not", "an", "object"]),
        (ROOM, "$e1", "text"),
        (None, "$e1", {}),
        (ROOM, None, {}),
        (ROOM, "", {}),
    ],
)
def test_non_object_contents_and_missing_ids_are_refused(
    room_id: Any, event_id: Any, content: Any
) -> None:
    with pytest.raises(DecryptionError):
        GroupSessions(PICKLE_KEY).decrypt(room_id, event_id, 0, content)


@pytest.mark.parametrize(
    "plaintext",
    [
        b"[1, 2, 3]",
        b'"a string"',
        b"not json at all",
        b"\xff\xfe invalid utf-8",
        b'{"type": "m.room.message", "content": {"n": NaN}, "room_id": "' + ROOM.encode() + b'"}',
        b"[" * 50_000 + b"]" * 50_000,
        json.dumps({"content": {}, "room_id": ROOM}).encode(),
        json.dumps({"type": 5, "content": {}, "room_id": ROOM}).encode(),
        json.dumps({"type": "m.room.message", "content": [], "room_id": ROOM}).encode(),
        json.dumps({"type": "m.room.message", "content": {}}).encode(),
    ],
)
def test_a_plaintext_that_is_not_an_event_object_is_refused(plaintext: bytes) -> None:
    alice = Sender()
    sessions = receiver_with(alice)

    with pytest.raises(DecryptionError):
        sessions.decrypt(ROOM, "$e1", 0, alice.encrypt_bytes(plaintext))


def test_a_message_before_the_keys_first_index_is_refused() -> None:
    alice = Sender()
    early = alice.encrypt()
    sessions = receiver_with(alice)  # the key now starts at index 1

    with pytest.raises(DecryptionError, match="before the known session start"):
        sessions.decrypt(ROOM, "$e1", 0, early)
    assert sessions.decrypt(ROOM, "$e2", 0, alice.encrypt()).message_index == 1


def test_the_clear_relation_is_the_one_the_decrypted_content_carries() -> None:
    alice = Sender()
    sessions = receiver_with(alice)
    clear = {"rel_type": "m.thread", "event_id": "$root"}
    payload = {
        "type": "m.room.message",
        "content": {"body": "hi", "m.relates_to": {"rel_type": "m.thread", "event_id": "$lie"}},
        "room_id": ROOM,
    }
    encrypted = alice.encrypt_bytes(json.dumps(payload).encode(), **{"m.relates_to": clear})

    assert sessions.decrypt(ROOM, "$e1", 0, encrypted).content["m.relates_to"] == clear


# ------------------------------------------------------------------------ room keys


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda c: c.update(algorithm="m.megolm.v2"), "another algorithm"),
        (lambda c: c.pop("algorithm"), "another algorithm"),
        (lambda c: c.pop("room_id"), "room_id"),
        (lambda c: c.update(room_id=7), "room_id"),
        (lambda c: c.update(session_id="x" * 300), "session_id"),
        (lambda c: c.pop("session_key"), "session_key"),
        (lambda c: c.update(session_key="garbage"), "malformed session_key"),
        (lambda c: c.update(session_key=c["session_key"][:-10]), "malformed session_key"),
        (lambda c: c.update(session_id="someone elses id"), "does not match"),
    ],
)
def test_a_bad_room_key_is_refused_with_a_reason(mutate: Any, reason: str) -> None:
    alice = Sender()
    content = alice.room_key()
    mutate(content)
    sessions = GroupSessions(PICKLE_KEY)

    outcome = sessions.add_room_key(content, sender_curve25519=ALICE_CURVE, sender_ed25519=ALICE_ED)

    assert not outcome.stored
    assert reason in outcome.reason
    assert alice.session.session_key.to_base64() not in outcome.reason
    assert not sessions.has_session(ROOM, alice.session_id)
    assert sessions.take_changes().inbound == ()


def test_a_room_key_that_is_not_an_object_is_refused() -> None:
    outcome = GroupSessions(PICKLE_KEY).add_room_key(
        ["x"], sender_curve25519=ALICE_CURVE, sender_ed25519=ALICE_ED
    )
    assert not outcome.stored


def test_the_earlier_of_two_keys_is_kept() -> None:
    alice = Sender()
    early_key = alice.room_key()
    first = alice.encrypt()
    late_key = alice.room_key()
    sessions = GroupSessions(PICKLE_KEY)
    keys = {"sender_curve25519": ALICE_CURVE, "sender_ed25519": ALICE_ED}

    assert sessions.add_room_key(late_key, **keys).stored
    assert sessions.add_room_key(early_key, **keys).reason == "earlier index"
    assert sessions.add_room_key(late_key, **keys).reason == "already known"
    assert sessions.add_room_key(early_key, **keys).reason == "already known"

    assert sessions.decrypt(ROOM, "$e1", 0, first).message_index == 0
    (record,) = sessions.take_changes().inbound
    assert record.first_known_index == 0


def test_a_re_delivered_room_key_changes_nothing() -> None:
    alice = Sender()
    sessions = receiver_with(alice)
    sessions.take_changes()

    outcome = sessions.add_room_key(
        alice.room_key(), sender_curve25519=ALICE_CURVE, sender_ed25519=ALICE_ED
    )

    assert (outcome.stored, outcome.room_id, outcome.session_id) == (
        False,
        ROOM,
        alice.session_id,
    )
    assert not sessions.take_changes()


def test_a_forwarded_key_decrypts_but_is_not_trusted() -> None:
    alice = Sender()
    sessions = GroupSessions(PICKLE_KEY)
    outcome = sessions.add_forwarded_room_key(forwarded(alice), forwarder_curve25519="Fwd")
    assert outcome.stored

    got = sessions.decrypt(ROOM, "$e1", 0, alice.encrypt())

    assert got.trusted is False
    assert (got.sender_curve25519, got.sender_claimed_ed25519) == (ALICE_CURVE, ALICE_ED)
    (record,) = sessions.take_changes().inbound
    assert record.trusted is False


def test_a_direct_key_of_the_same_ratchet_makes_a_forwarded_session_trusted() -> None:
    alice = Sender()
    sessions = GroupSessions(PICKLE_KEY)
    sessions.add_forwarded_room_key(
        forwarded(alice, sender_claimed_ed25519_key="ForgedEd"), forwarder_curve25519="Fwd"
    )
    first = alice.encrypt()

    outcome = sessions.add_room_key(
        alice.room_key(), sender_curve25519=ALICE_CURVE, sender_ed25519=ALICE_ED
    )

    assert (outcome.stored, outcome.reason) == (True, "now trusted")
    got = sessions.decrypt(ROOM, "$e1", 0, first)  # the forwarded earlier start is kept
    assert (got.trusted, got.sender_claimed_ed25519) == (True, ALICE_ED)


def test_a_forwarded_key_does_not_override_a_trusted_claim() -> None:
    alice = Sender()
    alice.encrypt()
    sessions = receiver_with(alice)  # trusted, starts at index 1
    fwd = forwarded(alice, index=0, sender_claimed_ed25519_key="ForgedEd")
    fwd["session_key"] = (
        vodozemac.InboundGroupSession(vodozemac.SessionKey(alice.room_key()["session_key"]))
        .export_at(1)
        .to_base64()  # type: ignore[union-attr]
    )
    assert sessions.add_forwarded_room_key(fwd, forwarder_curve25519="Fwd").reason == (
        "already known"
    )
    got = sessions.decrypt(ROOM, "$e1", 0, alice.encrypt())
    assert (got.trusted, got.sender_claimed_ed25519) == (True, ALICE_ED)


def test_a_forged_ratchet_reusing_a_session_id_is_refused() -> None:
    alice = Sender()
    sessions = receiver_with(alice)
    fwd = forwarded(alice)
    raw = bytearray(base64.b64decode(fwd["session_key"] + "=="))
    raw[10] ^= 0xFF  # inside the ratchet; the session id (public key) is unchanged
    fwd["session_key"] = base64.b64encode(bytes(raw)).decode().rstrip("=")

    outcome = sessions.add_forwarded_room_key(fwd, forwarder_curve25519="Fwd")

    assert (outcome.stored, outcome.reason) == (False, "conflicts with a known session of that id")
    assert sessions.decrypt(ROOM, "$e1", 0, alice.encrypt()).trusted is True


def test_a_forwarded_key_naming_another_sender_does_not_hijack_the_session() -> None:
    alice = Sender()
    sessions = receiver_with(alice)
    fwd = forwarded(alice, sender_key="MalloryCurve", sender_claimed_ed25519_key="MalloryEd")
    assert sessions.add_forwarded_room_key(fwd, forwarder_curve25519="Fwd").stored

    encrypted = alice.encrypt()
    assert sessions.decrypt(ROOM, "$e1", 0, encrypted).sender_curve25519 == ALICE_CURVE
    del encrypted["sender_key"]  # found by id: the trusted one wins
    assert sessions.decrypt(ROOM, "$e1", 0, encrypted).sender_curve25519 == ALICE_CURVE
    # Claiming the sender key explicitly gives the untrusted one, and says so.
    encrypted["sender_key"] = "MalloryCurve"
    with pytest.raises(DecryptionError, match="replayed"):
        sessions.decrypt(ROOM, "$e2", 0, encrypted)
    mallory = sessions.decrypt(ROOM, "$e1", 0, encrypted)
    assert (mallory.sender_curve25519, mallory.trusted) == ("MalloryCurve", False)


def test_an_unknown_clear_sender_key_falls_back_to_the_session_and_reports_its_key() -> None:
    alice = Sender()
    sessions = receiver_with(alice)
    encrypted = alice.encrypt(sender_key="SomeoneElsesCurve")

    got = sessions.decrypt(ROOM, "$e1", 0, encrypted)

    assert (got.sender_curve25519, got.trusted) == (ALICE_CURVE, True)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c.pop("sender_key"),
        lambda c: c.pop("sender_claimed_ed25519_key"),
        lambda c: c.update(session_key=None),
        lambda c: c.update(session_key="garbage"),
        lambda c: c.update(algorithm="m.olm.v1.curve25519-aes-sha2"),
        lambda c: c.update(session_id="other"),
    ],
)
def test_a_bad_forwarded_key_is_refused(mutate: Any) -> None:
    content = forwarded(Sender())
    mutate(content)
    sessions = GroupSessions(PICKLE_KEY)

    assert not sessions.add_forwarded_room_key(content, forwarder_curve25519="Fwd").stored
    assert not sessions.add_forwarded_room_key("x", forwarder_curve25519="Fwd").stored
    assert not sessions.take_changes()


def test_a_direct_room_key_does_not_import_an_exported_key() -> None:
    alice = Sender()
    content = alice.room_key()
    content["session_key"] = forwarded(alice)["session_key"]

    outcome = GroupSessions(PICKLE_KEY).add_room_key(
        content, sender_curve25519=ALICE_CURVE, sender_ed25519=ALICE_ED
    )

    assert not outcome.stored


# ------------------------------------------------------------------------- outbound

DEVICES = [("@alice:example.org", "A1"), ("@alice:example.org", "A2"), ("@bob:example.org", "B1")]


def test_the_bot_encrypts_and_a_peer_and_the_bot_itself_decrypt() -> None:
    bot = GroupSessions(PICKLE_KEY)
    plan = prepare(bot, DEVICES)
    assert (plan.created, plan.rotated, plan.to_share) == (True, None, tuple(sorted(DEVICES)))
    assert plan.room_key["room_id"] == ROOM
    assert plan.room_key["algorithm"] == ALGORITHM
    peer = vodozemac.InboundGroupSession(vodozemac.SessionKey(plan.room_key["session_key"]))
    assert peer.session_id == plan.session_id

    relation = {"m.in_reply_to": {"event_id": "$q"}}
    encrypted = bot.encrypt(
        ROOM, "m.room.message", {"body": SECRET, "m.relates_to": relation}, "BOTDEV", BOT_CURVE
    )

    assert set(encrypted) == {
        "algorithm",
        "sender_key",
        "ciphertext",
        "session_id",
        "device_id",
        "m.relates_to",
    }
    assert encrypted["m.relates_to"] == relation
    assert (encrypted["sender_key"], encrypted["device_id"]) == (BOT_CURVE, "BOTDEV")
    assert SECRET not in json.dumps(encrypted)
    message = vodozemac.MegolmMessage.from_base64(encrypted["ciphertext"])
    payload = json.loads(peer.decrypt(message).plaintext)
    assert payload == {
        "type": "m.room.message",
        "content": {"body": SECRET, "m.relates_to": relation},
        "room_id": ROOM,
    }
    own = bot.decrypt(ROOM, "$mine", 0, encrypted)
    assert (own.content["body"], own.sender_curve25519, own.trusted) == (SECRET, BOT_CURVE, True)


def test_sharing_is_recorded_and_only_new_devices_are_asked_for() -> None:
    bot = GroupSessions(PICKLE_KEY)
    plan = prepare(bot, DEVICES[:2])
    bot.mark_shared(ROOM, plan.session_id, plan.to_share)

    again = prepare(bot, DEVICES)

    assert (again.created, again.rotated, again.session_id) == (False, None, plan.session_id)
    assert again.to_share == (DEVICES[2],)
    assert again.room_key["session_id"] == plan.session_id
    assert prepare(bot, DEVICES[:2]).room_key == {}  # nobody needs it: not exported
    info = bot.outbound(ROOM)
    assert info is not None
    assert info.shared_with == frozenset(DEVICES[:2])


def test_marking_an_old_session_shared_is_ignored() -> None:
    bot = GroupSessions(PICKLE_KEY)
    old = prepare(bot, DEVICES)
    bot.discard_outbound(ROOM)
    new = prepare(bot, DEVICES)
    bot.mark_shared(ROOM, old.session_id, DEVICES)

    assert prepare(bot, DEVICES).to_share == new.to_share == tuple(sorted(DEVICES))


def test_rotation_after_the_configured_number_of_messages() -> None:
    bot = GroupSessions(PICKLE_KEY)
    settings = RotationSettings(period_msgs=2)
    plan = prepare(bot, DEVICES, settings=settings)
    bot.mark_shared(ROOM, plan.session_id, DEVICES)
    first = bot.encrypt(ROOM, "m.room.message", {"body": "0"}, "D", BOT_CURVE)
    assert prepare(bot, DEVICES, settings=settings).rotated is None
    bot.encrypt(ROOM, "m.room.message", {"body": "1"}, "D", BOT_CURVE)

    rotated = prepare(bot, DEVICES, settings=settings)

    assert (rotated.created, rotated.rotated) == (True, "messages")
    assert rotated.session_id != plan.session_id
    assert rotated.to_share == tuple(sorted(DEVICES))  # a new key goes to everyone
    # The old session's inbound copy stays: the bot still reads its earlier messages.
    assert bot.decrypt(ROOM, "$first", 0, first).content == {"body": "0"}


def test_rotation_by_age() -> None:
    bot = GroupSessions(PICKLE_KEY)
    settings = RotationSettings.from_encryption_content({"rotation_period_ms": 2 * 3_600_000})
    plan = prepare(bot, DEVICES, now_ms=0, settings=settings)

    assert prepare(bot, DEVICES, now_ms=2 * 3_600_000 - 1, settings=settings).rotated is None
    later = prepare(bot, DEVICES, now_ms=2 * 3_600_000, settings=settings)

    assert (later.rotated, later.created) == ("age", True)
    assert later.session_id != plan.session_id
    info = bot.outbound(ROOM)
    assert info is not None
    assert info.created_ms == 2 * 3_600_000


def test_a_clock_set_back_a_long_way_also_rotates() -> None:
    bot = GroupSessions(PICKLE_KEY)
    prepare(bot, DEVICES, now_ms=10 * WEEK)

    assert prepare(bot, DEVICES, now_ms=WEEK).rotated == "age"


def test_rotation_when_a_device_it_was_shared_with_is_gone() -> None:
    bot = GroupSessions(PICKLE_KEY)
    plan = prepare(bot, DEVICES)
    bot.mark_shared(ROOM, plan.session_id, DEVICES)

    after_leave = prepare(bot, [d for d in DEVICES if d[0] != "@bob:example.org"])

    assert (after_leave.rotated, after_leave.created) == ("device removed", True)
    assert "@bob:example.org" not in {user for user, _ in after_leave.to_share}
    assert len(after_leave.to_share) == 2


def test_a_device_never_shared_with_leaving_does_not_rotate() -> None:
    bot = GroupSessions(PICKLE_KEY)
    plan = prepare(bot, DEVICES)
    bot.mark_shared(ROOM, plan.session_id, DEVICES[:2])

    assert prepare(bot, DEVICES[:2]).rotated is None


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, (WEEK, 100)),
        ("not an object", (WEEK, 100)),
        ({}, (WEEK, 100)),
        ({"rotation_period_ms": -5, "rotation_period_msgs": -1}, (WEEK, 100)),
        ({"rotation_period_ms": 0, "rotation_period_msgs": 0}, (WEEK, 100)),
        ({"rotation_period_ms": 10**30, "rotation_period_msgs": 10**30}, (WEEK, 10_000)),
        ({"rotation_period_ms": "3600000", "rotation_period_msgs": "5"}, (WEEK, 100)),
        ({"rotation_period_ms": 3.6e6, "rotation_period_msgs": 5.0}, (WEEK, 100)),
        ({"rotation_period_ms": True, "rotation_period_msgs": True}, (WEEK, 100)),
        ({"rotation_period_ms": 1, "rotation_period_msgs": 1}, (3_600_000, 1)),
        ({"rotation_period_ms": 86_400_000, "rotation_period_msgs": 50}, (86_400_000, 50)),
    ],
)
def test_rotation_settings_are_clamped_and_hostile_values_ignored(
    content: Any, expected: tuple[int, int]
) -> None:
    settings = RotationSettings.from_encryption_content(content)
    assert (settings.period_ms, settings.period_msgs) == expected


@pytest.mark.parametrize(
    "kwargs", [{"period_msgs": 0}, {"period_msgs": 10_001}, {"period_ms": 0}, {"period_ms": -1}]
)
def test_rotation_settings_built_by_hand_out_of_bounds_are_a_caller_error(
    kwargs: dict[str, int],
) -> None:
    with pytest.raises(ValueError, match="out of bounds"):
        RotationSettings(**kwargs)


def test_encrypting_without_a_prepared_session_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match="prepare"):
        GroupSessions(PICKLE_KEY).encrypt(ROOM, "m.room.message", {}, "D", BOT_CURVE)


def test_the_pickle_key_must_be_32_bytes() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        GroupSessions(b"short")


# ---------------------------------------------------------------------- persistence


def test_restore_from_records_round_trip() -> None:
    alice = Sender()
    bot = receiver_with(alice)
    bot.add_forwarded_room_key(forwarded(Sender("Carol")), forwarder_curve25519="Fwd")
    plan = prepare(bot, DEVICES, now_ms=5_000)
    bot.mark_shared(ROOM, plan.session_id, DEVICES)
    mine = bot.encrypt(ROOM, "m.room.message", {"body": "mine"}, "D", BOT_CURVE)
    seen_event = alice.encrypt()
    bot.decrypt(ROOM, "$seen", 0, seen_event)
    inbound, outbound, seen = bot.records()
    assert all(SECRET not in repr(r) for r in (*inbound, *outbound, *seen))

    restored = GroupSessions.restore(PICKLE_KEY, inbound=inbound, outbound=outbound, seen=seen)

    assert not restored.take_changes()  # nothing new to persist
    assert len(restored.records()[0]) == len(inbound) == 3  # Alice's, Carol's forwarded, own
    assert {(r.room_id, r.session_id, r.trusted) for r in restored.records()[0]} == {
        (r.room_id, r.session_id, r.trusted) for r in inbound
    }
    # Replay records survive: the same ciphertext under another event id is refused.
    with pytest.raises(DecryptionError, match="replayed"):
        restored.decrypt(ROOM, "$copy", 0, seen_event)
    assert restored.decrypt(ROOM, "$seen", 0, seen_event).content["body"] == SECRET
    assert restored.decrypt(ROOM, "$mine", 0, mine).content == {"body": "mine"}
    # The outbound session continues where it was: same id, next index, same sharing.
    info = restored.outbound(ROOM)
    assert info is not None
    assert (info.session_id, info.message_count, info.created_ms) == (plan.session_id, 1, 5_000)
    assert info.shared_with == frozenset(DEVICES)
    assert prepare(restored, DEVICES, now_ms=6_000).to_share == ()
    nxt = restored.encrypt(ROOM, "m.room.message", {"body": "next"}, "D", BOT_CURVE)
    assert restored.decrypt(ROOM, "$next", 0, nxt).message_index == 1


def test_changes_accumulate_into_the_same_state_as_records() -> None:
    alice = Sender()
    bot = receiver_with(alice)
    store_inbound: dict[tuple[str, str, str], megolm.InboundRecord] = {}
    store_outbound: dict[str, megolm.OutboundRecord] = {}
    store_seen: dict[tuple[str, int], megolm.SeenRecord] = {}

    def persist() -> None:
        changes = bot.take_changes()
        for i in changes.inbound:
            store_inbound[(i.room_id, i.sender_curve25519, i.session_id)] = i
        for inbound_key in changes.inbound_deleted:
            del store_inbound[inbound_key]
        for o in changes.outbound:
            store_outbound[o.room_id] = o
        for room in changes.outbound_deleted:
            del store_outbound[room]
        for s in changes.seen:
            store_seen[(s.session_id, s.message_index)] = s
        for key in changes.seen_deleted:
            del store_seen[key]

    persist()
    plan = prepare(bot, DEVICES)
    persist()
    bot.mark_shared(ROOM, plan.session_id, DEVICES[:1])
    bot.encrypt(ROOM, "m.room.message", {"body": "x"}, "D", BOT_CURVE)
    bot.decrypt(ROOM, "$a", 0, alice.encrypt())
    persist()
    bot.discard_outbound(ROOM)
    persist()
    assert store_outbound == {}
    prepare(bot, DEVICES)
    bot.encrypt(ROOM, "m.room.message", {"body": "y"}, "D", BOT_CURVE)
    persist()
    assert not bot.take_changes()

    restored = GroupSessions.restore(
        PICKLE_KEY,
        inbound=store_inbound.values(),
        outbound=store_outbound.values(),
        seen=store_seen.values(),
    )
    inbound, outbound, seen = restored.records()
    assert {r.session_id for r in inbound} == {r.session_id for r in bot.records()[0]}
    assert [(o.session_id, o.message_count) for o in outbound] == [
        (o.session_id, o.message_count) for o in bot.records()[1]
    ]
    assert seen == bot.records()[2]


def test_an_encryption_marks_the_outbound_session_changed() -> None:
    bot = GroupSessions(PICKLE_KEY)
    prepare(bot, DEVICES)
    bot.take_changes()

    bot.encrypt(ROOM, "m.room.message", {"body": "x"}, "D", BOT_CURVE)

    (record,) = bot.take_changes().outbound
    assert record.message_count == 1


def test_restore_with_the_wrong_pickle_key_is_a_crypto_error() -> None:
    bot = receiver_with(Sender())
    prepare(bot, DEVICES)
    inbound, outbound, _ = bot.records()

    with pytest.raises(CryptoError, match="cannot be restored") as caught:
        GroupSessions.restore(bytes(32), inbound=inbound)
    assert inbound[0].pickle not in str(caught.value)
    with pytest.raises(CryptoError, match="cannot be restored"):
        GroupSessions.restore(bytes(32), outbound=outbound)


def test_replay_records_are_bounded_oldest_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(megolm, "SEEN_LIMIT", 3)
    alice = Sender()
    bot = receiver_with(alice)
    events = [alice.encrypt() for _ in range(5)]
    for i, event in enumerate(events[:3]):
        bot.decrypt(ROOM, f"$e{i}", i, event)
    first = bot.take_changes()
    assert [s.message_index for s in first.seen] == [0, 1, 2]

    for i, event in enumerate(events[3:], start=3):
        bot.decrypt(ROOM, f"$e{i}", i, event)
    later = bot.take_changes()

    assert [s.message_index for s in later.seen] == [3, 4]
    assert [index for _, index in later.seen_deleted] == [0, 1]
    assert [s.message_index for s in bot.records()[2]] == [2, 3, 4]
    # Restoring more than the bound keeps the newest (by origin_server_ts, whatever the
    # store's order) and deletes the rest from the store.
    restored = GroupSessions.restore(PICKLE_KEY, seen=[*later.seen, *first.seen][::-1])
    assert [s.message_index for s in restored.records()[2]] == [2, 3, 4]
    assert [index for _, index in restored.take_changes().seen_deleted] == [0, 1]


# ------------------------------------------------------------------ odd plaintexts


def _nested(depth: int) -> dict[str, Any]:
    """An event payload whose content nests ``depth`` containers in all (payload included)."""
    inner: Any = "leaf"
    for _ in range(depth - 2):
        inner = [inner]
    return {"type": "m.room.message", "content": {"deep": inner}, "room_id": ROOM}


def test_a_plaintext_nested_as_deep_as_plain_events_may_decrypts() -> None:
    alice = Sender()
    sessions = receiver_with(alice)
    payload = _nested(megolm.MAX_PLAINTEXT_DEPTH)

    got = sessions.decrypt(ROOM, "$e1", 0, alice.encrypt_bytes(json.dumps(payload).encode()))

    assert got.content == payload["content"]


def test_a_plaintext_nested_deeper_than_plain_events_may_is_refused() -> None:
    alice = Sender()
    sessions = receiver_with(alice)
    payload = _nested(megolm.MAX_PLAINTEXT_DEPTH + 1)

    with pytest.raises(DecryptionError, match="too deep"):
        sessions.decrypt(ROOM, "$e1", 0, alice.encrypt_bytes(json.dumps(payload).encode()))


def test_lone_surrogates_in_a_plaintext_become_replacement_characters() -> None:
    alice = Sender()
    sessions = receiver_with(alice)
    raw = (
        b'{"type": "m.room.message", "room_id": "' + ROOM.encode() + b'", "content": '
        b'{"body": "a\\ud800b \\ud83d\\ude00", "k\\udc00": ["\\udfff", {"x": "\\uDBFF"}]}}'
    )

    got = sessions.decrypt(ROOM, "$e1", 0, alice.encrypt_bytes(raw))

    assert got.content == {"body": "a\ufffdb \U0001f600", "k\ufffd": ["\ufffd", {"x": "\ufffd"}]}
    json.dumps(got.content, ensure_ascii=False).encode("utf-8")  # encodable now


def test_a_lone_surrogate_in_the_bots_own_content_is_sent_as_a_replacement_character() -> None:
    bot = GroupSessions(PICKLE_KEY)
    plan = prepare(bot, DEVICES)
    peer = vodozemac.InboundGroupSession(vodozemac.SessionKey(plan.room_key["session_key"]))

    encrypted = bot.encrypt(ROOM, "m.room.message", {"body": "half \ud83d"}, "D", BOT_CURVE)

    message = vodozemac.MegolmMessage.from_base64(encrypted["ciphertext"])
    assert json.loads(peer.decrypt(message).plaintext)["content"] == {"body": "half \ufffd"}


def test_a_ciphertext_with_a_lone_surrogate_is_malformed_not_a_crash() -> None:
    alice = Sender()
    sessions = receiver_with(alice)
    encrypted = alice.encrypt()
    encrypted["ciphertext"] = "\ud800" + encrypted["ciphertext"]

    with pytest.raises(DecryptionError, match="malformed ciphertext"):
        sessions.decrypt(ROOM, "$e1", 0, encrypted)


def test_sessions_per_sender_are_bounded_least_recently_used_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(megolm, "SESSIONS_PER_SENDER_LIMIT", 2)
    first, second, third = Sender(), Sender(), Sender()
    carol = Sender("CarolCurve")
    sessions = receiver_with(first)
    carol_outcome = sessions.add_room_key(
        carol.room_key(), sender_curve25519="CarolCurve", sender_ed25519="CarolEd"
    )
    assert carol_outcome.stored
    keys = {"sender_curve25519": ALICE_CURVE, "sender_ed25519": ALICE_ED}
    assert sessions.add_room_key(second.room_key(), **keys).stored
    sessions.take_changes()
    sessions.decrypt(ROOM, "$e1", 0, first.encrypt())  # first is now the most recently used

    assert sessions.add_room_key(third.room_key(), **keys).stored

    assert sessions.has_session(ROOM, first.session_id)
    assert not sessions.has_session(ROOM, second.session_id)
    assert sessions.has_session(ROOM, third.session_id)
    assert sessions.has_session(ROOM, carol.session_id)  # another sender's are not touched
    with pytest.raises(MissingRoomKey):
        sessions.decrypt(ROOM, "$e2", 0, second.encrypt())
    changes = sessions.take_changes()
    assert changes.inbound_deleted == ((ROOM, ALICE_CURVE, second.session_id),)
    assert [r.session_id for r in changes.inbound] == [third.session_id]
    # A key dropped then offered again is stored again, and no longer reported deleted.
    assert sessions.add_room_key(second.room_key(), **keys).stored
    again = sessions.take_changes()
    assert again.inbound_deleted == ((ROOM, ALICE_CURVE, first.session_id),)
    assert [r.session_id for r in again.inbound] == [second.session_id]


def test_restoring_more_sessions_than_the_bound_drops_the_oldest_from_the_store(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    senders = [Sender() for _ in range(3)]
    sessions = GroupSessions(PICKLE_KEY)
    for sender in senders:
        sessions.add_room_key(
            sender.room_key(), sender_curve25519=ALICE_CURVE, sender_ed25519=ALICE_ED
        )
    inbound, _, _ = sessions.records()
    monkeypatch.setattr(megolm, "SESSIONS_PER_SENDER_LIMIT", 2)

    restored = GroupSessions.restore(PICKLE_KEY, inbound=inbound)

    assert restored.take_changes().inbound_deleted == ((ROOM, ALICE_CURVE, senders[0].session_id),)
    assert [restored.has_session(ROOM, s.session_id) for s in senders] == [False, True, True]


def test_no_value_shows_plaintext_keys_or_pickles_in_its_repr() -> None:
    alice = Sender()
    bot = receiver_with(alice)
    plan = prepare(bot, DEVICES)
    decrypted = bot.decrypt(ROOM, "$e1", 0, alice.encrypt())
    inbound, outbound, seen = bot.records()
    secrets = [
        SECRET,
        plan.room_key["session_key"],
        alice.room_key()["session_key"],
        *(r.pickle for r in inbound),
        *(r.pickle for r in outbound),
    ]

    shown = repr([plan, decrypted, inbound, outbound, seen, bot.take_changes()])

    assert plan.session_id in shown  # ids are fine to show
    assert [s for s in secrets if s in shown] == []


# ----------------------------------------------------------------- any input at all

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
_FIELDS = ["algorithm", "ciphertext", "session_id", "sender_key", "device_id", "m.relates_to"]


@settings(max_examples=150, deadline=None)
@given(
    overrides=st.dictionaries(st.sampled_from(_FIELDS), _json, max_size=4),
    flip=st.one_of(st.none(), st.tuples(st.integers(min_value=0), st.integers(1, 255))),
)
def test_decrypt_raises_only_the_two_documented_errors(
    overrides: dict[str, Any], flip: tuple[int, int] | None
) -> None:
    alice = Sender()
    sessions = receiver_with(alice)
    encrypted = alice.encrypt()
    if flip is not None:
        raw = bytearray(base64.b64decode(encrypted["ciphertext"] + "=="))
        raw[flip[0] % len(raw)] ^= flip[1]
        encrypted["ciphertext"] = base64.b64encode(bytes(raw)).decode().rstrip("=")
    encrypted.update(overrides)

    try:
        shown, decrypted = sessions.decrypt(ROOM, "$e1", 0, encrypted).content["body"], True
    except (MissingRoomKey, DecryptionError) as exc:
        shown, decrypted = str(exc), False

    # What decrypts is the one plaintext; a refusal never quotes it.
    assert (shown == SECRET) == decrypted


@settings(max_examples=150, deadline=None)
@given(
    overrides=st.dictionaries(
        st.sampled_from(["algorithm", "room_id", "session_id", "session_key", "sender_key"]),
        _json,
        max_size=3,
    )
)
def test_room_keys_never_raise(overrides: dict[str, Any]) -> None:
    alice = Sender()
    sessions = GroupSessions(PICKLE_KEY)
    direct = {**alice.room_key(), **overrides}
    fwd = {**forwarded(alice), **overrides}

    outcomes = [
        sessions.add_room_key(direct, sender_curve25519=ALICE_CURVE, sender_ed25519=ALICE_ED),
        sessions.add_forwarded_room_key(fwd, forwarder_curve25519="Fwd"),
    ]

    for outcome in outcomes:
        assert alice.room_key()["session_key"] not in outcome.reason
    # Stored means findable where the outcome says; nothing stored means nothing kept.
    assert all(sessions.has_session(o.room_id, o.session_id) for o in outcomes if o.stored)
    assert (sessions.records()[0] != []) == any(o.stored for o in outcomes)
