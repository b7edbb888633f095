"""The bot's Prometheus metrics, in one registry per runtime.

Each `BotMetrics` has its own `CollectorRegistry` (never prometheus-client's global
one), so two runtimes in one process, and two tests, count apart. Label values come
from small fixed sets only: outcomes, reason kinds, backend names, endpoint templates
(`endpoint_template`: never a raw path, it holds room and user ids), HTTP status
codes. No room id, user id or event id is ever a label value.

Counted on the message path: a counter increment or a histogram observation per
message, no allocation of label sets that grow. What is a state rather than an event
(inbox depth, chats managed, readiness) is read when scraped (`LiveValues`).
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from matrix_api import LimitExceeded, MatrixAPIError, Request

from .. import __version__
from ..backends.base import BackendError

if TYPE_CHECKING:
    from ..reconcile import ReconcileReport

__all__ = [
    "OUTCOMES",
    "QUARANTINE_REASONS",
    "BotMetrics",
    "LiveValues",
    "endpoint_template",
]

PREFIX = "surfaces"

# A ``*_created`` timestamp beside every counter and histogram would double the
# exposition for nothing a scraper uses (process-wide: the bot is the process).
disable_created_metrics()  # type: ignore[no-untyped-call]

OUTCOMES = ("replied", "notified", "ignored", "failed", "quarantined", "redacted")
"""How a message left the inbox (`bot.store.Outcome`)."""
QUARANTINE_REASONS = (
    "undecodable",  # the event did not decode (`matrix_api.models` skipped it)
    "malformed",  # decoded, but not a message the bot can take (`bot.messages.malformed`)
    "intake_error",  # taking it in raised
    "batch_given_up",  # its /sync batch failed again and again (the sync loop gave it up)
    "handling_error",  # handling it failed, for the last time (`bot.dispatch`)
    "left_unfinished",  # runs of the bot ended while it was in hand, too often
)
"""Why an event was quarantined: a kind, never the recorded reason's text."""

# Seconds; from a user's message to the bot's answer: echo answers in well under a
# second, a model may stream for minutes.
_ANSWER_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_BACKEND_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)

# The literal words of the client-server API's paths the bot uses; any other segment
# (an id, an event type, a transaction id, a state key) is a placeholder.
_PATH_WORDS = frozenset(
    {
        "_matrix", "client", "v1", "v3", "r0", "media",
        "account", "account_data", "changes", "claim", "createRoom", "device_signing",
        "devices", "displayname", "event", "filter", "forget", "hierarchy", "invite",
        "join", "joined_members", "joined_rooms", "keys", "leave", "login", "logout",
        "members", "messages", "profile", "query", "receipt", "redact", "room_keys",
        "rooms", "send", "sendToDevice", "signatures", "state", "sync", "typing",
        "upload", "user", "version", "whoami",
    }
)  # fmt: skip
_MAX_TEMPLATE_SEGMENTS = 10


def endpoint_template(path: str) -> str:
    """``/_matrix/client/v3/rooms/{}/send/{}/{}`` for a request's percent-encoded path:
    known words kept, every other segment a placeholder; a bounded set of values."""
    parts = path.split("/")[1 : _MAX_TEMPLATE_SEGMENTS + 1]
    return "/" + "/".join(part if part in _PATH_WORDS else "{}" for part in parts)


@dataclass(frozen=True, slots=True)
class LiveValues:
    """What is a state rather than an event, read when the metrics are scraped."""

    phase: str
    ready: bool
    healthy: bool
    inbox_depth: int
    oldest_pending_age_s: float | None
    chats: int
    spaces: int
    sync_last_ok_age_s: float | None
    sync_failures_in_row: int
    store_failing: bool


class _Live(Collector):
    def __init__(self, read: Callable[[], LiveValues]) -> None:
        self._read = read

    def describe(self) -> Iterable[Metric]:
        return ()  # collected at scrape time; nothing to check at registration

    def collect(self) -> Iterable[Metric]:
        live = self._read()

        def gauge(name: str, doc: str, value: float | None) -> Metric:
            family = GaugeMetricFamily(f"{PREFIX}_{name}", doc)
            family.add_metric([], float("nan") if value is None else value)
            return family

        phase = GaugeMetricFamily(
            f"{PREFIX}_phase", "The runtime's phase (1 for the current one).", labels=["phase"]
        )
        # "standby": waiting for the store another instance holds; "deposed": lost it.
        for name in (
            "standby",
            "starting",
            "reconciling",
            "ready",
            "draining",
            "stopped",
            "deposed",
        ):
            phase.add_metric([name], 1.0 if live.phase == name else 0.0)
        return [
            phase,
            gauge("ready", "1 when /readyz answers 200.", live.ready),
            gauge("healthy", "1 when /healthz answers 200.", live.healthy),
            gauge("inbox_depth", "Messages and invites waiting in the inbox.", live.inbox_depth),
            gauge(
                "inbox_oldest_pending_age_seconds",
                "Age of the oldest waiting message (server clock); NaN when none waits.",
                live.oldest_pending_age_s,
            ),
            gauge("chats_managed", "Chats the bot manages.", live.chats),
            gauge("spaces_managed", "Spaces the bot manages (one per user).", live.spaces),
            gauge(
                "sync_last_success_age_seconds",
                "Seconds since the sync loop last completed a /sync; NaN before the first.",
                live.sync_last_ok_age_s,
            ),
            gauge(
                "sync_failures_in_row",
                "Failed /sync requests or batches since the last good one.",
                live.sync_failures_in_row,
            ),
            gauge(
                "store_failing",
                "1 when the last store write recorded failed.",
                live.store_failing,
            ),
        ]


class BotMetrics:
    """The metric objects of one runtime, and the few calls that record into them.

    Also the `matrix_api.http.RequestObserver` of the runtime's client: Matrix requests
    by method, endpoint template and status; 429 answers and the time waited on them.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.received = Counter(
            f"{PREFIX}_messages_received",
            "Messages (and invites) taken into the inbox.",
            ["kind"],
            registry=r,
        )
        self.handled = Counter(
            f"{PREFIX}_messages_handled",
            "Messages handled (out of the inbox), by outcome: replied (answered), notified (told "
            "something else), ignored, failed (the backend failed; the user was told), "
            "quarantined.",
            ["outcome"],
            registry=r,
        )
        self.quarantined = Counter(
            f"{PREFIX}_messages_quarantined",
            "Events quarantined at intake or after their last attempt, by reason.",
            ["reason"],
            registry=r,
        )
        self.answer_latency = Histogram(
            f"{PREFIX}_answer_latency_seconds",
            "From a message's origin_server_ts to the backend's answer sent (server clock).",
            ["backend"],
            buckets=_ANSWER_BUCKETS,
            registry=r,
        )
        self.backend_seconds = Histogram(
            f"{PREFIX}_backend_call_seconds",
            "Time one backend call took (answers, failures and timeouts alike).",
            ["backend"],
            buckets=_BACKEND_BUCKETS,
            registry=r,
        )
        self.backend_errors = Counter(
            f"{PREFIX}_backend_errors",
            "Backend calls that gave no answer: error (BackendError), timeout, crash.",
            ["backend", "kind"],
            registry=r,
        )
        self.sync_lag = Histogram(
            f"{PREFIX}_sync_lag_seconds",
            "From a message's origin_server_ts to its commit into the inbox (server clock).",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.syncs = Counter(
            f"{PREFIX}_sync_requests",
            "Long-poll /sync batches fetched and committed.",
            registry=r,
        )
        self.sync_failures = Counter(
            f"{PREFIX}_sync_failures",
            "Failed long-poll /sync requests or batches, by kind.",
            ["kind"],
            registry=r,
        )
        self.matrix_requests = Counter(
            f"{PREFIX}_matrix_requests",
            "Requests to the homeserver (every attempt), by endpoint template and status "
            "('none': no complete answer).",
            ["method", "endpoint", "status"],
            registry=r,
        )
        self.rate_limited = Counter(
            f"{PREFIX}_matrix_rate_limited",
            "429 answers from the homeserver.",
            registry=r,
        )
        self.rate_limit_wait = Counter(
            f"{PREFIX}_matrix_rate_limit_wait_seconds",
            "Time spent waiting out rate limits: by the client before a retry, or by a "
            "job before it runs again.",
            ["layer"],
            registry=r,
        )
        self.reconcile = Gauge(
            f"{PREFIX}_reconcile_last",
            "Counts of the last start-up reconciliation report.",
            ["count"],
            registry=r,
        )
        self.reconcile_seconds = Gauge(
            f"{PREFIX}_reconcile_last_duration_seconds",
            "How long the last start-up reconciliation took.",
            registry=r,
        )
        self.ops_requests = Counter(
            f"{PREFIX}_ops_requests",
            "Requests to this listener, by endpoint and status.",
            ["endpoint", "status"],
            registry=r,
        )
        Info(f"{PREFIX}_build", "The bot's version and its Python.", registry=r).info(
            {
                "version": __version__,
                "python": platform.python_version(),
                "implementation": sys.implementation.name,
            }
        )
        # Children made once: the hot path does no label lookup for these.
        self._received_message = self.received.labels("message")
        self._received_invite = self.received.labels("invite")
        self._handled = {outcome: self.handled.labels(outcome) for outcome in OUTCOMES}
        for reason in QUARANTINE_REASONS:
            self.quarantined.labels(reason)
        self._client_wait = self.rate_limit_wait.labels("client")
        self._job_wait = self.rate_limit_wait.labels("job")
        # Children by label values, looked up without prometheus-client's validation on
        # every call; the keys are bounded (templates, statuses, backends), so are these.
        self._requests: dict[tuple[str, str, int | None], Any] = {}
        self._latency: dict[str, Any] = {}

    def watch(self, read: Callable[[], LiveValues]) -> None:
        """Collect the values ``read`` returns at every scrape (once per registry)."""
        self.registry.register(_Live(read))

    # --- the message path -----------------------------------------------------------

    def took_in(self, kind: str, count: int = 1) -> None:
        (self._received_invite if kind == "invite" else self._received_message).inc(count)

    def finished(self, outcome: str) -> None:
        child = self._handled.get(outcome)
        if child is not None:
            child.inc()

    def quarantine(self, reason: str, count: int = 1) -> None:
        """``reason``: one of `QUARANTINE_REASONS`."""
        self.quarantined.labels(reason).inc(count)

    def answer_sent(self, backend: str, sent_ts_ms: int, now_ms: int | None) -> None:
        if now_ms is None or sent_ts_ms <= 0:
            return
        child = self._latency.get(backend)
        if child is None:
            child = self._latency[backend] = self.answer_latency.labels(backend)
        child.observe(max(0.0, (now_ms - sent_ts_ms) / 1000))

    @contextmanager
    def backend_call(self, backend: str) -> Iterator[None]:
        """Time one backend call; an error (not a cancellation) is counted by kind."""
        started = trio.current_time()
        try:
            yield
        except BackendError:
            self.backend_errors.labels(backend, "error").inc()
            raise
        except trio.TooSlowError:
            self.backend_errors.labels(backend, "timeout").inc()
            raise
        except Exception:  # a crash; a cancellation (not an Exception) is none of these
            self.backend_errors.labels(backend, "crash").inc()
            raise
        finally:
            self.backend_seconds.labels(backend).observe(trio.current_time() - started)

    def sync_committed(self) -> None:
        self.syncs.inc()

    def sync_failed(self, kind: str) -> None:
        self.sync_failures.labels(kind).inc()

    def lag(self, sent_ts_ms: int, now_ms: int | None) -> None:
        if now_ms is not None and sent_ts_ms > 0:
            self.sync_lag.observe(max(0.0, (now_ms - sent_ts_ms) / 1000))

    def job_waits_for_rate_limit(self, delay_s: float) -> None:
        self._job_wait.inc(delay_s)

    def reconciled(self, report: ReconcileReport) -> None:
        for name, value in report.log_fields().items():
            if isinstance(value, int) and name != "duration_ms":
                self.reconcile.labels(name).set(value)
        self.reconcile_seconds.set(report.duration_ms / 1000)

    # --- matrix_api.http.RequestObserver ------------------------------------------------

    def answered(self, request: Request, status: int | None) -> None:
        if status == 429:
            self.rate_limited.inc()
        key = (request.method, endpoint_template(request.path), status)
        child = self._requests.get(key)
        if child is None:
            shown = "none" if status is None else str(status)
            child = self._requests[key] = self.matrix_requests.labels(key[0], key[1], shown)
        child.inc()

    def retry_wait(self, request: Request, error: MatrixAPIError, delay_s: float) -> None:
        if isinstance(error, LimitExceeded):
            self._client_wait.inc(delay_s)
