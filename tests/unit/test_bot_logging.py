"""bot.logging: one JSON shape for structlog and stdlib lines, httpx kept quiet.

`configure_logging` changes process-wide state (structlog's configuration, the root
logger's handlers and levels); `configured` puts all of it back within the test.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import pytest
import structlog
from structlog.contextvars import bound_contextvars

from bot.logging import configure_logging, log_context

NOISY = ("httpx", "httpcore")


@contextmanager
def configured(
    level: str = "info", log_format: str = "json", stream: io.StringIO | None = None
) -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_noisy = {name: logging.getLogger(name).level for name in NOISY}
    stream = stream if stream is not None else io.StringIO()
    try:
        configure_logging(level, log_format, stream=stream)
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
