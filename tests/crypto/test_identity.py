"""Identity: signed device keys, one-time keys topped up from the server's count, the
fallback key, and pickles."""

from __future__ import annotations

import json

import pytest
import vodozemac

from matrix_crypto.canonical import verify
from matrix_crypto.identity import Identity

USER = "@bot:example.org"
DEVICE = "BOTDEVICE"
KEY = bytes(range(32))


@pytest.fixture
def identity() -> Identity:
    return Identity.create(USER, DEVICE)


def _signed_by(identity: Identity, obj: object) -> bool:
    return verify(obj, USER, f"ed25519:{DEVICE}", identity.ed25519)


def test_device_keys_are_self_signed_and_name_both_algorithms(identity: Identity) -> None:
    keys = json.loads(json.dumps(identity.device_keys()))
    assert keys["user_id"] == USER
    assert keys["device_id"] == DEVICE
    assert keys["algorithms"] == ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"]
    assert keys["keys"] == {
        f"curve25519:{DEVICE}": identity.curve25519,
        f"ed25519:{DEVICE}": identity.ed25519,
    }
    assert _signed_by(identity, keys)
    assert not verify(keys, USER, f"ed25519:{DEVICE}", Identity.create(USER, DEVICE).ed25519)


def test_one_time_keys_top_up_to_half_the_maximum(identity: Identity) -> None:
    half = identity.max_one_time_keys // 2
    keys = identity.one_time_keys_for({})
    assert len(keys) == half
    for key_id, body in keys.items():
        assert key_id.startswith("signed_curve25519:")
        assert isinstance(body, dict)
        assert set(body) == {"key", "signatures"}
        assert _signed_by(identity, body)
    # Not yet published: asking again hands out the very same keys (a lost answer).
    assert identity.one_time_keys_for({}) == keys
    identity.mark_published()
    # The server reports what it holds: only the difference is generated.
    assert identity.one_time_keys_for({"signed_curve25519": half}) == {}
    more = identity.one_time_keys_for({"signed_curve25519": half - 3})
    assert len(more) == 3
    assert not set(more) & set(keys)


@pytest.mark.parametrize(
    "count", [-5, "10", None, 2.5, True, [1], 10**30], ids=lambda c: repr(c)[:12]
)
def test_hostile_counts_are_treated_as_zero_or_full(identity: Identity, count: object) -> None:
    keys = identity.one_time_keys_for({"signed_curve25519": count})
    assert len(keys) in (0, identity.max_one_time_keys // 2)


def test_fallback_key_only_when_the_server_has_no_unused_one(identity: Identity) -> None:
    assert identity.fallback_keys_for(None) == {}  # the server did not say: nothing changes
    assert identity.fallback_keys_for(["signed_curve25519"]) == {}
    first = identity.fallback_keys_for([])
    assert len(first) == 1
    ((key_id, body),) = first.items()
    assert key_id.startswith("signed_curve25519:")
    assert isinstance(body, dict)
    assert body["fallback"] is True
    assert _signed_by(identity, body)
    # Unpublished: the same one again, not a second.
    assert identity.fallback_keys_for([]) == first
    identity.mark_published()
    assert identity.fallback_keys_for(["signed_curve25519"]) == {}
    # Used by a peer: the server no longer lists it as unused -> a new one.
    second = identity.fallback_keys_for([])
    assert len(second) == 1
    assert set(second) != set(first)


def test_a_published_fallback_key_can_still_start_sessions(identity: Identity) -> None:
    body = next(iter(identity.fallback_keys_for([]).values()))
    assert isinstance(body, dict)
    identity.mark_published()
    peer = vodozemac.Account()
    key = vodozemac.Curve25519PublicKey.from_base64(str(body["key"]))
    session = peer.create_outbound_session(
        vodozemac.Curve25519PublicKey.from_base64(identity.curve25519), key
    )
    message = session.encrypt(b"hello").to_pre_key()
    assert message is not None
    _, plaintext = identity.account.create_inbound_session(peer.curve25519_key, message)
    assert plaintext == b"hello"


def test_pickle_round_trip_keeps_keys_and_unpublished_state(identity: Identity) -> None:
    keys = identity.one_time_keys_for({})
    pickle = identity.pickle(KEY)
    assert identity.ed25519 not in pickle
    assert identity.curve25519 not in pickle
    restored = Identity.from_pickle(USER, DEVICE, pickle, KEY)
    assert (restored.ed25519, restored.curve25519) == (identity.ed25519, identity.curve25519)
    assert restored.one_time_keys_for({}) == keys  # deterministic: the same upload again
    assert restored.device_keys() == identity.device_keys()


def test_pickle_refuses_wrong_or_short_key(identity: Identity) -> None:
    pickle = identity.pickle(KEY)
    with pytest.raises(ValueError):  # noqa: PT011 (vodozemac's PickleException)
        Identity.from_pickle(USER, DEVICE, pickle, bytes(32))
    with pytest.raises(ValueError, match="32 bytes"):
        Identity.from_pickle(USER, DEVICE, pickle, KEY[:31])
    with pytest.raises(ValueError, match="32 bytes"):
        identity.pickle(b"short")
    with pytest.raises(ValueError):  # noqa: PT011
        Identity.from_pickle(USER, DEVICE, pickle[:-10], KEY)
