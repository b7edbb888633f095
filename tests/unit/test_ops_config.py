"""``BOT_HTTP_LISTEN``: off unless set; host:port (IPv6 in brackets), nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.config import ConfigError, load_settings

BASE = {
    "MATRIX_HOMESERVER": "https://hs.example.org",
    "MATRIX_USER_ID": "@bot:example.org",
    "MATRIX_ACCESS_TOKEN": "t",
}


def test_the_listener_is_off_unless_configured() -> None:
    assert load_settings(None, BASE).http_listen is None


@pytest.mark.parametrize(
    ("value", "address"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        (" 127.0.0.1:9464 ", ("127.0.0.1", 9464)),
        ("[::1]:9464", ("::1", 9464)),
        ("localhost:1", ("localhost", 1)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),  # noqa: S104  # the operator's choice
    ],
)
def test_host_and_port(value: str, address: tuple[str, int]) -> None:
    assert load_settings(None, {**BASE, "BOT_HTTP_LISTEN": value}).http_listen == address


@pytest.mark.parametrize(
    "value",
    [
        "9464",
        ":9464",
        "127.0.0.1",
        "127.0.0.1:",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:-1",
        "127.0.0.1:94 64",
        "127.0.0.1:٩٤٦٤",  # Arabic-Indic digits: isdigit() says yes, a port says no
        "::1:9464",  # IPv6 without its brackets: where does the address end?
        "[::1:9464",
        "user@127.0.0.1:9464",
        "http://127.0.0.1:9464",
        "a b:9464",
    ],
)
def test_anything_else_is_a_configuration_error_naming_the_setting(value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(None, {**BASE, "BOT_HTTP_LISTEN": value})
    (problem,) = raised.value.problems
    assert problem.startswith("bot.http_listen (BOT_HTTP_LISTEN): expected host:port")


def test_the_toml_file_takes_it_too(tmp_path: Path) -> None:
    path = tmp_path / "bot.toml"
    path.write_text('[bot]\nhttp_listen = "127.0.0.1:9999"\n')
    assert load_settings(path, BASE).http_listen == ("127.0.0.1", 9999)
