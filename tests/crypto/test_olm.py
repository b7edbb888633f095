"""Olm to-device messages: both directions with vodozemac on the other side, re-delivery,
and everything a hostile sender or server can put in an event."""

from __future__ import annotations

import json
from typing import Any

import pytest
import vodozemac

from matrix_crypto.canonical import b64encode
from matrix_crypto.errors import DecryptionError
from matrix_crypto.identity import Identity
from matrix_crypto.olm import (
    MAX_SESSIONS_PER_PEER,
    OlmSessions,
    create_outbound_session,
    decrypt_to_device,
    encrypt_for_device,
)

BOT = "@bot:example.org"
ALICE = "@alice:example.org"


class Peer:
    """A raw vodozemac device: builds any payload, honest or not."""

    def __init__(self, user_id: str = ALICE, device_id: str = "ALICEDEV") -> None:
        self.user_id = user_id
        self.device_id = device_id
        self.account = vodozemac.Account()
        self.session: vodozemac.Session | None = None

    @property
    def curve25519(self) -> str:
        return self.account.curve25519_key.to_base64()

    @property
    def ed25519(self) -> str:
        return self.account.ed25519_key.to_base64()

    def start(self, bot: Identity) -> None:
        """Claim one of the bot's one-time keys and open a session."""
        keys = bot.one_time_keys_for({})
        bot.mark_published()
        signed = next(iter(keys.values()))
        assert isinstance(signed, dict)
        self.session = self.account.create_outbound_session(
            vodozemac.Curve25519PublicKey.from_base64(bot.curve25519),
            vodozemac.Curve25519PublicKey.from_base64(str(signed["key"])),
        )

    def payload(self, bot: Identity, **overrides: Any) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "sender": self.user_id,
            "sender_device": self.device_id,
            "keys": {"ed25519": self.ed25519},
            "recipient": bot.user_id,
            "recipient_keys": {"ed25519": bot.ed25519},
            "type": "m.room_key",
            "content": {"hello": "world"},
        }
        payload.update(overrides)
        return {k: v for k, v in payload.items() if v is not _DROP}

    def event(self, bot: Identity, plaintext: bytes | None = None, **overrides: Any) -> dict:
        assert self.session is not None
        if plaintext is None:
            plaintext = json.dumps(self.payload(bot, **overrides)).encode()
        message_type, raw = self.session.encrypt(plaintext).to_parts()
        return {
            "type": "m.room.encrypted",
            "sender": self.user_id,
            "content": {
                "algorithm": "m.olm.v1.curve25519-aes-sha2",
                "sender_key": self.curve25519,
                "ciphertext": {bot.curve25519: {"type": message_type, "body": b64encode(raw)}},
            },
        }


_DROP = object()


@pytest.fixture
def bot() -> Identity:
    return Identity.create(BOT, "BOTDEV")


@pytest.fixture
def peer(bot: Identity) -> Peer:
    peer = Peer()
    peer.start(bot)
    return peer


def test_pre_key_then_normal_messages_decrypt(bot: Identity, peer: Peer) -> None:
    sessions = OlmSessions()
    first = decrypt_to_device(bot, sessions, peer.event(bot))
    assert first.new_session
    assert (first.sender, first.sender_key, first.sender_ed25519) == (
        ALICE,
        peer.curve25519,
        peer.ed25519,
    )
    assert first.sender_device == "ALICEDEV"
    assert (first.type, first.content) == ("m.room_key", {"hello": "world"})
    # Still pre-key messages (no reply yet): the existing session answers them.
    second = decrypt_to_device(bot, sessions, peer.event(bot, content={"n": 2}))
    assert not second.new_session
    assert second.session_id == first.session_id
    assert second.content == {"n": 2}
    # The bot replies; from then on the peer sends normal messages.
    reply = encrypt_for_device(
        bot,
        sessions,
        user_id=ALICE,
        curve25519=peer.curve25519,
        ed25519=peer.ed25519,
        event_type="m.dummy",
        content={},
    )
    assert reply is not None
    body = reply["ciphertext"][peer.curve25519]  # type: ignore[index]
    assert peer.session is not None
    answered = json.loads(
        peer.session.decrypt(vodozemac.AnyOlmMessage.from_parts(body["type"], _unb64(body["body"])))
    )
    assert answered["recipient"] == ALICE
    assert answered["recipient_keys"] == {"ed25519": peer.ed25519}
    assert answered["keys"] == {"ed25519": bot.ed25519}
    assert answered["sender_device"] == "BOTDEV"
    normal = peer.event(bot, content={"n": 3})
    assert normal["content"]["ciphertext"][bot.curve25519]["type"] == 1
    assert decrypt_to_device(bot, sessions, normal).content == {"n": 3}
    assert sessions.changed() == {(peer.curve25519, first.session_id)}


def _unb64(text: str) -> bytes:
    import base64

    return base64.b64decode(text + "=" * (-len(text) % 4))


def test_redelivered_pre_key_message_gives_the_same_result(bot: Identity, peer: Peer) -> None:
    sessions = OlmSessions()
    event = peer.event(bot)
    first = decrypt_to_device(bot, sessions, event)
    again = decrypt_to_device(bot, sessions, json.loads(json.dumps(event)))
    assert again == first
    assert len(sessions.sessions_for(peer.curve25519)) == 1  # no second session


def test_redelivered_after_restart_from_the_state_before_it(bot: Identity, peer: Peer) -> None:
    """The store holds the state from before the message (the sync token did not move):
    restored, it decrypts the message afresh."""
    key = bytes(32)
    pickle = bot.pickle(key)
    event = peer.event(bot)
    decrypt_to_device(bot, OlmSessions(), event)
    restored = Identity.from_pickle(BOT, "BOTDEV", pickle, key)
    assert decrypt_to_device(restored, OlmSessions(), event).content == {"hello": "world"}


def test_replayed_pre_key_message_without_memory_is_refused(bot: Identity, peer: Peer) -> None:
    """A session exists for the message but the result is not remembered (another
    process): it is refused, and no second session is made from it."""
    sessions = OlmSessions()
    event = peer.event(bot)
    decrypt_to_device(bot, sessions, event)
    fresh = OlmSessions()
    for peer_key, session, used in sessions.items():
        fresh.restore(peer_key, session, used)
    with pytest.raises(DecryptionError, match="replayed"):
        decrypt_to_device(bot, fresh, event)
    assert len(fresh.sessions_for(peer.curve25519)) == 1


def test_replay_through_the_fallback_key_is_refused(bot: Identity) -> None:
    body = next(iter(bot.fallback_keys_for([]).values()))
    assert isinstance(body, dict)
    bot.mark_published()
    peer = Peer()
    peer.session = peer.account.create_outbound_session(
        vodozemac.Curve25519PublicKey.from_base64(bot.curve25519),
        vodozemac.Curve25519PublicKey.from_base64(str(body["key"])),
    )
    sessions = OlmSessions()
    event = peer.event(bot)
    decrypt_to_device(bot, sessions, event)
    fresh = OlmSessions()
    for peer_key, session, used in sessions.items():
        fresh.restore(peer_key, session, used)
    with pytest.raises(DecryptionError):
        decrypt_to_device(bot, fresh, event)


def test_wrong_recipient_user(bot: Identity, peer: Peer) -> None:
    with pytest.raises(DecryptionError, match="another user"):
        decrypt_to_device(bot, OlmSessions(), peer.event(bot, recipient="@eve:example.org"))


def test_wrong_recipient_device(bot: Identity, peer: Peer) -> None:
    other = Identity.create(BOT, "OTHER")
    event = peer.event(bot, recipient_keys={"ed25519": other.ed25519})
    with pytest.raises(DecryptionError, match="another device"):
        decrypt_to_device(bot, OlmSessions(), event)


def test_forged_sender_in_the_event(bot: Identity, peer: Peer) -> None:
    event = peer.event(bot)
    event["sender"] = "@mallory:example.org"  # the server claims someone else sent it
    with pytest.raises(DecryptionError, match="sender differs"):
        decrypt_to_device(bot, OlmSessions(), event)


def test_forged_sender_key(bot: Identity, peer: Peer) -> None:
    event = peer.event(bot)
    mallory = vodozemac.Account().curve25519_key.to_base64()
    event["content"]["sender_key"] = mallory  # the pre-key message names alice's key
    with pytest.raises(DecryptionError, match="cannot create"):
        decrypt_to_device(bot, OlmSessions(), event)


def test_forged_sender_key_of_a_known_peer_on_a_normal_message(bot: Identity) -> None:
    sessions = OlmSessions()
    alice, carol = Peer(), Peer("@carol:example.org", "CAROL")
    alice.start(bot)
    carol.start(bot)
    decrypt_to_device(bot, sessions, alice.event(bot))
    event = carol.event(bot)  # a pre-key message from carol, labelled as alice's
    event["content"]["sender_key"] = alice.curve25519
    with pytest.raises(DecryptionError):
        decrypt_to_device(bot, sessions, event)


@pytest.mark.parametrize(
    "override",
    [
        {"keys": _DROP},
        {"keys": {"ed25519": 5}},
        {"keys": "x"},
        {"recipient_keys": _DROP},
        {"recipient": _DROP},
        {"sender": _DROP},
        {"type": _DROP},
        {"type": ["m.room_key"]},
        {"content": "text"},
        {"content": _DROP},
        {"sender_device": 7},
    ],
    ids=str,
)
def test_payload_missing_or_wrong_types(bot: Identity, peer: Peer, override: dict) -> None:
    with pytest.raises(DecryptionError):
        decrypt_to_device(bot, OlmSessions(), peer.event(bot, **override))


@pytest.mark.parametrize(
    "plaintext",
    [b"not json", b"[1, 2]", b"\xff\xfe", b"[" * 30_000, b'"str"', b""],
    ids=["text", "list", "bytes", "deep", "string", "empty"],
)
def test_payload_that_is_not_a_json_object(bot: Identity, peer: Peer, plaintext: bytes) -> None:
    with pytest.raises(DecryptionError, match="payload"):
        decrypt_to_device(bot, OlmSessions(), peer.event(bot, plaintext=plaintext))


def _mutate(event: dict, bot: Identity, **changes: Any) -> dict:
    event = json.loads(json.dumps(event))
    target = event["content"]["ciphertext"][bot.curve25519]
    for key, value in changes.items():
        if value is _DROP:
            target.pop(key)
        else:
            target[key] = value
    return event


@pytest.mark.parametrize(
    "changes",
    [
        {"type": 2},
        {"type": "0"},
        {"type": True},
        {"type": 0.0},
        {"type": 1.0},
        {"type": None},
        {"body": None},
        {"body": ""},
        {"body": 12},
        {"body": "!!!not base64!!!"},
        {"body": "AAAA"},
        {"body": _DROP},
        {"body": "A" * 1_000_000},
    ],
    ids=str,
)
def test_ciphertext_garbage(bot: Identity, peer: Peer, changes: dict) -> None:
    with pytest.raises(DecryptionError):
        decrypt_to_device(bot, OlmSessions(), _mutate(peer.event(bot), bot, **changes))


def test_truncated_and_flipped_ciphertext(bot: Identity, peer: Peer) -> None:
    event = peer.event(bot)
    body = event["content"]["ciphertext"][bot.curve25519]["body"]
    sessions = OlmSessions()
    for bad in (
        body[:-4],
        body[: len(body) // 2],
        body[:-1],
        body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1],
    ):
        with pytest.raises(DecryptionError):
            decrypt_to_device(bot, sessions, _mutate(event, bot, body=bad))
    # The honest message still decrypts afterwards: failed attempts consumed nothing.
    assert decrypt_to_device(bot, sessions, event).content == {"hello": "world"}


def test_ciphertext_for_another_device(bot: Identity, peer: Peer) -> None:
    event = peer.event(bot)
    other = Identity.create(BOT, "OTHER")
    event["content"]["ciphertext"] = {
        other.curve25519: event["content"]["ciphertext"][bot.curve25519]
    }
    with pytest.raises(DecryptionError, match="no ciphertext"):
        decrypt_to_device(bot, OlmSessions(), event)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda e: e.update(type="m.room.message"),
        lambda e: e["content"].update(algorithm="m.megolm.v1.aes-sha2"),
        lambda e: e["content"].update(algorithm="m.olm.v2.whatever"),
        lambda e: e["content"].pop("algorithm"),
        lambda e: e["content"].update(sender_key="not a key"),
        lambda e: e["content"].update(sender_key=None),
        lambda e: e["content"].update(sender_key="A" * 10_000),
        lambda e: e["content"].update(ciphertext=[]),
        lambda e: e["content"].update(ciphertext="x"),
        lambda e: e.update(content=None),
        lambda e: e.update(sender=None),
        lambda e: e.pop("sender"),
    ],
)
def test_event_shape_refused(bot: Identity, peer: Peer, mutate: Any) -> None:
    event = peer.event(bot)
    mutate(event)
    with pytest.raises(DecryptionError):
        decrypt_to_device(bot, OlmSessions(), event)


@pytest.mark.parametrize("event", [None, "x", 5, [], {}], ids=repr)
def test_not_an_event(bot: Identity, event: object) -> None:
    with pytest.raises(DecryptionError):
        decrypt_to_device(bot, OlmSessions(), event)


def test_own_sender_key_refused(bot: Identity, peer: Peer) -> None:
    event = peer.event(bot)
    event["content"]["sender_key"] = bot.curve25519
    with pytest.raises(DecryptionError, match="own key"):
        decrypt_to_device(bot, OlmSessions(), event)


def _claim(device: Identity) -> dict[str, object]:
    keys = device.one_time_keys_for({})
    device.mark_published()
    key_id, body = next(iter(keys.items()))
    return {key_id: body}


def test_identity_to_identity_both_ways() -> None:
    bot, alice = Identity.create(BOT, "BOTDEV"), Identity.create(ALICE, "ALICEDEV")
    bot_sessions, alice_sessions = OlmSessions(), OlmSessions()
    assert (
        create_outbound_session(
            bot,
            bot_sessions,
            user_id=ALICE,
            device_id="ALICEDEV",
            curve25519=alice.curve25519,
            ed25519=alice.ed25519,
            claimed=_claim(alice),
        )
        is None
    )
    content = encrypt_for_device(
        bot,
        bot_sessions,
        user_id=ALICE,
        curve25519=alice.curve25519,
        ed25519=alice.ed25519,
        event_type="m.room_key",
        content={"k": "v"},
    )
    event = {"type": "m.room.encrypted", "sender": BOT, "content": content}
    got = decrypt_to_device(alice, alice_sessions, event)
    assert (got.sender_key, got.sender_ed25519, got.sender_device) == (
        bot.curve25519,
        bot.ed25519,
        "BOTDEV",
    )
    assert got.content == {"k": "v"}
    back = encrypt_for_device(
        alice,
        alice_sessions,
        user_id=BOT,
        curve25519=bot.curve25519,
        ed25519=bot.ed25519,
        event_type="m.dummy",
        content={},
    )
    assert back is not None
    assert back["ciphertext"][bot.curve25519]["type"] == 1  # type: ignore[index]
    assert (
        decrypt_to_device(
            bot, bot_sessions, {"type": "m.room.encrypted", "sender": ALICE, "content": back}
        ).type
        == "m.dummy"
    )


def test_claimed_key_must_be_signed_by_the_device() -> None:
    bot, alice, mallory = (
        Identity.create(u, d) for u, d in ((BOT, "B"), (ALICE, "A"), (ALICE, "M"))
    )
    sessions = OlmSessions()
    claim = _claim(mallory)  # signed by another device's key
    kwargs: dict[str, Any] = {
        "user_id": ALICE,
        "device_id": "A",
        "curve25519": alice.curve25519,
        "ed25519": alice.ed25519,
    }
    assert create_outbound_session(bot, sessions, claimed=claim, **kwargs) is not None
    good = _claim(alice)
    ((key_id, body),) = good.items()
    assert isinstance(body, dict)
    tampered = {key_id: {**body, "key": vodozemac.Account().curve25519_key.to_base64()}}
    assert create_outbound_session(bot, sessions, claimed=tampered, **kwargs) is not None
    for hostile in (
        None,
        {},
        [],
        {"curve25519:x": body},
        {key_id: "x"},
        {key_id: {**body, "key": 5}},
    ):
        assert create_outbound_session(bot, sessions, claimed=hostile, **kwargs) is not None
    assert not sessions.has_session(alice.curve25519)
    bad_device_key = {**kwargs, "curve25519": "garbage"}
    assert create_outbound_session(bot, sessions, claimed=good, **bad_device_key) is not None
    assert create_outbound_session(bot, sessions, claimed=good, **kwargs) is None
    assert sessions.has_session(alice.curve25519)


def test_no_session_no_ciphertext(bot: Identity) -> None:
    alice = Identity.create(ALICE, "A")
    assert (
        encrypt_for_device(
            bot,
            OlmSessions(),
            user_id=ALICE,
            curve25519=alice.curve25519,
            ed25519=alice.ed25519,
            event_type="m.dummy",
            content={},
        )
        is None
    )


def test_sessions_per_peer_are_bounded_least_recently_used_first(bot: Identity) -> None:
    sessions = OlmSessions()
    alice = Peer()
    first_session_id = ""
    for n in range(MAX_SESSIONS_PER_PEER + 3):
        alice.start(bot)  # a new outbound session from the peer each time
        got = decrypt_to_device(bot, sessions, alice.event(bot, content={"n": n}))
        assert got.new_session
        if n == 0:
            first_session_id = got.session_id
    assert len(sessions.sessions_for(alice.curve25519)) == MAX_SESSIONS_PER_PEER
    assert (alice.curve25519, first_session_id) in sessions.removed()
    assert len(sessions.removed()) == 3
    # The newest session is the first one used for sending.
    assert sessions.sessions_for(alice.curve25519)[0].session_id == got.session_id
    sessions.clear_dirty()
    assert sessions.changed() == set()
    assert sessions.removed() == set()


def test_peers_are_bounded_least_recently_used_first(
    bot: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sessions through the reusable fallback key cost an attacker nothing but a new
    curve key each: the number of peers kept is bounded too."""
    import matrix_crypto.olm as olm_module

    monkeypatch.setattr(olm_module, "MAX_PEERS", 3)
    fallback = next(iter(bot.fallback_keys_for([]).values()))
    assert isinstance(fallback, dict)
    bot.mark_published()
    sessions = OlmSessions()
    peers = [Peer(f"@p{n}:example.org", f"P{n}") for n in range(5)]
    for peer in peers:
        peer.session = peer.account.create_outbound_session(
            vodozemac.Curve25519PublicKey.from_base64(bot.curve25519),
            vodozemac.Curve25519PublicKey.from_base64(str(fallback["key"])),
        )
        decrypt_to_device(bot, sessions, peer.event(bot))
        if peer is peers[2]:
            # peers[0] used again: peers[1], then peers[2], are the least recently used.
            decrypt_to_device(bot, sessions, peers[0].event(bot, content={"again": 1}))
    kept = {p.user_id for p in peers if sessions.has_session(p.curve25519)}
    assert kept == {"@p0:example.org", "@p3:example.org", "@p4:example.org"}
    assert {peer for peer, _ in sessions.removed()} == {peers[1].curve25519, peers[2].curve25519}
