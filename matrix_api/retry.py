"""When and how long to wait before sending a failed request again.

The policy is pure: it decides, the client sleeps (under trio, so tests on the
mock clock see exact virtual times). Retries are bounded in count and in the longest
single wait; a rate-limit answer waits exactly what the server asked for, never less.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .errors import BadResponse, LimitExceeded, MatrixAPIError, MatrixError, NetworkError

__all__ = ["RetryPolicy"]

# Gateways answer these when the homeserver behind them is restarting or overloaded.
_RETRYABLE_STATUSES = frozenset({502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff with full jitter.

    ``max_attempts`` counts the first try. The n-th backoff (n from 0) is a random
    duration in ``[0, min(max_delay, base_delay * 2**n)]``; a 429 instead waits its
    ``retry_after`` (or, when the server gave none, the backoff). A server asking for
    more than ``max_retry_after`` seconds is not waited for: the error is raised so
    the caller can decide.
    """

    max_attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0
    max_retry_after: float = 300.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def backoff(self, attempt: int) -> float:
        """The jittered wait after failed attempt number ``attempt`` (0-based)."""
        ceiling = min(self.max_delay, self.base_delay * (2**attempt))
        return self.rng.uniform(0, ceiling)

    def delay_for(self, error: MatrixAPIError, attempt: int, *, idempotent: bool) -> float | None:
        """Seconds to wait before the next attempt, or None to give up with ``error``.

        ``idempotent`` says whether sending the request twice is harmless (GET, PUT
        with a transaction id, ...). Otherwise only errors that prove the server did
        not act on it are retried: a 429, or a connection that was never opened.
        """
        if attempt + 1 >= self.max_attempts:
            return None
        if isinstance(error, LimitExceeded):
            if error.retry_after is None:
                return self.backoff(attempt)
            if error.retry_after > self.max_retry_after:
                return None
            return error.retry_after
        if isinstance(error, NetworkError):
            if idempotent or not error.maybe_processed:
                return self.backoff(attempt)
            return None
        # A gateway error may come as a Matrix body or as an HTML page (BadResponse).
        if (
            isinstance(error, MatrixError | BadResponse)
            and error.status in _RETRYABLE_STATUSES
            and idempotent
        ):
            return self.backoff(attempt)
        return None
