"""Per-room lanes: each room's jobs in order, no room waiting for another, one job's
failure its own.

A room with work has a lane: a queue and the one task that handles it, strictly in
inbox order, one job at a time. The lane ends when its queue is empty, so a quiet
room costs nothing. Rooms never wait for each other here; what they share (the
backend, the homeserver) is bounded where it is used, by limiters that serve their
waiters in turn (`MessageHandler`, `matrix_api`). Jobs come from the inbox and leave
it only when the handler records them; the lanes hold nothing that is not also in
the store, so stopping at any point is safe.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable
from typing import Protocol

import structlog
import trio

from matrix_api import LimitExceeded, MatrixAPIError, MatrixError, TransportError, UnknownToken
from matrix_api.retry import Backoff

from .ops.health import OpsFacts
from .ops.metrics import BotMetrics
from .quarantine import failure_reason
from .store import InboxItem, StoreUnavailable

__all__ = ["JOB_BACKOFF", "MAX_RESUMPTIONS", "Dispatcher", "JobHandler", "LeftUnfinishedTooOften"]

log = structlog.get_logger("bot.dispatch")

# A job that fails for a reason that may pass (the homeserver is down, a rate limit
# longer than the client waits) is run again after waits of up to 2, 4, ... 60 s, for as
# long as that lasts: while the homeserver refuses, nobody can be told anything, and
# the job must not be lost. A rate limit is waited out (never less than the backoff, so
# "retry after 0" cannot spin), unless it asks for more than an hour: then the job is
# given up. docs/retries.md says what each layer retries.
JOB_BACKOFF = Backoff(
    max_attempts=None,
    base_delay=2.0,
    max_delay=60.0,
    max_retry_after=3600.0,
    floor_retry_after=True,
)
# A job that fails with an unexpected error is given up after this many attempts.
MAX_ATTEMPTS = 3
# Attempts are counted in memory; what survives a restart is how many runs took a
# job up again after an earlier one left it unfinished. A message whose handling
# ends the process (a crash, an out-of-memory kill) would otherwise take the bot
# down at every start. Past this many runs, the job is given up unhandled.
MAX_RESUMPTIONS = 3
# A read receipt marks what was handled without an answer (an ignored message), for
# the user and for bot/intake.py after a store loss. A reply needs none: it points at
# the message it answers, and that marks the message and all before it, both for
# intake and for anyone reading the room. Receipts go out at most this often per room.
RECEIPT_DELAY_S = 5.0


class JobHandler(Protocol):
    async def handle(self, item: InboxItem) -> bool:
        """Handle ``item`` and record the outcome in the store (which removes it
        from the inbox). Raise to have the dispatcher retry or give up.

        Return True when a reply in the room answers ``item``.
        """
        ...

    async def give_up(self, item: InboxItem, error: Exception) -> bool:
        """Quarantine ``item`` after its last attempt, telling the user.

        Return True when a reply in the room answers ``item``.
        """
        ...

    async def mark_read(self, room_id: str, event_id: str) -> None:
        """Everything in ``room_id`` up to ``event_id`` is handled."""
        ...

    async def count_resumption(self, item: InboxItem) -> int:
        """Record that this run takes up ``item``, left unfinished by an earlier run;
        return how many runs have done so, this one included."""
        ...


class LeftUnfinishedTooOften(Exception):
    """A job that more than `MAX_RESUMPTIONS` runs took up again without finishing."""

    def __init__(self, runs: int) -> None:
        super().__init__(
            f"{runs} runs of the bot in a row ended while this was in the inbox; "
            "handling it may be what stops the bot"
        )
        self.runs = runs


class _Outcome(enum.Enum):
    ANSWERED = "answered"  # handled, and a reply points at it
    HANDLED = "handled"  # handled without a reply: it wants a read receipt
    LEFT = "left"  # still in the inbox

    @classmethod
    def of_handled(cls, answered: bool) -> _Outcome:
        """A finished job's outcome, from whether a reply answers it."""
        return cls.ANSWERED if answered else cls.HANDLED


def is_transient(error: Exception) -> bool:
    """Errors that say "not now" rather than "never".

    A rejected token is one: the sync loop logs in again (or stops the bot). A store
    that cannot write (the disk full) is another: the reply may be out, but the job
    stays in the inbox, and the retry's re-sent reply is de-duplicated by the server.
    """
    if isinstance(error, TransportError | LimitExceeded | UnknownToken | StoreUnavailable):
        return True
    return isinstance(error, MatrixError) and error.status >= 500


class Dispatcher:
    """Runs a lane per room with work; owns the lanes' tasks.

    `submit` never blocks (the lanes are in memory and mirror the durable inbox).
    `run` returns when `stop` was called and every lane has finished the job it was
    doing; queued jobs stay in the inbox for the next start.
    """

    def __init__(
        self,
        handler: JobHandler,
        *,
        backoff: Backoff = JOB_BACKOFF,
        facts: OpsFacts | None = None,
        metrics: BotMetrics | None = None,
    ) -> None:
        self._handler = handler
        self._backoff = backoff
        self._facts = facts
        self._metrics = metrics
        self._lanes: dict[str, deque[InboxItem]] = {}
        self._lane_tasks: trio.Nursery | None = None
        self._queued: set[str] = set()
        self._resumed: set[str] = set()
        self._stopping = False
        self._stopped = trio.Event()
        self._unread: dict[str, str] = {}
        self._receipts_due = trio.Event()

    @property
    def busy_rooms(self) -> int:
        """Rooms with a lane: a job in hand or waiting."""
        return len(self._lanes)

    @property
    def pending(self) -> int:
        """Jobs in hand or waiting: the inbox of this run."""
        return len(self._queued)

    def oldest_pending_ts(self) -> int | None:
        """The earliest ``origin_server_ts`` among the waiting messages (invites have
        none); None when no message waits. Reads every lane: for a scrape, not a job."""
        oldest: int | None = None
        for lane in self._lanes.values():
            for item in lane:
                ts = item.event.origin_server_ts
                if item.kind == "message" and ts > 0 and (oldest is None or ts < oldest):
                    oldest = ts
        return oldest

    def submit(self, items: Iterable[InboxItem], *, resumed: bool = False) -> None:
        """Queue ``items``; ``resumed`` when an earlier run left them in the inbox."""
        for item in items:
            if self._stopping or item.event_id in self._queued:
                continue
            self._queued.add(item.event_id)
            if resumed:
                self._resumed.add(item.event_id)
            lane = self._lanes.get(item.room_id)
            if lane is None:
                lane = self._lanes[item.room_id] = deque()
                if self._lane_tasks is not None:
                    self._lane_tasks.start_soon(self._lane, item.room_id, lane)
            lane.append(item)

    def stop(self) -> None:
        """Take no new jobs; lanes finish the job in hand and end."""
        self._stopping = True
        self._stopped.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_receipts_every, RECEIPT_DELAY_S)
            async with trio.open_nursery() as lanes:
                self._lane_tasks = lanes
                for room_id, lane in self._lanes.items():  # submitted before the start
                    lanes.start_soon(self._lane, room_id, lane)
                task_status.started()
                await self._stopped.wait()
            self._lane_tasks = None
            nursery.cancel_scope.cancel()
        # The last receipts, within whatever drain deadline the caller set.
        await self._send_receipts()

    async def _lane(self, room_id: str, lane: deque[InboxItem]) -> None:
        try:
            while lane and not self._stopping:
                item = lane[0]
                outcome = await self._run_job(item)
                lane.popleft()
                self._queued.discard(item.event_id)
                if outcome is _Outcome.ANSWERED:
                    self._unread.pop(room_id, None)
                elif outcome is _Outcome.HANDLED:
                    self._unread[room_id] = item.event_id
                    self._receipts_due.set()
        finally:
            # No checkpoint since the queue was last seen empty: nothing was added
            # that this lane would leave behind. A stopped lane's jobs stay in the inbox.
            del self._lanes[room_id]

    async def _send_receipts_every(self, delay: float) -> None:
        # Receipts are batched: one per room per ``delay`` at most, not one per message.
        while True:
            await self._receipts_due.wait()
            await trio.sleep(delay)
            await self._send_receipts()

    async def _send_receipts(self) -> None:
        self._receipts_due = trio.Event()
        # This flush sends what was unread when it began. Rooms that move on while
        # it is under way wait for the next one: with receipts slower than messages,
        # taking them as they come would keep a flush going with a receipt per message.
        batch, self._unread = self._unread, {}
        try:
            while batch:
                room_id, event_id = batch.popitem()
                try:
                    await self._handler.mark_read(room_id, event_id)
                except MatrixAPIError as exc:
                    log.info("read_receipt_failed", room_id=room_id, error=str(exc))
        finally:
            # A cancelled flush leaves the rest for the next, unless a room has
            # moved on since (its newer event is the one to mark).
            for room_id, event_id in batch.items():
                self._unread.setdefault(room_id, event_id)

    async def _run_job(self, item: InboxItem) -> _Outcome:
        """Handle ``item``, retrying as its errors allow."""
        if item.event_id in self._resumed:
            self._resumed.discard(item.event_id)
            runs = await self._count_resumption(item)
            if runs > MAX_RESUMPTIONS:
                answered = await self._give_up(item, LeftUnfinishedTooOften(runs))
                return _Outcome.of_handled(answered)
        attempt = 0
        while True:
            try:
                answered = await self._handler.handle(item)
            except Exception as exc:  # one job's failure must not stop the worker
                attempt += 1
                delay = self._transient_delay(exc, attempt - 1)
                if self._facts is not None and isinstance(exc, StoreUnavailable):
                    self._facts.store_failed(exc)
                if delay is not None and not self._stopping:
                    log.warning(
                        "job_retry_later",
                        room_id=item.room_id,
                        event_id=item.event_id,
                        error=str(exc),
                        delay_s=round(delay, 3),
                    )
                    if self._metrics is not None and isinstance(exc, LimitExceeded):
                        self._metrics.job_waits_for_rate_limit(delay)
                    await trio.sleep(delay)
                    continue
                if delay is not None:
                    return _Outcome.LEFT  # stopping: the job stays in the inbox
                # The traceback once; a job that fails the same way again says so briefly.
                log.warning(
                    "job_failed",
                    room_id=item.room_id,
                    event_id=item.event_id,
                    attempt=attempt,
                    reason=failure_reason(exc, "handling"),
                    exc_info=attempt == 1,
                )
                if attempt >= MAX_ATTEMPTS or isinstance(exc, MatrixAPIError):
                    answered = await self._give_up(item, exc)
                    return _Outcome.of_handled(answered)
            else:
                if self._facts is not None:
                    self._facts.store_ok()  # a handled job is recorded in the store
                return _Outcome.of_handled(answered)

    def _transient_delay(self, error: Exception, attempt: int) -> float | None:
        """The wait before running a job again after ``error`` (failed attempt
        ``attempt``, from 0), or None when ``error`` is no reason to run it again."""
        if not is_transient(error):
            return None
        retry_after = error.retry_after if isinstance(error, LimitExceeded) else None
        return self._backoff.delay(attempt, retry_after=retry_after)

    async def _count_resumption(self, item: InboxItem) -> int:
        try:
            return await self._handler.count_resumption(item)
        except Exception:
            # Not knowing is no reason to leave a message unanswered: handle it.
            log.exception(
                "job_resumption_not_counted", room_id=item.room_id, event_id=item.event_id
            )
            return 0

    async def _give_up(self, item: InboxItem, error: Exception) -> bool:
        try:
            return await self._handler.give_up(item, error)
        except Exception:
            log.exception("job_give_up_failed", room_id=item.room_id, event_id=item.event_id)
            return False
