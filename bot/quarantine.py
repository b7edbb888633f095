"""Quarantine: what the bot does with an event it cannot take in or handle.

Whatever one event does, it costs only itself: it is recorded in the store as
quarantined with a reason (`bot.store.Quarantined`), logged once as
``event_quarantined`` (room, event id, sender, reason: never its content), and the
bot moves on. A reason names what went wrong and where, never the event's text:
an exception's message may quote the content it choked on, so only its type and
the line that raised it are kept.
"""

from __future__ import annotations

import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

__all__ = ["MAX_LOG_LINES_PER_BATCH", "failure_reason", "log_quarantined", "log_quarantined_batch"]

if TYPE_CHECKING:
    from .store import Quarantined

log = structlog.get_logger("bot.quarantine")

# A batch of junk logs this many lines, one per event, and then one line for the rest.
MAX_LOG_LINES_PER_BATCH = 20

_PROJECT_ROOT = Path(__file__).resolve().parent.parent


def failure_reason(error: BaseException, stage: str) -> str:
    """``"<stage> failed: TypeError at bot/messages.py:77"``: what and where, no content."""
    frames = traceback.extract_tb(error.__traceback__)
    where = ""
    if frames:
        last = frames[-1]
        path = Path(last.filename)
        shown = path.relative_to(_PROJECT_ROOT) if path.is_relative_to(_PROJECT_ROOT) else path.name
        where = f" at {shown}:{last.lineno}"
    return f"{stage} failed: {type(error).__name__}{where}"


def log_quarantined(
    room_id: str | None, event_id: str | None, sender: str | None, reason: str
) -> None:
    log.warning(
        "event_quarantined", room_id=room_id, event_id=event_id, sender=sender, reason=reason
    )


def log_quarantined_batch(entries: Sequence[Quarantined]) -> None:
    """One ``event_quarantined`` line per entry, up to `MAX_LOG_LINES_PER_BATCH`."""
    for entry in entries[:MAX_LOG_LINES_PER_BATCH]:
        log_quarantined(entry.room_id, entry.event_id, entry.sender, entry.reason)
    if len(entries) > MAX_LOG_LINES_PER_BATCH:
        log.warning(
            "events_quarantined",
            count=len(entries),
            not_logged_one_by_one=len(entries) - MAX_LOG_LINES_PER_BATCH,
        )
