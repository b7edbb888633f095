"""The homeserver's clock, read from the ``Date`` header of its answers.

Event timestamps (``origin_server_ts``) are the server's clock. A client comparing
them with its own clock is off by however far the two machines disagree, which
can be seconds or minutes; comparing them with this is not.

``Date`` counts whole seconds, so one answer tells the server's time only to
within a second: its clock read somewhere in ``[Date, Date + 1)`` when it
answered. Each answer gives a lower bound, and the highest bound seen so far is
kept. The first answer after the server's clock turned a second is the one that
tells most, and busy clients see many such answers: the estimate soon comes
within a few milliseconds, and is never ahead of the server.
"""

from __future__ import annotations

import datetime
import email.utils
import time
from collections.abc import Sequence

__all__ = ["ServerClock", "http_date", "seconds_until"]

# A lower bound cannot fall this far below the one kept unless the server's
# clock was set back: start again from it.
_SET_BACK_S = 2.0


def http_date(value: bytes | None) -> float | None:
    """An HTTP date (``Sun, 06 Nov 1994 08:49:37 GMT``) in seconds since the epoch."""
    if value is None:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value.decode("latin-1"))
    except (TypeError, ValueError):
        return None
    # HTTP dates are GMT; one written with ``-0000`` comes back without a zone.
    return (when if when.tzinfo else when.replace(tzinfo=datetime.UTC)).timestamp()


def seconds_until(date: bytes, answered: bytes | None) -> float | None:
    """How long until HTTP date ``date`` (a ``Retry-After``), in seconds, or None
    when it is unreadable.

    Measured from ``answered``, the answer's own ``Date``, when it has a readable
    one: both are the server's clock, so a skew between it and ours does not
    change the wait. From our clock otherwise.
    """
    when = http_date(date)
    if when is None:
        return None
    now = http_date(answered)
    return max(0.0, when - (now if now is not None else time.time()))


class ServerClock:
    """The server's clock as its answers tell it, on this machine's monotonic clock."""

    __slots__ = ("_date", "_offset")

    def __init__(self) -> None:
        self._date: bytes | None = None
        # Server time minus monotonic time, in seconds; None until an answer told.
        self._offset: float | None = None

    def observe(self, headers: Sequence[tuple[bytes, bytes]]) -> None:
        """Learn from an answer's headers, as soon as it has come."""
        date = find_header(headers, b"date")
        if date is None or date == self._date:
            # The same second as the last answer: it tells less than that one did.
            return
        self._date = date
        seconds = http_date(date)
        if seconds is None:
            return
        bound = seconds - time.monotonic()
        offset = self._offset
        if offset is None or bound > offset or bound < offset - _SET_BACK_S:
            self._offset = bound

    def now_ms(self) -> int | None:
        """The server's time now, in milliseconds since the epoch (None: unknown)."""
        if self._offset is None:
            return None
        return int((self._offset + time.monotonic()) * 1000)


def find_header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case) in ``headers``, if any."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None
