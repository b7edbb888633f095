"""``python -m bot`` (bot.__main__.main): exit codes and messages for problems found at start.

None of these reach the network: the configuration is refused first, or the store is.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

import bot.__main__
from bot.__main__ import EXIT_CONFIG, EXIT_STORE, main


@pytest.fixture(autouse=True)
def empty_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("MATRIX_", "BOT_")):
            monkeypatch.delenv(name)


@pytest.fixture
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """For runs that get as far as `configure_logging`: put the process's logging back."""
    # main() logs through a module-level proxy that caches its configuration on first
    # use; a fresh one takes that cache and is thrown away afterwards.
    monkeypatch.setattr(bot.__main__, "log", structlog.get_logger("bot"))
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_noisy = {name: logging.getLogger(name).level for name in ("httpx", "httpcore")}
    yield
    structlog.reset_defaults()
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)
    for name, level in saved_noisy.items():
        logging.getLogger(name).setLevel(level)


def test_an_empty_environment_exits_2_naming_what_is_missing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    root_handlers = logging.getLogger().handlers[:]

    assert main(["run"]) == EXIT_CONFIG == 2

    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("invalid configuration:")
    for variable in (
        "MATRIX_HOMESERVER",
        "MATRIX_USER_ID",
        "MATRIX_ACCESS_TOKEN",
        "MATRIX_PASSWORD",
    ):
        assert variable in err
    assert len(err.strip().splitlines()) == 1 + 3  # the heading and one line per problem
    assert logging.getLogger().handlers == root_handlers  # logging was left alone


def test_every_invalid_variable_is_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MATRIX_HOMESERVER", "https://hs.invalid")
    monkeypatch.setenv("MATRIX_USER_ID", "@bot:hs.invalid")
    monkeypatch.setenv("MATRIX_ACCESS_TOKEN", "syt_secret_token_value")
    monkeypatch.setenv("BOT_MAX_CONCURRENT_ANSWERS", "0")
    monkeypatch.setenv("BOT_LOG_LEVEL", "loud")

    assert main(["run"]) == EXIT_CONFIG

    err = capsys.readouterr().err
    assert "BOT_MAX_CONCURRENT_ANSWERS" in err
    assert "BOT_LOG_LEVEL" in err
    assert "syt_secret_token_value" not in err


def test_a_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere.toml"

    assert main(["run", "--config", str(missing)]) == EXIT_CONFIG

    err = capsys.readouterr().err
    assert f"--config {missing}: no such file" in err


def test_the_config_file_is_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bot.toml"
    config.write_text(
        '[matrix]\nhomeserver = "https://hs.invalid"\n[bot]\nmax_concurrent_answers = 0\n'
    )

    assert main(["run", "--config", str(config)]) == EXIT_CONFIG

    err = capsys.readouterr().err
    assert "MATRIX_HOMESERVER" not in err  # the file gave it
    assert "bot.max_concurrent_answers (BOT_MAX_CONCURRENT_ANSWERS)" in err
    assert "MATRIX_USER_ID" in err


@pytest.mark.parametrize("argv", [[], ["fly"], ["run", "--bogus"]])
def test_bad_arguments_exit_2_via_argparse(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)

    assert caught.value.code == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.usefixtures("restore_logging")
def test_an_unusable_store_exits_3_before_any_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "bot.sqlite3"
    store.write_bytes(b"this is not a database" * 100)
    before = store.read_bytes()
    monkeypatch.setenv("MATRIX_HOMESERVER", "https://hs.invalid")
    monkeypatch.setenv("MATRIX_USER_ID", "@bot:hs.invalid")
    monkeypatch.setenv("MATRIX_ACCESS_TOKEN", "syt_secret_token_value")
    monkeypatch.setenv("BOT_STORE_PATH", str(store))
    monkeypatch.setenv("BOT_LOG_FORMAT", "json")

    assert main(["run"]) == EXIT_STORE == 3

    err = capsys.readouterr().err
    assert "store_unusable" in [json.loads(line)["event"] for line in err.splitlines()]
    assert str(store) in err
    assert "syt_secret_token_value" not in err
    assert store.read_bytes() == before


def test_doctor_prints_its_report_and_no_log_lines(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    restore_logging: None,
    tmp_path: Path,
) -> None:
    import bot.doctor

    async def fake_doctor(settings: object, say: object) -> int:
        structlog.get_logger("bot.test").warning("matrix_request_retry", attempt=1)
        logging.getLogger("lib").warning("a library speaks")
        say("store: 3 chats")  # type: ignore[operator]
        return 0

    monkeypatch.setattr(bot.doctor, "run_doctor", fake_doctor)
    monkeypatch.setenv("MATRIX_HOMESERVER", "https://hs.invalid")
    monkeypatch.setenv("MATRIX_USER_ID", "@bot:hs.invalid")
    monkeypatch.setenv("MATRIX_ACCESS_TOKEN", "t")
    monkeypatch.setenv("BOT_STORE_PATH", str(tmp_path / "s.sqlite3"))

    assert main(["doctor"]) == 0

    out, err = capsys.readouterr()
    assert out == "store: 3 chats\n"
    assert err == ""


def test_bot_log_messages_reaches_the_logging_set_up(monkeypatch: pytest.MonkeyPatch) -> None:
    import bot.__main__ as cli

    seen: list[dict[str, object]] = []
    monkeypatch.setattr(cli, "configure_logging", lambda *a, **kw: seen.append(kw))
    monkeypatch.setattr(cli, "run_service", lambda settings: 0)
    for name, value in {
        "MATRIX_HOMESERVER": "https://hs.example.org",
        "MATRIX_USER_ID": "@b:example.org",
        "MATRIX_ACCESS_TOKEN": "syt_x",
        "BOT_LOG_MESSAGES": "false",
    }.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["run"]) == 0
    assert seen == [{"log_messages": False}]
