"""``python -m bot status``: what the running bot's listener says, for a person.

It reads the same three endpoints a probe and a scraper read (`bot.ops.http`) from the
bot configured on this machine, and prints them as a few lines. The exit code is the
verdict: 0 ready and healthy, 1 not (or no answer), 2 no listener configured.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ..config import Settings

__all__ = ["EXIT_NOT_CONFIGURED", "EXIT_NOT_READY", "EXIT_READY", "Status", "run_status"]

EXIT_READY = 0
EXIT_NOT_READY = 1
EXIT_NOT_CONFIGURED = 2
TIMEOUT_S = 5.0
# An answer larger than this is not our listener's.
_MAX_BODY = 4 * 1024 * 1024

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Status:
    """The listener's three answers (None: that one did not come)."""

    url: str
    ready: dict[str, Any] | None = None
    ready_status: int | None = None
    health: dict[str, Any] | None = None
    health_status: int | None = None
    metrics: Samples = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.ready_status == 200 and self.health_status == 200

    def value(self, name: str, **labels: str) -> float | None:
        return self.metrics.get((name, tuple(sorted(labels.items()))))


def listener_url(address: tuple[str, int]) -> str:
    """Where to reach a listener bound to ``address`` from this machine."""
    host, port = address
    # A listener on every address answers on loopback too.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def read_status(url: str, *, transport: httpx.AsyncBaseTransport | None = None) -> Status:
    """Ask the listener at ``url``; an unreachable or odd listener is `Status.error`."""
    status = Status(url)
    async with httpx.AsyncClient(
        base_url=url, timeout=TIMEOUT_S, trust_env=False, transport=transport
    ) as http:
        try:
            ready = await http.get("/readyz")
            status.ready_status, status.ready = ready.status_code, _json(ready)
            health = await http.get("/healthz")
            status.health_status, status.health = health.status_code, _json(health)
            metrics = await http.get("/metrics")
            if metrics.status_code == 200 and len(metrics.content) <= _MAX_BODY:
                status.metrics = _samples(metrics.text)
        except httpx.HTTPError as exc:
            status.error = f"no answer from {url}: {type(exc).__name__}: {exc}"
        except ValueError as exc:  # not JSON, not the text format: not our listener
            status.error = f"{url} does not answer as the bot's listener does: {exc}"
    return status


def _json(response: httpx.Response) -> dict[str, Any] | None:
    if len(response.content) > _MAX_BODY:
        raise ValueError("answer too large")
    body = json.loads(response.content)
    if not isinstance(body, dict):
        raise ValueError("not a JSON object")
    return body


def _samples(text: str) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


def _object(body: dict[str, Any], key: str) -> dict[str, Any]:
    value = body.get(key)
    return value if isinstance(value, dict) else {}


def _seconds(value: object) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "never"
    return f"{value:.1f} s ago"


def _count(value: float | None) -> str:
    return "?" if value is None or math.isnan(value) else f"{value:g}"


def render(status: Status) -> list[str]:
    """The lines ``python -m bot status`` prints."""
    lines = [f"surfaces-bot listener at {status.url}"]
    if status.error is not None:
        return [*lines, f"  error:    {status.error}"]
    ready, health = status.ready or {}, status.health or {}
    phase = ready.get("phase", "?")
    lines.append(f"  ready:    {'yes' if status.ready_status == 200 else 'no'} (phase {phase})")
    reason = health.get("reason")
    healthy = "yes" if status.health_status == 200 else f"no ({reason or 'no reason given'})"
    lines.append(f"  healthy:  {healthy}")
    sync = _object(health, "sync")
    lines.append(
        f"  sync:     last completed {_seconds(sync.get('last_ok_s_ago'))}, "
        f"{sync.get('failures_in_row', '?')} failures in a row"
        + (f" (last: {sync['last_error']})" if sync.get("last_error") else "")
    )
    store = _object(health, "store")
    lines.append(
        f"  store:    last write ok {_seconds(store.get('last_write_ok_s_ago'))}"
        + (
            f", last failure {_seconds(store.get('last_failure_s_ago'))} "
            f"({store.get('last_error')})"
            if store.get("last_failure_s_ago") is not None
            else ""
        )
    )
    if status.metrics:
        value = status.value
        oldest = value("surfaces_inbox_oldest_pending_age_seconds")
        waiting = _count(value("surfaces_inbox_depth"))
        if oldest is not None and not math.isnan(oldest):
            waiting += f" (oldest {oldest:.1f} s)"
        lines.append(f"  inbox:    {waiting} waiting")
        handled = ", ".join(
            f"{outcome} {_count(value('surfaces_messages_handled_total', outcome=outcome))}"
            for outcome in ("replied", "notified", "ignored", "failed", "quarantined")
        )
        received = _count(value("surfaces_messages_received_total", kind="message"))
        lines.append(f"  messages: received {received}; {handled}")
        lines.append(
            f"  chats:    {_count(value('surfaces_chats_managed'))}, "
            f"Spaces {_count(value('surfaces_spaces_managed'))}"
        )
        limited = _count(value("surfaces_matrix_rate_limited_total"))
        waited = sum(
            value("surfaces_matrix_rate_limit_wait_seconds_total", layer=layer) or 0.0
            for layer in ("client", "job")
        )
        lines.append(f"  matrix:   {limited} rate-limited answers, {waited:.1f} s waited on them")
        versions = [
            dict(labels).get("version")
            for name, labels in status.metrics
            if name == "surfaces_build_info"
        ]
        if versions:
            lines.append(f"  version:  {versions[0]}")
    return lines


async def run_status(
    settings: Settings,
    say: Callable[[str], None],
    *,
    transport: httpx.AsyncBaseTransport | None = None,
) -> int:
    """Print the running bot's status; the exit code (see the module docstring)."""
    if settings.http_listen is None:
        say(
            "The operators' listener is not configured: set BOT_HTTP_LISTEN (bot.http_listen), "
            "e.g. 127.0.0.1:9464, and restart the bot; status reads it."
        )
        return EXIT_NOT_CONFIGURED
    status = await read_status(listener_url(settings.http_listen), transport=transport)
    for line in render(status):
        say(line)
    return EXIT_READY if status.ok else EXIT_NOT_READY
