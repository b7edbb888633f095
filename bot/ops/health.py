"""The facts readiness and health are judged by, and the judgements.

The runtime records facts as they happen (`OpsFacts`): the start-up gate, the lanes
and the sync loop started, each completed or failed /sync, each store write that
succeeded or failed. `readiness` and `health` read them at request time and say
yes or no with a JSON-able body that explains why; the HTTP listener, the metrics
and ``python -m bot status`` all show these same facts.

Times are trio's clock (`trio.current_time`), so tests on the mock clock see the
bounds in virtual seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

__all__ = ["SYNC_SLACK_S", "OpsFacts", "Verdict", "health", "readiness"]

# Beyond two long-polls: a long-poll takes up to its timeout, the client's read timeout
# adds to that, and one failed attempt's backoff may come between two good ones.
SYNC_SLACK_S = 30.0


@dataclass(frozen=True, slots=True)
class Verdict:
    """A yes or no, and the JSON body that says why."""

    ok: bool
    body: dict[str, Any]


def _ago(now: float, at: float | None) -> float | None:
    return None if at is None else round(now - at, 3)


@dataclass
class OpsFacts:
    """What the runtime has seen, written by it and read by the endpoints.

    ``phase`` reads the runtime's phase name; ``ready`` is the runtime's start-up gate
    (the same `trio.Event`, set once in the bootstrap). Recording a fact costs an
    attribute write: these are called on the sync loop and on every job.
    """

    ready: trio.Event
    phase: Callable[[], str]
    long_poll_s: float
    lanes_started: bool = False
    sync_started: bool = False
    ready_at: float | None = None
    last_sync_ok_at: float | None = None
    sync_failures_in_row: int = 0
    last_sync_error: str | None = None
    """A bounded kind (``network``, ``matrix``, ``store``, ``batch``), never a message."""
    last_store_ok_at: float | None = None
    last_store_failed_at: float | None = None
    last_store_error: str | None = None
    """The failure's kind (its exception's class name), never its text: it names paths."""
    started_at: float | None = None
    """When the runtime began to run (before the bootstrap)."""

    @property
    def sync_stale_after_s(self) -> float:
        """How long the sync loop may go without a completed /sync and be healthy."""
        return 2 * self.long_poll_s + SYNC_SLACK_S

    def taking_messages(self) -> None:
        """The lanes and the sync loop are running (the runtime's phase is READY)."""
        self.ready_at = trio.current_time()

    def sync_ok(self) -> None:
        self.last_sync_ok_at = trio.current_time()
        self.sync_failures_in_row = 0
        self.last_sync_error = None

    def sync_failed(self, kind: str) -> None:
        self.sync_failures_in_row += 1
        self.last_sync_error = kind

    def store_ok(self) -> None:
        self.last_store_ok_at = trio.current_time()

    def store_failed(self, error: BaseException) -> None:
        self.last_store_failed_at = trio.current_time()
        self.last_store_error = type(error).__name__

    @property
    def store_failing(self) -> bool:
        """The last store write recorded failed (no write has succeeded since)."""
        failed, ok = self.last_store_failed_at, self.last_store_ok_at
        return failed is not None and (ok is None or failed >= ok)


def readiness(facts: OpsFacts, now: float | None = None) -> Verdict:
    """Ready: reconciliation done (the gate set), the lanes and the sync loop running,
    and not stopping."""
    now = trio.current_time() if now is None else now
    phase = facts.phase()
    ok = (
        facts.ready.is_set()
        and facts.lanes_started
        and facts.sync_started
        and facts.ready_at is not None
        and phase == "ready"
    )
    return Verdict(
        ok,
        {
            "ready": ok,
            "phase": phase,
            "gate": facts.ready.is_set(),
            "lanes_started": facts.lanes_started,
            "sync_started": facts.sync_started,
            "uptime_s": _ago(now, facts.started_at),
        },
    )


def health(facts: OpsFacts, now: float | None = None) -> Verdict:
    """Healthy: the last store write recorded succeeded, and, once the bot takes
    messages, the sync loop completed a /sync within `OpsFacts.sync_stale_after_s`.

    Before that (starting, reconciling) only the store is judged: a long
    reconciliation is not a reason to restart the bot; `readiness` says "not yet".
    While draining and after, the sync loop is stopped on purpose.
    """
    now = trio.current_time() if now is None else now
    phase = facts.phase()
    reasons: list[str] = []
    if facts.store_failing:
        reasons.append("store_unwritable")
    since_sync: float | None = None
    if phase == "ready" and facts.ready_at is not None:
        # Until the first long-poll completes, the bound counts from the moment the
        # sync loop started.
        last = facts.last_sync_ok_at if facts.last_sync_ok_at is not None else facts.ready_at
        since_sync = now - last
        if since_sync > facts.sync_stale_after_s:
            reasons.append("sync_stale")
    ok = not reasons
    return Verdict(
        ok,
        {
            "healthy": ok,
            "reason": ", ".join(reasons) if reasons else None,
            "phase": phase,
            "sync": {
                "last_ok_s_ago": _ago(now, facts.last_sync_ok_at),
                "stale_after_s": facts.sync_stale_after_s,
                "failures_in_row": facts.sync_failures_in_row,
                "last_error": facts.last_sync_error,
            },
            "store": {
                "last_write_ok_s_ago": _ago(now, facts.last_store_ok_at),
                "last_failure_s_ago": _ago(now, facts.last_store_failed_at),
                "last_error": facts.last_store_error,
            },
        },
    )
