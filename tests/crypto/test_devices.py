"""Device keys from /keys/query: validation against hostile answers, the cache that keeps
the first ed25519 key, and tracked/outdated users."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from matrix_crypto.devices import (
    MAX_DEVICES_PER_USER,
    Device,
    DeviceTracker,
    parse_device_keys,
    parse_keys_query,
)
from matrix_crypto.identity import Identity

ALICE = "@alice:example.org"
BOB = "@bob:example.org"


def _keys(identity: Identity) -> dict[str, Any]:
    return identity.device_keys()


def _device(identity: Identity) -> Device:
    return Device(
        identity.user_id,
        identity.device_id,
        identity.curve25519,
        identity.ed25519,
        ("m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"),
    )


def test_valid_device_keys() -> None:
    alice = Identity.create(ALICE, "A1")
    keys = {**_keys(alice), "unsigned": {"device_display_name": "phone"}}
    assert parse_device_keys(ALICE, "A1", keys) == _device(alice)


def _resign(identity: Identity, obj: dict[str, Any]) -> dict[str, Any]:
    obj = {k: v for k, v in obj.items() if k != "signatures"}
    return identity.sign_json(obj)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda k, i: k.update(user_id=BOB), "differs"),
        (lambda k, i: k.update(device_id="OTHER"), "differs"),
        (lambda k, i: k.pop("keys"), "keys is not"),
        (lambda k, i: k.update(keys=[]), "keys is not"),
        (lambda k, i: k["keys"].pop("curve25519:A1"), "curve25519"),
        (lambda k, i: k["keys"].update({"curve25519:A1": "short"}), "curve25519"),
        (lambda k, i: k["keys"].update({"curve25519:A1": 5}), "curve25519"),
        (lambda k, i: k["keys"].update({"ed25519:A1": "A" * 5000}), "ed25519"),
        (lambda k, i: k["keys"].pop("ed25519:A1"), "ed25519"),
        (lambda k, i: k.update(algorithms="m.olm.v1.curve25519-aes-sha2"), "algorithms"),
        (lambda k, i: k.update(algorithms=[1]), "algorithms"),
        (lambda k, i: k.update(algorithms=["x"] * 1000), "algorithms"),
        (lambda k, i: k.update(signatures={}), "signed"),
        (lambda k, i: k.update(extra="unsigned field"), "signed"),
    ],
)
def test_refused_device_keys(change: Any, reason: str) -> None:
    alice = Identity.create(ALICE, "A1")
    keys = copy.deepcopy(_keys(alice))
    change(keys, alice)
    result = parse_device_keys(ALICE, "A1", keys)
    assert isinstance(result, str)
    assert reason in result


def test_keys_signed_by_another_device_are_refused() -> None:
    alice, mallory = Identity.create(ALICE, "A1"), Identity.create(ALICE, "A1")
    forged = _keys(alice)
    forged["keys"]["curve25519:A1"] = mallory.curve25519  # swap in a key mallory holds
    forged = _resign(mallory, forged)  # signed by mallory, but names alice's ed25519 key
    assert isinstance(parse_device_keys(ALICE, "A1", forged), str)


@pytest.mark.parametrize("obj", [None, [], "x", 5, {}], ids=repr)
def test_not_an_object(obj: object) -> None:
    assert isinstance(parse_device_keys(ALICE, "A1", obj), str)


def test_query_answer_lists_complete_device_lists_and_skips_bad_ones() -> None:
    a1, a2, b1 = (
        Identity.create(ALICE, "A1"),
        Identity.create(ALICE, "A2"),
        Identity.create(BOB, "B1"),
    )
    bad = _keys(a2)
    bad["device_id"] = "A3"
    answer = {
        "device_keys": {
            ALICE: {"A1": _keys(a1), "A3": bad},
            BOB: {"B1": _keys(b1)},
            "@notasked:example.org": {"X": {}},
        },
        "failures": {"other.example": {}},
    }
    outcome = parse_keys_query(answer, [ALICE, BOB, "@carol:other.example"], {})
    assert outcome.devices == {ALICE: {"A1": _device(a1)}, BOB: {"B1": _device(b1)}}
    assert outcome.refused == [(ALICE, "A3", "missing or malformed curve25519 key")]
    assert outcome.unanswered == {"@carol:other.example"}


def test_changed_ed25519_key_is_refused_and_the_known_device_kept() -> None:
    a1, impostor = Identity.create(ALICE, "A1"), Identity.create(ALICE, "A1")
    cached = {ALICE: {"A1": _device(a1)}}
    outcome = parse_keys_query({"device_keys": {ALICE: {"A1": _keys(impostor)}}}, [ALICE], cached)
    assert outcome.refused == [(ALICE, "A1", "ed25519 key changed")]
    assert outcome.devices == {ALICE: {"A1": _device(a1)}}
    # A malformed answer for a known device does not remove it either.
    outcome = parse_keys_query({"device_keys": {ALICE: {"A1": {"junk": 1}}}}, [ALICE], cached)
    assert outcome.devices == {ALICE: {"A1": _device(a1)}}


@pytest.mark.parametrize(
    "answer",
    [
        None,
        [],
        {},
        {"device_keys": []},
        {"device_keys": {ALICE: []}},
        {"device_keys": {ALICE: None}},
    ],
    ids=repr,
)
def test_hostile_query_answers(answer: object) -> None:
    outcome = parse_keys_query(answer, [ALICE], {})
    assert outcome.devices == {}
    assert outcome.unanswered == {ALICE}


def test_too_many_devices_are_cut() -> None:
    alice = Identity.create(ALICE, "A1")
    keys = _keys(alice)
    per_user = {f"D{n}": keys for n in range(MAX_DEVICES_PER_USER + 10)}
    outcome = parse_keys_query({"device_keys": {ALICE: per_user}}, [ALICE], {})
    assert len(outcome.devices[ALICE]) <= MAX_DEVICES_PER_USER
    assert (ALICE, "*", "too many devices") in outcome.refused


def test_tracker_lifecycle() -> None:
    a1, a2 = Identity.create(ALICE, "A1"), Identity.create(ALICE, "A2")
    tracker = DeviceTracker()
    tracker.mark_changed([ALICE])  # not tracked: ignored
    assert tracker.outdated == set()
    tracker.track([ALICE, BOB, 5, ""])  # type: ignore[list-item]
    assert tracker.tracked == {ALICE, BOB}
    assert tracker.outdated == {ALICE, BOB}
    epochs = tracker.epochs([ALICE, BOB])
    tracker.mark_changed([BOB])  # changed while the query is in flight
    outcome = parse_keys_query(
        {"device_keys": {ALICE: {"A1": _keys(a1), "A2": _keys(a2)}, BOB: {}}}, [ALICE, BOB], {}
    )
    tracker.apply_query(outcome, epochs)
    assert tracker.outdated == {BOB}  # the answer predates bob's change
    assert {d.device_id for d in tracker.user_devices(ALICE)} == {"A1", "A2"}
    assert tracker.by_curve25519(ALICE, a2.curve25519) == _device(a2)
    users, puts, deletes = tracker.take_dirty()
    assert users == {ALICE, BOB}
    assert puts == {(ALICE, "A1"), (ALICE, "A2")}
    assert deletes == set()
    # A2 is gone from the next answer: deleted.
    tracker.mark_changed([ALICE])
    epochs = tracker.epochs([ALICE])
    tracker.apply_query(
        parse_keys_query({"device_keys": {ALICE: {"A1": _keys(a1)}}}, [ALICE], tracker.devices),
        epochs,
    )
    users, puts, deletes = tracker.take_dirty()
    assert (users, puts, deletes) == ({ALICE}, set(), {(ALICE, "A2")})
    # Left: forgotten with the devices.
    tracker.forget([ALICE])
    assert ALICE not in tracker.tracked
    assert tracker.user_devices(ALICE) == []
    users, puts, deletes = tracker.take_dirty()
    assert (users, deletes) == ({ALICE}, {(ALICE, "A1")})


def test_answer_for_a_user_who_left_meanwhile_is_dropped() -> None:
    a1 = Identity.create(ALICE, "A1")
    tracker = DeviceTracker()
    tracker.track([ALICE])
    epochs = tracker.epochs([ALICE])
    tracker.forget([ALICE])
    tracker.apply_query(
        parse_keys_query({"device_keys": {ALICE: {"A1": _keys(a1)}}}, [ALICE], {}), epochs
    )
    assert tracker.devices == {}
    assert tracker.tracked == set()
