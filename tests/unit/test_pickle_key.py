"""bot.e2ee.pickle_key: the configured key, or a key file made once, 0600, never half-written."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from bot.e2ee.pickle_key import PickleKeyError, key_file_for, load_pickle_key


def test_a_configured_key_is_used_and_no_file_is_made(tmp_path: Path) -> None:
    store = tmp_path / "bot.sqlite3"
    assert load_pickle_key(b"k" * 32, store) == b"k" * 32
    assert list(tmp_path.iterdir()) == []


def test_the_key_file_is_made_once_0600_and_read_back(tmp_path: Path) -> None:
    store = tmp_path / "bot.sqlite3"
    old = os.umask(0)  # even a permissive umask must not widen it
    try:
        key = load_pickle_key(None, store)
    finally:
        os.umask(old)
    path = key_file_for(store)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(key) == 32
    assert load_pickle_key(None, store) == key
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary left


@pytest.mark.parametrize("content", [b"", b"zz" * 32, b"ab" * 16, b"\xff\xfe"])
def test_a_damaged_key_file_is_refused_without_quoting_it(tmp_path: Path, content: bytes) -> None:
    store = tmp_path / "bot.sqlite3"
    key_file_for(store).write_bytes(content)

    with pytest.raises(PickleKeyError, match="not a key file") as caught:
        load_pickle_key(None, store)
    if content:
        assert content.decode(errors="replace") not in str(caught.value)


def test_an_unwritable_directory_is_a_clear_error(tmp_path: Path) -> None:
    store = tmp_path / "missing" / "bot.sqlite3"
    with pytest.raises(PickleKeyError, match="cannot create the key file"):
        load_pickle_key(None, store)
