"""When and how long to wait before trying again: the project's one backoff.

`Backoff` is pure: it decides, the caller sleeps (under trio, so tests on the mock
clock see exact virtual times). Every layer that retries uses it with its own
parameters; `RetryPolicy` is the Matrix client's, plus which errors are worth a retry.

Which layer retries what (in full, with the arithmetic: docs/retries.md):

- this client: one request, on a network error (any, for an idempotent request; for
  another only when it certainly never arrived), a 429 (waiting its Retry-After), and
  502/503/504 for an idempotent request. 5 attempts, waits up to 0.5, 1, 2, 4 s.
- the bot's backends: a model or webhook request, before the first token arrives.
- the bot's dispatcher: a whole job whose Matrix request failed after this client gave
  up; no attempt limit, waits up to 60 s (nobody can be told while the homeserver
  refuses).
- the bot's sync loop: a failed /sync; no attempt limit, waits up to 60 s.

Retries nest (this client's run inside each of the dispatcher's), so their worst cases
add up and multiply. The longest one request can take here: 5 attempts x 120 s (the
total time of `http.DEFAULT_LIMITS`) + 4 waits x 300 s (a Retry-After at
``max_retry_after``) = 1800 s. The longest before a user is told that their message
failed, with the homeserver taking the notice at this client's last attempt: 300 s of
backend (``BOT_BACKEND_TIMEOUT_S``) + 1800 s = **2100 s**.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from .errors import BadResponse, LimitExceeded, MatrixAPIError, MatrixError, NetworkError

__all__ = ["Backoff", "RetryPolicy"]

# Gateways answer these when the homeserver behind them is restarting or overloaded.
_RETRYABLE_STATUSES = frozenset({502, 503, 504})
# The ceiling stops doubling after 64 failures (any sensible base has long reached
# max_delay): an unbounded exponent overflows a float after 1024 failures in a row,
# which a sync loop waiting about 45 s each time reaches in a 13-hour outage.
_MAX_EXPONENT = 64


@dataclass(frozen=True)
class Backoff:
    """Bounded exponential backoff with equal jitter.

    ``max_attempts`` counts the first try (None: no limit, the caller stops). After
    failed attempt ``n`` (from 0) the wait is drawn from ``[c/2, c]`` with
    ``c = min(max_delay, base_delay * 2**n)``.

    Equal jitter rather than full jitter (``[0, c]``): the point of a wait is to give a
    struggling server relief, and full jitter makes one wait in eight shorter than
    ``c/8``, a near-immediate retry exactly when the server is down. Half the range is
    still random, which is what spreads out the bot's workers that failed together.
    The worst case is ``c`` either way.

    A server's ``retry_after`` is waited exactly, or, with ``floor_retry_after``, never
    less than the backoff (for a loop with no attempt limit, which a server answering
    "retry after 0" must not make spin). One above ``max_retry_after`` is refused: the
    caller gives up with its error.
    """

    max_attempts: int | None
    base_delay: float
    max_delay: float
    max_retry_after: float = 60.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)
    floor_retry_after: bool = False

    def __post_init__(self) -> None:
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts counts the first try: at least 1, or None")
        for name in ("base_delay", "max_delay", "max_retry_after"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number of seconds, at least 0")

    def ceiling(self, attempt: int) -> float:
        """The longest backoff after failed attempt ``attempt`` (0-based)."""
        return min(self.max_delay, self.base_delay * 2.0 ** min(attempt, _MAX_EXPONENT))

    def wait(self, attempt: int) -> float:
        """The jittered backoff after failed attempt ``attempt``, whatever the limit."""
        ceiling = self.ceiling(attempt)
        return self.rng.uniform(ceiling / 2, ceiling)

    def delay(self, attempt: int, *, retry_after: float | None = None) -> float | None:
        """Seconds to wait after failed attempt ``attempt`` (0-based), or None to give up:
        that was the last attempt, or the server asked for more than ``max_retry_after``.

        ``retry_after`` is what the server asked for (a 429's or 503's Retry-After).
        """
        if self.max_attempts is not None and attempt + 1 >= self.max_attempts:
            return None
        if retry_after is None:
            return self.wait(attempt)
        if not retry_after <= self.max_retry_after:  # NaN is refused too
            return None
        retry_after = max(0.0, retry_after)
        return max(retry_after, self.wait(attempt)) if self.floor_retry_after else retry_after

    def longest_waits(self, *, retry_after: bool = True) -> list[float]:
        """The longest wait after each failed attempt but the last, in order: the
        ceiling, or ``max_retry_after`` when the server may ask (``retry_after``).
        Raises ValueError when there is no attempt limit."""
        if self.max_attempts is None:
            raise ValueError("no attempt limit: the waits have no bound")
        return [
            max(self.ceiling(n), self.max_retry_after) if retry_after else self.ceiling(n)
            for n in range(self.max_attempts - 1)
        ]

    def worst_case(self, attempt_s: float, *, retry_after: bool = True) -> float:
        """The longest every attempt can take when each fails: ``max_attempts`` attempts
        of at most ``attempt_s`` seconds, and the longest wait after each but the last."""
        waits = self.longest_waits(retry_after=retry_after)
        return (len(waits) + 1) * attempt_s + sum(waits)


@dataclass(frozen=True)
class RetryPolicy(Backoff):
    """The Matrix client's backoff (`Backoff`), and which errors it retries.

    A 429 waits its ``retry_after`` (or, when the server gave none, the backoff); one
    asking for more than ``max_retry_after`` seconds is not waited for: the error is
    raised so the caller can decide.
    """

    max_attempts: int | None = 5
    base_delay: float = 0.5
    max_delay: float = 30.0
    max_retry_after: float = 300.0

    def delay_for(self, error: MatrixAPIError, attempt: int, *, idempotent: bool) -> float | None:
        """Seconds to wait before the next attempt, or None to give up with ``error``.

        ``idempotent`` says whether sending the request twice is harmless (GET, PUT
        with a transaction id, ...). Otherwise only errors that prove the server did
        not act on it are retried: a 429, or a connection that was never opened.
        """
        if isinstance(error, LimitExceeded):
            return self.delay(attempt, retry_after=error.retry_after)
        if isinstance(error, NetworkError):
            return self.delay(attempt) if idempotent or not error.maybe_processed else None
        # A gateway error may come as a Matrix body or as an HTML page (BadResponse).
        if (
            isinstance(error, MatrixError | BadResponse)
            and error.status in _RETRYABLE_STATUSES
            and idempotent
        ):
            return self.delay(attempt)
        return None
