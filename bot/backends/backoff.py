"""What is particular to a backend's retries: its backoff parameters, and reading the
wait a model server or a webhook asks for.

The backoff itself is the project's one `matrix_api.retry.Backoff` (docs/retries.md
says which layer retries what). A backend retries only before the first token of an
answer arrived (nothing was shown to the user yet), within ``BOT_BACKEND_TIMEOUT_S``.
"""

from __future__ import annotations

from collections.abc import Mapping

# Re-exported: whoever configures a backend's backoff (a test, a caller) finds it here.
from matrix_api.retry import Backoff
from matrix_api.server_clock import seconds_until

__all__ = ["BACKEND_BACKOFF", "Backoff", "retry_after_from"]

# 3 attempts, waits up to 1 and 2 s; a server asking for more than a minute is not
# waited for (the user is told to try again in that long).
BACKEND_BACKOFF = Backoff(max_attempts=3, base_delay=1.0, max_delay=20.0, max_retry_after=60.0)


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
