"""How long a backend waits before asking again, and when it stops asking.

Pure: it decides, the backend sleeps (under trio, so tests on the mock clock see exact
virtual times). Bounded in attempts and in the longest wait; a rate-limited answer
waits what the server asked for, and one asking for too long is not waited for.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field

from matrix_api.server_clock import seconds_until

__all__ = ["Backoff", "retry_after_from"]


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with equal jitter; ``max_attempts`` counts the first try.

    The n-th wait (n from 0) is in ``[c/2, c]`` with ``c = min(max_delay, base_delay *
    2**n)``: never near zero, so a struggling server gets real relief.
    """

    max_attempts: int = 3
    base_delay: float = 1.0
    max_delay: float = 20.0
    max_retry_after: float = 60.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def delay(self, attempt: int, *, retry_after: float | None = None) -> float | None:
        """Seconds to wait after failed attempt ``attempt`` (0-based), or None to give up.

        ``retry_after`` is what the server asked for (429 or 503 ``Retry-After``): it is
        honoured exactly, unless it exceeds ``max_retry_after``.
        """
        if attempt + 1 >= self.max_attempts:
            return None
        if retry_after is not None:
            return retry_after if retry_after <= self.max_retry_after else None
        ceiling = min(self.max_delay, self.base_delay * (2.0**attempt))
        return ceiling / 2 + self.rng.uniform(0, ceiling / 2)


def retry_after_from(headers: Mapping[str, str]) -> float | None:
    """The wait a response asks for: ``retry-after-ms`` (OpenAI's), or ``Retry-After``
    as delta-seconds or an HTTP date. None when absent or unreadable.

    A date is measured from the response's own ``Date`` (`seconds_until`).
    """
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    date = headers.get("date")
    return seconds_until(
        value.encode("latin-1", "replace"),
        date.encode("latin-1", "replace") if date is not None else None,
    )
