"""Every variable part of a path is one percent-encoded segment (the pure functions)."""

from __future__ import annotations

import doctest
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from matrix_api import paths
from matrix_api.paths import CLIENT_V1, CLIENT_V3, client_path, segment


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        ("!room:example.org", "%21room%3Aexample.org"),
        ("$abc/def+g", "%24abc%2Fdef%2Bg"),
        ("@alice:example.org", "%40alice%3Aexample.org"),
        ("#chat:example.org", "%23chat%3Aexample.org"),
        ("", ""),
        ("a b?c&d=e", "a%20b%3Fc%26d%3De"),
        ("100%", "100%25"),
        ("ключ", "%D0%BA%D0%BB%D1%8E%D1%87"),
        ("m.room.member", "m.room.member"),
    ],
)
def test_a_segment_encodes_everything_that_could_change_the_path(value: str, encoded: str) -> None:
    assert segment(value) == encoded


@given(st.text())
def test_a_segment_is_one_segment_that_decodes_to_the_value(value: str) -> None:
    encoded = segment(value)
    assert unquote(encoded, errors="surrogatepass") == value
    assert "/" not in encoded
    assert encoded not in (".", "..")
    assert encoded.isascii()


def test_client_path_joins_encoded_parts_under_the_prefix() -> None:
    assert (
        client_path(CLIENT_V3, "rooms", "!a:b", "event", "$x/y")
        == "/_matrix/client/v3/rooms/%21a%3Ab/event/%24x%2Fy"
    )
    assert client_path(CLIENT_V1, "rooms", "!s:b", "hierarchy") == (
        "/_matrix/client/v1/rooms/%21s%3Ab/hierarchy"
    )


def test_an_empty_last_part_leaves_a_trailing_slash() -> None:
    assert client_path(CLIENT_V3, "rooms", "!a:b", "state", "m.room.name", "") == (
        "/_matrix/client/v3/rooms/%21a%3Ab/state/m.room.name/"
    )


def test_the_module_doctest_holds() -> None:
    assert doctest.testmod(paths).failed == 0
