"""How long the bot's nested retries can keep a user waiting, from the defaults.

Each layer's backoff is a `matrix_api.retry.Backoff` with its own parameters:
`matrix_api.RetryPolicy` (one Matrix request), `bot.backends.backoff.BACKEND_BACKOFF`
(one model or webhook request), `bot.dispatch.JOB_BACKOFF` (a whole job) and
`bot.runtime.SYNC_BACKOFF` (the sync loop). docs/retries.md writes the rule and the
arithmetic out; its figures are checked against `worst_case_total_delay` by
tests/unit/test_retry.py, so changing a default without the document fails a test.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from matrix_api.http import DEFAULT_LIMITS
from matrix_api.retry import Backoff, RetryPolicy

from .backend_settings.model import ModelSettings
from .backend_settings.webhook import WebhookSettings
from .backends.backoff import BACKEND_BACKOFF
from .config import Settings
from .dispatch import JOB_BACKOFF

__all__ = ["WorstCase", "worst_case_total_delay"]


def _default(cls: type, name: str) -> float:
    """A dataclass field's default, without building one (they have required fields)."""
    default = {f.name: f.default for f in dataclasses.fields(cls)}[name]
    assert isinstance(default, int | float), f"{cls.__name__}.{name} has no number default"
    return float(default)


@dataclass(frozen=True)
class WorstCase:
    """Seconds, each the longest the layer can take while every attempt fails slowly
    and every wait is the longest allowed (a server's Retry-After at its maximum)."""

    request_s: float
    """One Matrix request: every attempt of the client's `RetryPolicy`."""
    backend_s: float
    """Asking the backend: its attempts and waits, cut at ``BOT_BACKEND_TIMEOUT_S``."""
    told_s: float
    """From taking a message up to the user being told it failed: the backend, then the
    request carrying the notice, taken by the homeserver at the client's last attempt."""
    dispatcher_wait_s: float
    """When even that request fails, the dispatcher's longest wait before running the
    job again (another ``told_s``); it does so until the homeserver takes it."""


def worst_case_total_delay(
    *,
    client: RetryPolicy | None = None,
    client_attempt_s: float | None = None,
    backend: Backoff = BACKEND_BACKOFF,
    backend_attempt_s: float | None = None,
    backend_timeout_s: float | None = None,
    dispatcher: Backoff = JOB_BACKOFF,
) -> WorstCase:
    """The worst case of the nested retries; every argument defaults to the bot's
    default, so called bare it gives the figures docs/retries.md states.

    ``client_attempt_s`` is the longest one Matrix attempt can take (the total time
    of `matrix_api.http.DEFAULT_LIMITS`, which bounds a send), ``backend_attempt_s``
    one backend attempt's before the first token (the longer of the model's and the
    webhook's timeouts).
    """
    client = client or RetryPolicy()
    if client_attempt_s is None:
        client_attempt_s = DEFAULT_LIMITS.total_timeout_s
    if backend_attempt_s is None:
        backend_attempt_s = max(
            _default(ModelSettings, "request_timeout_s"), _default(WebhookSettings, "timeout_s")
        )
    if backend_timeout_s is None:
        backend_timeout_s = _default(Settings, "backend_timeout_s")
    request_s = client.worst_case(client_attempt_s)
    backend_s = min(backend_timeout_s, backend.worst_case(backend_attempt_s))
    return WorstCase(
        request_s=request_s,
        backend_s=backend_s,
        told_s=backend_s + request_s,
        dispatcher_wait_s=max(dispatcher.max_delay, dispatcher.max_retry_after),
    )
