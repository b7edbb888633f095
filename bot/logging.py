"""structlog set-up: JSON lines when not on a terminal, readable output when on one.

Our own lines take structlog's direct path: a level-filtering bound logger whose
processors render the line and write it to the stream (about 15 us a line, where
the route through the standard library's `logging` cost about 50 us, and a
filtered-out debug call cost 10 us instead of almost nothing). Standard-library
loggers (httpx, trio, sqlite helpers) go through the same processors via
`ProcessorFormatter`, so every line has one shape. httpx logs every request URL at
INFO; it is held at WARNING.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Mapping
from types import MappingProxyType, TracebackType
from typing import Any, TextIO

import msgspec
import structlog
import structlog.tracebacks

__all__ = ["MESSAGE_EVENTS", "configure_logging", "log_context", "merge_log_context"]

MESSAGE_EVENTS = frozenset(
    {
        "message_handled",
        "command_handled",
        "message_ignored",
        "reply_sent",
        "webhook_answer",
        "model_request",
        "model_answer",
    }
)
"""The info lines logged for every message (never its content): what
``BOT_LOG_MESSAGES=false`` turns down to debug."""


def configure_logging(
    level: str = "info",
    log_format: str = "auto",
    stream: TextIO | None = None,
    *,
    log_messages: bool = True,
) -> None:
    """Route structlog and stdlib logging to ``stream`` (stderr by default).

    With ``log_messages`` off, the per-message info lines (`MESSAGE_EVENTS`) are
    debug lines: shown only at level ``debug``.
    """
    stream = stream or sys.stderr
    console = log_format == "console" or (log_format == "auto" and stream.isatty())
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        merge_log_context,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        _add_utc_timestamp,
    ]
    renderer: structlog.types.Processor
    if console:
        renderer = structlog.dev.ConsoleRenderer(
            # Colours only for a terminal: escape codes in a file or a pipe are noise.
            colors=stream.isatty(),
            # Not rich's or better-exceptions' tracebacks (structlog's default when either
            # is installed), which print each frame's local variables: a request's
            # headers, the access token among them.
            exception_formatter=structlog.dev.plain_traceback,
        )
    else:
        # Frames without their local variables: a request's locals hold its headers,
        # the access token among them, and that must never reach a log line.
        shared.append(
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        )
        renderer = structlog.processors.JSONRenderer(serializer=_json_line)

    own = shared[:]
    if not log_messages:
        own.insert(3, _message_lines_at_debug(show=numeric_level <= logging.DEBUG))
    structlog.configure(
        processors=[*own, renderer],
        logger_factory=_LineWriterFactory(stream),
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    if not log_messages:
        handler.addFilter(_StdlibMessageLines(show=numeric_level <= logging.DEBUG))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric_level)
    # httpx and httpcore log each request line (URL included) at INFO / DEBUG.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # psycopg warns of a pipeline it could not close when the connection was cut; the
    # PostgreSQL store already reports that as store_unavailable.
    logging.getLogger("psycopg").setLevel(logging.ERROR)


def _message_lines_at_debug(*, show: bool) -> structlog.types.Processor:
    """A processor that makes the `MESSAGE_EVENTS` info lines debug lines: dropped
    unless ``show`` (the configured level is debug), relabelled when shown."""

    def message_lines_at_debug(
        logger: Any, method_name: str, event_dict: structlog.types.EventDict
    ) -> structlog.types.EventDict:
        if method_name == "info" and event_dict.get("event") in MESSAGE_EVENTS:
            if not show:
                raise structlog.DropEvent
            event_dict["level"] = "debug"
        return event_dict

    return message_lines_at_debug


class _StdlibMessageLines(logging.Filter):
    """`_message_lines_at_debug` for standard-library records (a processor cannot drop
    one: `ProcessorFormatter` does not expect `structlog.DropEvent`)."""

    def __init__(self, *, show: bool) -> None:
        super().__init__()
        self._show = show

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and record.getMessage() in MESSAGE_EVENTS:
            if not self._show:
                return False
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


# What the enclosing `log_context` blocks bind, all in one context variable. structlog's
# `bind_contextvars` sets a variable per field, through a few calls each: a handled
# message's two blocks (three fields) cost about 40,000 instructions that way, and
# 7,000 this way. structlog's own contextvars still work (`merge_contextvars`).
_bound: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "bot_log_context", default=MappingProxyType({})
)


class log_context:
    """Bind fields to every log line within a ``with`` block (and in the tasks it
    starts), like structlog's `bound_contextvars`; an inner block's fields win."""

    __slots__ = ("_token", "_values")

    def __init__(self, **values: Any) -> None:
        self._values = values

    def __enter__(self) -> None:
        outer = _bound.get()
        self._token = _bound.set({**outer, **self._values} if outer else self._values)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        _bound.reset(self._token)


def merge_log_context(
    logger: Any, method_name: str, event_dict: structlog.types.EventDict
) -> structlog.types.EventDict:
    """structlog processor: the fields of the enclosing `log_context` blocks, where
    the log call does not give its own."""
    for key, value in _bound.get().items():
        event_dict.setdefault(key, value)
    return event_dict


class _UtcClock:
    """ISO 8601 UTC timestamps (``2026-11-26T15:55:29.837148Z``), as structlog's
    `TimeStamper(fmt="iso", utc=True)` writes them, with the date and time of day
    formatted once a second rather than on every line."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._prefix}.{int((now - second) * 1_000_000):06d}Z"


_clock = _UtcClock()


def _add_utc_timestamp(
    logger: Any, method_name: str, event_dict: structlog.types.EventDict
) -> structlog.types.EventDict:
    event_dict["timestamp"] = _clock.now()
    return event_dict


_line_encoder = msgspec.json.Encoder(enc_hook=repr)


def _json_line(event_dict: Any, **json_options: Any) -> str:
    """One log record as JSON, by msgspec: a fraction of `json.dumps`'s cost.

    A value msgspec cannot encode becomes its ``repr``, as with structlog's own
    fallback; a record it refuses whole (a key that is not a string, say) takes
    the standard library's path.
    """
    try:
        return _line_encoder.encode(event_dict).decode()
    except (msgspec.EncodeError, TypeError, ValueError):
        return json.dumps(event_dict, **json_options)


class _LineWriter:
    """structlog's final logger: one rendered line per call, written to the stream.

    It carries the name it was created with, for `structlog.stdlib.add_logger_name`.
    """

    def __init__(self, stream: TextIO, name: str) -> None:
        self._stream = stream
        self.name = name

    def msg(self, message: str) -> None:
        self._stream.write(message + "\n")
        self._stream.flush()

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


class _LineWriterFactory:
    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def __call__(self, *args: object) -> _LineWriter:
        # ``structlog.get_logger("bot.x")`` passes the name on.
        return _LineWriter(self._stream, str(args[0]) if args else "")
