"""Canonical JSON (the spec appendix's examples), base64, and signed JSON against hostile input."""

from __future__ import annotations

import json

import pytest
import vodozemac
from hypothesis import given, settings
from hypothesis import strategies as st

from matrix_crypto.canonical import (
    MAX_DEPTH,
    b64decode,
    b64encode,
    canonical_json,
    sign,
    verify,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({}, "{}"),
        ({"one": 1, "two": "Two"}, '{"one":1,"two":"Two"}'),
        ({"b": "2", "a": "1"}, '{"a":"1","b":"2"}'),
        (
            {
                "auth": {
                    "success": True,
                    "mxid": "@john.doe:example.com",
                    "profile": {
                        "display_name": "John Doe",
                        "three_pids": [
                            {"medium": "email", "address": "john.doe@example.org"},
                            {"medium": "msisdn", "address": "123456789"},
                        ],
                    },
                }
            },
            '{"auth":{"mxid":"@john.doe:example.com","profile":{"display_name":"John Doe",'
            '"three_pids":[{"address":"john.doe@example.org","medium":"email"},'
            '{"address":"123456789","medium":"msisdn"}]},"success":true}}',
        ),
        ({"a": "日本語"}, '{"a":"日本語"}'),
        ({"本": 2, "日": 1}, '{"日":1,"本":2}'),
        ({"a": "\u65e5"}, '{"a":"日"}'),
        ({"a": None}, '{"a":null}'),
        ({"a": -0, "b": 10000000000}, '{"a":0,"b":10000000000}'),
        ({"a": '\n\u001f"\\'}, '{"a":"\\n\\u001f\\"\\\\"}'),
        # Sorted by code point, not by UTF-16 unit or locale: U+FFFF before U+10000.
        ({"\U00010000": 1, "\uffff": 2}, '{"\uffff":2,"\U00010000":1}'),
    ],
)
def test_spec_examples(value: object, expected: str) -> None:
    assert canonical_json(value) == expected.encode("utf-8")


@pytest.mark.parametrize(
    "value",
    [
        {"a": 1.0},
        {"a": float("nan")},
        {"a": 2**53},
        {"a": -(2**53)},
        {1: "int key"},
        {"a": b"bytes"},
        {"a": {1, 2}},
        {"a": "\ud800"},  # a lone surrogate is not Unicode text
    ],
)
def test_refuses_what_is_not_canonical(value: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        canonical_json(value)


def test_refuses_deep_nesting_without_recursing_forever() -> None:
    deep: object = "leaf"
    for _ in range(MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(ValueError, match="deeply"):
        canonical_json(deep)


def test_base64_round_trip_unpadded_and_tolerates_padding() -> None:
    for n in range(0, 40):
        data = bytes(range(n))
        text = b64encode(data)
        assert "=" not in text
        assert b64decode(text) == data
        padded = text + "=" * (-len(text) % 4)
        assert b64decode(padded) == data


@pytest.mark.parametrize(
    "text",
    ["a", "ab=c", "abc===", "ab\ncd", "a-b_", "ab cd", "ÿÿÿÿ", None, 12, b"abcd", "abcd=="],
)
def test_base64_refuses_garbage(text: object) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 (one error type for every refusal)
        b64decode(text)


@pytest.fixture
def account() -> vodozemac.Account:
    return vodozemac.Account()


def test_sign_then_verify_and_unsigned_is_not_signed(account: vodozemac.Account) -> None:
    key = account.ed25519_key.to_base64()
    obj = {"user_id": "@bot:hs", "n": 3, "unsigned": {"age": 1}}
    signed = sign(obj, "@bot:hs", "ed25519:DEV", lambda m: account.sign(m).to_base64())
    assert obj == {"user_id": "@bot:hs", "n": 3, "unsigned": {"age": 1}}  # not mutated
    assert verify(signed, "@bot:hs", "ed25519:DEV", key)
    # unsigned may change in transit (the server adds to it); the signature holds.
    assert verify({**signed, "unsigned": {"x": "y"}}, "@bot:hs", "ed25519:DEV", key)
    # The signature survives a JSON round trip (what the peer sees).
    assert verify(json.loads(json.dumps(signed)), "@bot:hs", "ed25519:DEV", key)
    # Any change to the signed part breaks it.
    assert not verify({**signed, "n": 4}, "@bot:hs", "ed25519:DEV", key)
    assert not verify({**signed, "extra": None}, "@bot:hs", "ed25519:DEV", key)


def test_sign_keeps_other_signatures(account: vodozemac.Account) -> None:
    other = vodozemac.Account()
    once = sign({"a": "b"}, "@u:hs", "ed25519:A", lambda m: account.sign(m).to_base64())
    twice = sign(once, "@u:hs", "ed25519:B", lambda m: other.sign(m).to_base64())
    assert verify(twice, "@u:hs", "ed25519:A", account.ed25519_key.to_base64())
    assert verify(twice, "@u:hs", "ed25519:B", other.ed25519_key.to_base64())


def test_verify_refuses_hostile_input_without_raising(account: vodozemac.Account) -> None:
    key = account.ed25519_key.to_base64()
    signed = sign({"a": "b"}, "@u:hs", "ed25519:A", lambda m: account.sign(m).to_base64())
    sig = signed["signatures"]["@u:hs"]["ed25519:A"]  # type: ignore[index]
    other_key = vodozemac.Account().ed25519_key.to_base64()
    deep: object = {}
    for _ in range(10_000):
        deep = {"d": deep}
    cases: list[tuple[object, str, str, object]] = [
        (signed, "@u:hs", "ed25519:A", other_key),  # another key
        (signed, "@v:hs", "ed25519:A", key),  # another user
        (signed, "@u:hs", "ed25519:B", key),  # another key id
        (signed, "@u:hs", "ed25519:A", "not base64!"),
        (signed, "@u:hs", "ed25519:A", key[:-2]),  # truncated key
        (signed, "@u:hs", "ed25519:A", 5),
        ({"a": "b", "signatures": {"@u:hs": {"ed25519:A": sig[:-3]}}}, "@u:hs", "ed25519:A", key),
        ({"a": "b", "signatures": {"@u:hs": {"ed25519:A": 7}}}, "@u:hs", "ed25519:A", key),
        ({"a": "b", "signatures": {"@u:hs": ["x"]}}, "@u:hs", "ed25519:A", key),
        ({"a": "b", "signatures": "x"}, "@u:hs", "ed25519:A", key),
        ({"a": 1.5, "signatures": signed["signatures"]}, "@u:hs", "ed25519:A", key),
        ({"a": deep, "signatures": signed["signatures"]}, "@u:hs", "ed25519:A", key),
        ({"a": "\ud800", "signatures": signed["signatures"]}, "@u:hs", "ed25519:A", key),
        ("a string", "@u:hs", "ed25519:A", key),
        (None, "@u:hs", "ed25519:A", key),
        ([signed], "@u:hs", "ed25519:A", key),
    ]
    for obj, user, key_id, ed in cases:
        assert verify(obj, user, key_id, ed) is False  # type: ignore[arg-type]


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(obj=_json, sigs=_json)
def test_verify_never_raises(obj: object, sigs: object) -> None:
    key = vodozemac.Account().ed25519_key.to_base64()
    if isinstance(obj, dict):
        obj = {**obj, "signatures": sigs}
    assert verify(obj, "@u:hs", "ed25519:A", key) is False
