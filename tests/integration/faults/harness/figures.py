"""How big each scenario is (`Sizes`: `CI` for the tests, `FULL` for the bench) and
what one run shows (`Figures`), counted by `figures` from the rooms as the server has them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from faults.harness.traffic import Sent, order_violations, replies_by_target
from matrix_api.models import RoomEvent, RoomID


@dataclass(frozen=True)
class Sizes:
    """How big each scenario is: `CI` for the tests, `FULL` (the issue's) for the bench."""

    crash_messages: int
    crash_rate: float  # messages per second, over 4 rooms
    outage_messages: int
    outage_rate: float
    outage_s: float
    burst_messages: int  # over 3 rooms, Synapse's default rate limits
    gap_messages: int  # sent while the bot is down, one room
    busy_per_sender: int  # 4 senders, 4 rooms, back to back
    token_messages: int
    token_rate: float
    hostile_rounds: int  # each round spoils one answer of every kind
    graceful_messages: int
    restart_messages: int
    restart_rate: float
    settle_s: float  # how long to keep watching for duplicates once all is answered


CI = Sizes(
    crash_messages=48,
    crash_rate=4.0,
    outage_messages=24,
    outage_rate=1.0,
    outage_s=10.0,
    burst_messages=10,
    gap_messages=120,
    busy_per_sender=25,
    token_messages=24,
    token_rate=2.0,
    hostile_rounds=1,
    graceful_messages=20,
    restart_messages=36,
    restart_rate=2.0,
    settle_s=2.0,
)
FULL = Sizes(
    crash_messages=300,
    crash_rate=10.0,
    outage_messages=90,
    outage_rate=3.0,
    outage_s=12.0,
    burst_messages=60,
    gap_messages=200,
    busy_per_sender=100,
    token_messages=90,
    token_rate=3.0,
    hostile_rounds=3,
    graceful_messages=20,
    restart_messages=180,
    restart_rate=2.0,
    settle_s=5.0,
)


@dataclass
class Figures:
    """What one scenario run shows: the issue's columns, plus notes.

    ``recover_s``: from the end of a fault (the bot started again, the homeserver
    back, the token renewed ...) until every message sent before that moment, and
    the first one sent after it, had its answer; the largest over the run's faults.
    """

    scenario: str
    sent: int = 0
    answered_once: int = 0
    lost: int = 0
    duplicated: int = 0
    recover_s: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict, repr=False)
    """What the tests check beyond the columns; not printed."""

    HEADER = f"{'scenario':<26}{'sent':>6}{'once':>6}{'lost':>6}{'dup':>6}{'recover s':>11}  notes"

    def row(self) -> str:
        recover = "-" if self.recover_s is None else f"{self.recover_s:.1f}"
        notes = ", ".join(f"{key}={value}" for key, value in self.notes.items())
        return (
            f"{self.scenario:<26}{self.sent:>6}{self.answered_once:>6}{self.lost:>6}"
            f"{self.duplicated:>6}{recover:>11}  {notes}"
        )

    def show(self) -> None:
        print(f"\n{self.HEADER}\n{self.row()}", flush=True)


def figures(
    scenario: str,
    sent: Sequence[Sent],
    timelines: dict[RoomID, list[RoomEvent]],
    bot: str,
    *,
    fault_ends: Sequence[float] = (),
    notes: dict[str, Any] | None = None,
) -> Figures:
    """Count, from the rooms as the server has them, how each sent message was answered."""
    replies = replies_by_target(timelines, bot)
    counts = [len(replies.get(s.event_id, [])) for s in sent]
    first_answer = {
        target: min(e.origin_server_ts for e in events) / 1000 for target, events in replies.items()
    }
    recover = None
    for end in fault_ends:
        # Back in service: the backlog answered, and the first message after the fault too.
        backlog = [s for s in sent if s.at < end]
        backlog.extend(next(([s] for s in sent if s.at >= end), []))
        times = [first_answer[s.event_id] for s in backlog if s.event_id in first_answer]
        took = max(0.0, max(times, default=end) - end)
        recover = took if recover is None else max(recover, took)
    stray = sum(
        len(events)
        for target, events in replies.items()
        if target not in {s.event_id for s in sent}
    )
    return Figures(
        scenario,
        sent=len(sent),
        answered_once=sum(1 for c in counts if c == 1),
        lost=sum(1 for c in counts if c == 0),
        duplicated=sum(1 for c in counts if c > 1),
        recover_s=recover,
        notes=dict(notes or {}),
        details={
            "order_violations": order_violations(sent, timelines, bot),
            "replies_to_others": stray,
            "lost_ids": [s.event_id for s, c in zip(sent, counts, strict=True) if c == 0],
        },
    )
