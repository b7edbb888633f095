"""bot.logging: one JSON shape for structlog and stdlib lines, httpx kept quiet.

`configure_logging` changes process-wide state (structlog's configuration, the root
logger's handlers and levels); `configured` puts all of it back within the test.
"""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
import structlog
from structlog.contextvars import bound_contextvars

from bot.logging import MESSAGE_EVENTS, configure_logging, log_context

NOISY = ("httpx", "httpcore")


@contextmanager
def configured(
    level: str = "info",
    log_format: str = "json",
    stream: io.StringIO | None = None,
    *,
    log_messages: bool = True,
) -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_noisy = {name: logging.getLogger(name).level for name in NOISY}
    stream = stream if stream is not None else io.StringIO()
    try:
        configure_logging(level, log_format, stream=stream, log_messages=log_messages)
        yield stream
    finally:
        structlog.reset_defaults()
        structlog.contextvars.clear_contextvars()
        for handler in root.handlers:
            if handler not in saved_handlers:
                handler.close()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for name, noisy_level in saved_noisy.items():
            logging.getLogger(name).setLevel(noisy_level)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def assert_recent_utc(timestamp: str) -> None:
    when = datetime.fromisoformat(timestamp)
    assert when.utcoffset() == timedelta(0)
    assert abs(datetime.now(when.tzinfo) - when) < timedelta(minutes=5)


def test_structlog_lines_are_json_with_event_level_timestamp_and_context() -> None:
    with configured() as stream:
        log = structlog.get_logger("bot.test")
        with bound_contextvars(room_id="!r:example.org", event_id="$e"):
            log.info("message_handled", backend="echo", attempt=2)
        log.info("outside")

    first, second = lines(stream)
    assert first == {
        "event": "message_handled",
        "level": "info",
        "logger": "bot.test",
        "timestamp": first["timestamp"],
        "room_id": "!r:example.org",
        "event_id": "$e",
        "backend": "echo",
        "attempt": 2,
    }
    assert_recent_utc(first["timestamp"])
    assert "room_id" not in second  # the context ended with the block


def test_stdlib_lines_come_out_in_the_same_shape() -> None:
    with configured() as stream:
        structlog.get_logger("bot.test").warning("from_structlog")
        with bound_contextvars(room_id="!r:example.org"):
            logging.getLogger("some.library").warning("disk %s is %d%% full", "/data", 97)

    ours, theirs = lines(stream)
    assert theirs == {
        "event": "disk /data is 97% full",
        "level": "warning",
        "logger": "some.library",
        "timestamp": theirs["timestamp"],
        "room_id": "!r:example.org",
    }
    assert_recent_utc(theirs["timestamp"])
    assert set(ours) == {"event", "level", "logger", "timestamp"}


def test_httpx_request_lines_are_suppressed() -> None:
    with configured(level="debug") as stream:
        logging.getLogger("httpx").info('HTTP Request: GET https://hs/_matrix/client/v3/sync "200"')
        logging.getLogger("httpcore.connection").debug("connect_tcp.started host='hs'")
        logging.getLogger("httpx").warning("something httpx worries about")
        structlog.get_logger("bot.test").debug("ours_at_debug")

    assert [(line["logger"], line["event"]) for line in lines(stream)] == [
        ("httpx", "something httpx worries about"),
        ("bot.test", "ours_at_debug"),
    ]


@pytest.mark.parametrize("level", ["warning", "WARNING"])
def test_the_level_applies_to_both_kinds_of_logger(level: str) -> None:
    with configured(level=level) as stream:
        structlog.get_logger("bot.test").info("quiet")
        logging.getLogger("lib").info("quiet too")
        structlog.get_logger("bot.test").error("loud")
        logging.getLogger("lib").warning("loud too")

    assert [line["event"] for line in lines(stream)] == ["loud", "loud too"]


def test_exceptions_are_structured_in_json() -> None:
    with configured() as stream:
        try:
            raise ValueError("bad value")
        except ValueError:
            structlog.get_logger("bot.test").exception("job_failed", event_id="$e")

    [line] = lines(stream)
    assert line["event"] == "job_failed"
    assert line["level"] == "error"
    [frame] = line["exception"]
    assert frame["exc_type"] == "ValueError"
    assert frame["exc_value"] == "bad value"


def test_auto_is_json_when_the_stream_is_not_a_terminal() -> None:
    with configured(log_format="auto") as stream:
        structlog.get_logger("bot.test").info("hello")

    assert lines(stream)[0]["event"] == "hello"


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("log_format", "stream_class"), [("console", io.StringIO), ("auto", FakeTerminal)]
)
def test_the_console_format_is_for_people(log_format: str, stream_class: type[io.StringIO]) -> None:
    with configured(log_format=log_format, stream=stream_class()) as stream:
        structlog.get_logger("bot.test").info("hello_people", room_id="!r:x")

    text = stream.getvalue()
    assert "hello_people" in text
    assert "room_id" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])


def test_configuring_twice_keeps_one_handler() -> None:
    with configured() as stream:
        configure_logging("info", "json", stream=stream)
        logging.getLogger("lib").warning("once")

    assert [line["event"] for line in lines(stream)] == ["once"]


def test_a_logged_traceback_carries_no_local_variables() -> None:
    def fails(access_token: str) -> None:
        raise RuntimeError("refused")

    with configured() as stream:
        try:
            fails("syt_secret_token")
        except RuntimeError:
            structlog.get_logger("bot.test").exception("request_failed")
    (line,) = lines(stream)
    assert line["exception"][0]["exc_type"] == "RuntimeError"
    assert "syt_secret_token" not in stream.getvalue()


@pytest.mark.parametrize("stream_class", [io.StringIO, FakeTerminal])
def test_the_console_colours_only_a_terminal_and_its_tracebacks_carry_no_locals(
    stream_class: type[io.StringIO],
) -> None:
    def fails(access_token: str) -> None:
        raise RuntimeError("refused")

    token = "syt_" + "local" * 3  # built here: the traceback quotes source lines
    with configured(log_format="console", stream=stream_class()) as stream:
        structlog.get_logger("bot.test").warning("hello_people", room_id="!r:x")
        try:
            fails(token)
        except RuntimeError:
            structlog.get_logger("bot.test").exception("request_failed")

    text = stream.getvalue()
    assert ("\x1b[" in text) is stream.isatty()
    assert "RuntimeError: refused" in text
    assert token not in text


def test_a_value_json_cannot_hold_is_logged_as_its_repr() -> None:
    class Opaque:
        def __repr__(self) -> str:
            return "<opaque>"

    with configured() as stream:
        structlog.get_logger("bot.test").info("odd", thing=Opaque(), by_number={1: "one"})
    (line,) = lines(stream)
    assert line["thing"] == "<opaque>"
    assert line["by_number"] == {"1": "one"}


def test_log_context_nests_and_is_undone_even_by_an_error() -> None:
    def handle(log: Any) -> None:
        with log_context(room_id="!r", event_id="$e"):
            with log_context(chat_id="c1"):
                log.info("inner")
            log.info("outer")
            raise RuntimeError

    with configured() as stream:
        log = structlog.get_logger("bot.test")
        with pytest.raises(RuntimeError):
            handle(log)
        log.info("after")
    inner, outer, after = lines(stream)
    assert (inner["room_id"], inner["event_id"], inner["chat_id"]) == ("!r", "$e", "c1")
    assert "chat_id" not in outer
    assert outer["room_id"] == "!r"
    assert not {"room_id", "event_id", "chat_id"} & after.keys()
    for line in (inner, outer, after):
        assert line["timestamp"].endswith("Z")
        assert_recent_utc(line["timestamp"])


def _request_that_fails(token: str) -> None:
    """Fails while a request carrying ``token`` (and its headers) is in its locals, as a
    Matrix call that fails does."""
    headers = {"Authorization": f"Bearer {token}"}
    request = httpx.Request("GET", "https://hs.example.org/_matrix/client/v3/sync", headers=headers)
    raise RuntimeError(f"refused {request.method}")


def _wrapped(token: str) -> None:
    try:
        _request_that_fails(token)
    except RuntimeError as exc:
        raise ValueError("sync failed") from exc


@pytest.mark.parametrize(
    ("log_format", "stream_class"),
    [
        ("console", FakeTerminal),
        ("console", io.StringIO),
        ("auto", FakeTerminal),
        ("json", io.StringIO),
    ],
)
def test_with_rich_installed_no_renderer_prints_a_credential_from_a_frames_locals(
    log_format: str, stream_class: type[io.StringIO]
) -> None:
    # A dev dependency (pyproject.toml): the test means nothing without it.
    import rich  # noqa: F401

    token = "syt_" + "c2VjcmV0" + "_token" * 2  # built here: tracebacks quote source lines
    # structlog's own default would print the locals (and the token) with rich present:
    # the renderer below is what keeps them out.
    assert structlog.dev.default_exception_formatter is structlog.dev.rich_traceback
    default = io.StringIO()
    try:
        _wrapped(token)
    except ValueError:
        structlog.dev.default_exception_formatter(default, sys.exc_info())
    assert token in default.getvalue()

    with configured(log_format=log_format, stream=stream_class()) as stream:
        try:
            _wrapped(token)
        except ValueError as exc:
            structlog.get_logger("bot.test").exception("sync_failed")
            structlog.get_logger("bot.test").error("sync_failed", exc_info=exc)
            logging.getLogger("trio").exception("from_the_standard_library")

    text = stream.getvalue()
    assert token not in text
    assert "c2VjcmV0" not in text
    # The tracebacks are there, chained exception included, only without the locals.
    assert text.count("refused GET") == 3
    assert text.count("sync failed") >= 3
    if log_format == "json":
        for line in lines(stream):
            frames = [f for e in line["exception"] for f in e["frames"]]
            assert frames
            assert not [f for f in frames if "locals" in f]


@pytest.mark.parametrize("level", ["info", "debug"])
def test_per_message_lines_can_be_turned_down_to_debug(level: str) -> None:
    with configured(level=level, log_messages=False) as stream:
        log = structlog.get_logger("bot.test")
        for event in sorted(MESSAGE_EVENTS):
            log.info(event, backend="echo")
        log.info("invite_accepted", room_id="!r")
        log.warning("message_handled", note="a warning under the name stays")
        logging.getLogger("bot.lib").info("message_handled")
    shown = [(line["event"], line["level"]) for line in lines(stream)]
    if level == "info":
        assert shown == [("invite_accepted", "info"), ("message_handled", "warning")]
    else:
        assert shown == [
            *((event, "debug") for event in sorted(MESSAGE_EVENTS)),
            ("invite_accepted", "info"),
            ("message_handled", "warning"),
            ("message_handled", "debug"),
        ]


def test_per_message_lines_are_info_by_default() -> None:
    with configured() as stream:
        structlog.get_logger("bot.test").info("message_handled", backend="echo")
    assert [(line["event"], line["level"]) for line in lines(stream)] == [
        ("message_handled", "info")
    ]


@pytest.mark.parametrize(
    ("value", "expected"), [(None, True), ("false", False), ("no", False), ("true", True)]
)
def test_bot_log_messages_is_read_from_the_environment(value: str | None, expected: bool) -> None:
    from bot.config import load_settings

    environ = {"MATRIX_HOMESERVER": "https://hs.example.org", "MATRIX_USER_ID": "@b:example.org"}
    environ["MATRIX_ACCESS_TOKEN"] = "syt_x"
    if value is not None:
        environ["BOT_LOG_MESSAGES"] = value
    assert load_settings(None, environ).log_messages is expected


def test_a_bot_log_messages_that_is_not_a_flag_is_refused_by_name() -> None:
    from bot.config import ConfigError, load_settings

    environ = {
        "MATRIX_HOMESERVER": "https://hs.example.org",
        "MATRIX_USER_ID": "@b:example.org",
        "MATRIX_ACCESS_TOKEN": "syt_x",
        "BOT_LOG_MESSAGES": "sometimes",
    }
    with pytest.raises(ConfigError, match=r"logging\.messages \(BOT_LOG_MESSAGES\): expected"):
        load_settings(None, environ)
