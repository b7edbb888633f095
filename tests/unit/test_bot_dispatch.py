"""bot.dispatch: per-room order, rooms in parallel, retries, isolation and stopping.

Every test runs under trio's autojump clock: the handler "works" by sleeping, and the
times it records are exact.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from bot.dispatch import (
    JOB_BACKOFF,
    MAX_ATTEMPTS,
    MAX_RESUMPTIONS,
    RECEIPT_DELAY_S,
    Dispatcher,
    LeftUnfinishedTooOften,
    is_transient,
)
from bot.store import InboxItem, StoreUnavailable
from matrix_api import (
    BadResponse,
    Forbidden,
    LimitExceeded,
    MatrixError,
    NetworkError,
    NotFound,
    UnknownToken,
)
from matrix_api.models import EventID, RoomEvent, RoomID, UserID
from matrix_api.retry import Backoff


class Edge(random.Random):
    """An rng that always draws the top (or the bottom) of a range: exact backoffs."""

    def __init__(self, *, top: bool) -> None:
        super().__init__(0)
        self.top = top

    def random(self) -> float:
        return 1.0 if self.top else 0.0


LONGEST = dataclasses.replace(JOB_BACKOFF, rng=Edge(top=True))
SHORTEST = dataclasses.replace(JOB_BACKOFF, rng=Edge(top=False))


def item(seq: int, room_id: str, event_id: str | None = None) -> InboxItem:
    eid = EventID(event_id or f"$e{seq}")
    event = RoomEvent(
        type="m.room.message",
        event_id=eid,
        sender=UserID("@alice:example.org"),
        origin_server_ts=seq,
        content={"msgtype": "m.text", "body": str(seq)},
    )
    return InboxItem(seq, eid, RoomID(room_id), "message", event)


@dataclass
class Handler:
    """A JobHandler that sleeps ``durations`` (default ``duration``) and fails as scripted.

    ``failures[event_id]`` is the exceptions to raise at successive attempts (after the
    sleep); ``None`` or a used-up list means success. ``forever`` makes one always fail.
    The events in ``answered`` are answered by a reply; the others are handled without.
    ``resumptions`` holds the runs that took an event up again before this one.
    """

    duration: float = 1.0
    durations: dict[str, float] = field(default_factory=dict)
    failures: dict[str, list[Exception | None]] = field(default_factory=dict)
    forever: dict[str, Exception] = field(default_factory=dict)
    give_up_error: Exception | None = None
    mark_read_error: Exception | None = None
    mark_read_duration: float = 0.0
    answered: set[str] = field(default_factory=set)
    resumptions: dict[str, int] = field(default_factory=dict)
    count_error: Exception | None = None

    attempts: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    done: list[tuple[str, str, float, float]] = field(default_factory=list)
    failed: list[tuple[str, float]] = field(default_factory=list)
    gave_up: list[tuple[str, Exception]] = field(default_factory=list)
    read: list[tuple[str, str]] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)

    def _poke(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def handle(self, item: InboxItem) -> bool:
        start = trio.current_time()
        self.attempts[item.event_id].append(start)
        self._poke()
        await trio.sleep(self.durations.get(item.event_id, self.duration))
        error: Exception | None = self.forever.get(item.event_id)
        script = self.failures.get(item.event_id)
        if error is None and script:
            error = script.pop(0)
        if error is not None:
            self.failed.append((item.event_id, trio.current_time()))
            self._poke()
            raise error
        self.done.append((item.room_id, item.event_id, start, trio.current_time()))
        self._poke()
        return item.event_id in self.answered

    async def give_up(self, item: InboxItem, error: Exception) -> bool:
        self.gave_up.append((item.event_id, error))
        self._poke()
        if self.give_up_error is not None:
            raise self.give_up_error
        return item.event_id in self.answered

    async def count_resumption(self, item: InboxItem) -> int:
        if self.count_error is not None:
            raise self.count_error
        self.resumptions[item.event_id] = self.resumptions.get(item.event_id, 0) + 1
        return self.resumptions[item.event_id]

    async def mark_read(self, room_id: str, event_id: str) -> None:
        await trio.sleep(self.mark_read_duration)
        self.read.append((room_id, event_id))
        self._poke()
        if self.mark_read_error is not None:
            raise self.mark_read_error

    def done_ids(self, room_id: str | None = None) -> list[str]:
        return [eid for room, eid, _, _ in self.done if room_id is None or room == room_id]

    async def until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self.changed.wait()


async def run_until(
    handler: Handler,
    items: Sequence[InboxItem],
    condition: Callable[[], bool],
    then: Callable[[Dispatcher], Awaitable[None]] | None = None,
    *,
    resumed: Sequence[InboxItem] = (),
    backoff: Backoff = LONGEST,
) -> Dispatcher:
    """Run a dispatcher over ``items`` until ``condition`` holds, then stop it.

    The ``resumed`` items go first, as ones an earlier run left in the inbox. Every
    backoff is its longest unless ``backoff`` says otherwise.
    """
    dispatcher = Dispatcher(handler, backoff=backoff)
    async with trio.open_nursery() as nursery:
        await nursery.start(dispatcher.run)
        dispatcher.submit(resumed, resumed=True)
        dispatcher.submit(items)
        await handler.until(condition)
        if then is not None:
            await then(dispatcher)
        dispatcher.stop()
    return dispatcher


def idle(seconds: float) -> Callable[[Dispatcher], Awaitable[None]]:
    """A ``then`` for `run_until`: let the dispatcher run on a while before stopping."""

    async def wait(dispatcher: Dispatcher) -> None:
        await trio.sleep(seconds)

    return wait


def room_ids(count: int) -> list[str]:
    return [f"!room{index}:example.org" for index in range(count)]


def assert_in_order_without_overlap(handler: Handler, items: Sequence[InboxItem]) -> None:
    by_room: dict[str, list[InboxItem]] = defaultdict(list)
    for it in items:
        by_room[it.room_id].append(it)
    runs = {eid: (start, end) for _, eid, start, end in handler.done}
    for room, room_items in by_room.items():
        expected = [it.event_id for it in sorted(room_items, key=lambda i: i.seq)]
        assert handler.done_ids(room) == expected, room
        for earlier, later in itertools.pairwise(expected):
            assert runs[later][0] >= runs[earlier][1], (room, earlier, later)


# --- order and parallelism -------------------------------------------------------------------


async def test_rooms_run_in_parallel_each_in_order(autojump_clock: trio.abc.Clock) -> None:
    handler = Handler(duration=1.0)
    a, b, c = room_ids(3)
    items = [item(seq, room) for seq, room in enumerate([a, b, c, a, b, c, a, b, c])]

    t0 = trio.current_time()
    await run_until(handler, items, lambda: len(handler.done) == 9)

    assert_in_order_without_overlap(handler, items)
    assert trio.current_time() - t0 == 3.0  # three rooms side by side, not nine jobs in a row
    firsts = {room: min(s for r, _, s, _ in handler.done if r == room) for room in (a, b, c)}
    assert set(firsts.values()) == {t0}


async def test_many_rooms_keep_their_order(autojump_clock: trio.abc.Clock) -> None:
    rng = random.Random(7)
    rooms = [f"!r{i}:example.org" for i in range(7)]
    items = [item(seq, rng.choice(rooms)) for seq in range(60)]
    handler = Handler(durations={it.event_id: rng.choice([0.1, 0.5, 2.0]) for it in items})

    await run_until(handler, items, lambda: len(handler.done) == 60)

    assert_in_order_without_overlap(handler, items)


async def test_items_submitted_later_still_queue_behind_their_room(
    autojump_clock: trio.abc.Clock,
) -> None:
    handler = Handler(duration=5.0)

    async def submit_more(dispatcher: Dispatcher) -> None:
        dispatcher.submit([item(2, "!a:x"), item(3, "!a:x")])
        await handler.until(lambda: len(handler.done) == 3)

    items = [item(1, "!a:x")]
    await run_until(handler, items, lambda: bool(handler.attempts), then=submit_more)

    assert_in_order_without_overlap(handler, [*items, item(2, "!a:x"), item(3, "!a:x")])


async def test_an_item_already_queued_is_not_queued_twice(
    autojump_clock: trio.abc.Clock,
) -> None:
    handler = Handler()
    items = [item(1, "!a:x"), item(2, "!a:x"), item(2, "!a:x"), item(1, "!a:x")]

    await run_until(handler, items, lambda: len(handler.done) == 2, then=idle(10))

    assert handler.done_ids() == ["$e1", "$e2"]


async def test_read_receipts_are_batched_per_room(autojump_clock: trio.abc.Clock) -> None:
    handler = Handler(duration=1.0)
    a, b = room_ids(2)
    items = [item(seq, room) for seq, room in enumerate([a, b] * 6)]

    await run_until(handler, items, lambda: len(handler.done) == 12)

    for room in (a, b):
        receipts = [eid for r, eid in handler.read if r == room]
        finished = handler.done_ids(room)
        assert receipts, room
        assert receipts[-1] == finished[-1]  # the last one is sent, at the latest at stop
        assert receipts == [eid for eid in finished if eid in receipts]  # in room order
        assert len(receipts) < len(finished)  # not one per message


async def test_a_slow_flush_sends_each_room_once(autojump_clock: trio.abc.Clock) -> None:
    # Receipts slower than messages: while one room's receipt is on its way, the
    # others move on. They wait for the next flush instead of joining this one.
    handler = Handler(duration=0.25, mark_read_duration=0.5)
    rooms = room_ids(2)
    items = [item(seq, room) for seq, room in enumerate(rooms * 80)]

    t0 = trio.current_time()
    await run_until(handler, items, lambda: len(handler.done) == len(items))

    elapsed = trio.current_time() - t0
    flushes = math.ceil(elapsed / RECEIPT_DELAY_S) + 1  # the last one at stop
    for room in rooms:
        receipts = [eid for r, eid in handler.read if r == room]
        assert receipts[-1] == handler.done_ids(room)[-1]
        assert len(receipts) <= flushes, (room, len(receipts), flushes)


async def test_the_last_receipts_are_sent_at_stop(autojump_clock: trio.abc.Clock) -> None:
    handler = Handler(duration=1.0)
    t0 = trio.current_time()

    await run_until(handler, [item(1, "!a:x")], lambda: bool(handler.done))

    assert handler.read == [("!a:x", "$e1")]
    assert trio.current_time() - t0 == 1.0  # stopping did not wait for the batch delay


async def test_a_message_answered_by_a_reply_gets_no_receipt(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The reply marks its message (and all before it) for bot/intake.py and for users.
    handler = Handler(duration=1.0, answered={"$e1", "$e2", "$e4"})
    items = [item(1, "!a:x"), item(2, "!a:x"), item(3, "!b:x"), item(4, "!b:x")]

    await run_until(handler, items, lambda: len(handler.done) == 4, then=idle(30))

    # !b:x's ignored $e3 is covered by the reply to $e4, which came after it.
    assert handler.read == []


async def test_a_message_handled_without_reply_after_the_last_reply_gets_a_receipt(
    autojump_clock: trio.abc.Clock,
) -> None:
    handler = Handler(duration=1.0, answered={"$e1", "$e3"})
    items = [item(1, "!a:x"), item(2, "!a:x"), item(3, "!a:x"), item(4, "!a:x")]

    await run_until(handler, items, lambda: len(handler.done) == 4, then=idle(30))

    assert handler.read == [("!a:x", "$e4")]


async def test_a_job_given_up_with_a_notice_gets_no_receipt(
    autojump_clock: trio.abc.Clock,
) -> None:
    handler = Handler(
        duration=1.0,
        forever={
            "$e1": Forbidden(403, "M_FORBIDDEN", "no"),
            "$e2": Forbidden(403, "M_FORBIDDEN", "no"),
        },
        answered={"$e1"},
    )
    items = [item(1, "!a:x"), item(2, "!b:x")]

    await run_until(handler, items, lambda: len(handler.gave_up) == 2, then=idle(30))

    # $e1's failure notice answers it; $e2's could not be sent.
    assert handler.read == [("!b:x", "$e2")]


async def test_a_failed_read_receipt_is_not_fatal(autojump_clock: trio.abc.Clock) -> None:
    handler = Handler(mark_read_error=NetworkError("reset", maybe_processed=True))

    async def more(dispatcher: Dispatcher) -> None:
        dispatcher.submit([item(2, "!a:x")])
        await handler.until(lambda: len(handler.read) == 2)

    with capture_logs() as logs:
        await run_until(handler, [item(1, "!a:x")], lambda: bool(handler.read), then=more)

    assert handler.done_ids() == ["$e1", "$e2"]
    assert "read_receipt_failed" in [entry["event"] for entry in logs]


async def test_a_rate_limit_is_retried_no_sooner_than_the_server_asked(
    autojump_clock: trio.abc.Clock,
) -> None:
    limited = LimitExceeded(429, "M_LIMIT_EXCEEDED", "slow down", retry_after=120.0)
    handler = Handler(duration=0.0, failures={"$e1": [limited]})

    await run_until(handler, [item(1, "!a:x")], lambda: bool(handler.read))

    first, second = handler.attempts["$e1"]
    assert second - first == 120.0
    assert handler.done_ids() == ["$e1"]


@pytest.mark.parametrize("retry_after", [0.0, -5.0, 0.5])
async def test_a_rate_limit_shorter_than_the_backoff_waits_the_backoff(
    autojump_clock: trio.abc.Clock, retry_after: float
) -> None:
    # The client already waited the server out: an outer loop with no attempt limit
    # must not spin on "retry after 0".
    limited = LimitExceeded(429, "M_LIMIT_EXCEEDED", "slow down", retry_after=retry_after)
    handler = Handler(duration=0.0, failures={"$e1": [limited] * 3})

    await run_until(handler, [item(1, "!a:x")], lambda: bool(handler.done), backoff=SHORTEST)

    times = handler.attempts["$e1"]
    assert [b - a for a, b in itertools.pairwise(times)] == [1.0, 2.0, 4.0]


@pytest.mark.parametrize("retry_after", [3600.5, math.inf, math.nan])
async def test_a_rate_limit_longer_than_an_hour_gives_the_job_up(
    autojump_clock: trio.abc.Clock, retry_after: float
) -> None:
    limited = LimitExceeded(429, "M_LIMIT_EXCEEDED", "slow down", retry_after=retry_after)
    handler = Handler(duration=0.0, failures={"$e1": [limited]})
    t0 = trio.current_time()

    with capture_logs() as logs:
        await run_until(handler, [item(1, "!a:x")], lambda: bool(handler.gave_up))

    assert trio.current_time() == t0
    assert handler.attempts["$e1"] == [t0]
    assert handler.gave_up == [("$e1", limited)]
    assert "job_retry_later" not in [entry["event"] for entry in logs]


# --- retries -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        NetworkError("connection reset", maybe_processed=True),
        BadResponse("HTML from a proxy", status=502),
        LimitExceeded(429, "M_LIMIT_EXCEEDED", "slow down", retry_after=1.5),
        MatrixError(503, "M_UNKNOWN", "overloaded"),
        UnknownToken(401, "M_UNKNOWN_TOKEN", "soft logout", {"soft_logout": True}),
        StoreUnavailable("store.sqlite3: database or disk is full"),
    ],
    ids=type,
)
async def test_a_transient_error_is_retried_after_a_backoff(
    autojump_clock: trio.abc.Clock, error: Exception
) -> None:
    assert is_transient(error)
    handler = Handler(duration=0.0, failures={"$e1": [error]})

    with capture_logs() as logs:
        await run_until(handler, [item(1, "!a:x")], lambda: bool(handler.read))

    first, second = handler.attempts["$e1"]
    # The longest first backoff (`LONGEST`), also for the rate limit's 1.5 s.
    assert second - first == 2.0
    assert handler.done_ids() == ["$e1"]
    assert handler.gave_up == []
    assert [entry["event"] for entry in logs if entry["log_level"] == "warning"] == [
        "job_retry_later"
    ]


async def test_the_backoff_grows_and_is_capped(autojump_clock: trio.abc.Clock) -> None:
    network = NetworkError("down", maybe_processed=False)
    handler = Handler(duration=0.0, failures={"$e1": [network] * 8})

    await run_until(handler, [item(1, "!a:x")], lambda: bool(handler.done))

    times = handler.attempts["$e1"]
    assert [b - a for a, b in itertools.pairwise(times)] == [
        2.0,
        4.0,
        8.0,
        16.0,
        32.0,
        60.0,
        60.0,
        60.0,
    ]
    assert handler.gave_up == []


async def test_the_shortest_backoff_is_half_the_longest(autojump_clock: trio.abc.Clock) -> None:
    network = NetworkError("down", maybe_processed=False)
    handler = Handler(duration=0.0, failures={"$e1": [network] * 7})

    await run_until(handler, [item(1, "!a:x")], lambda: bool(handler.done), backoff=SHORTEST)

    times = handler.attempts["$e1"]
    assert [b - a for a, b in itertools.pairwise(times)] == [1, 2, 4, 8, 16, 30, 30]


async def test_the_default_backoff_is_jittered_within_its_bounds(
    autojump_clock: trio.abc.Clock,
) -> None:
    # Four rooms fail together (the homeserver restarting): their
    # retries spread out instead of arriving at the same instant.
    network = NetworkError("down", maybe_processed=False)
    rooms = [f"!room{n}:x" for n in range(40)]
    handler = Handler(duration=0.0, failures={f"$e{n}": [network] * 3 for n in range(40)})
    items = [item(n, room) for n, room in enumerate(rooms)]
    backoff = dataclasses.replace(JOB_BACKOFF, rng=random.Random(5))

    await run_until(handler, items, lambda: len(handler.done) == 40, backoff=backoff)

    waits = [[b - a for a, b in itertools.pairwise(handler.attempts[f"$e{n}"])] for n in range(40)]
    for per_job in waits:
        assert [1 <= per_job[0] <= 2, 2 <= per_job[1] <= 4, 4 <= per_job[2] <= 8] == [True] * 3
    assert len({round(per_job[0], 6) for per_job in waits}) == 40


async def test_an_unexpected_error_is_given_up_after_max_attempts(
    autojump_clock: trio.abc.Clock,
) -> None:
    boom = ValueError("bug in a backend")
    handler = Handler(forever={"$e1": boom})

    with capture_logs() as logs:
        # Nothing more happens to it once given up.
        await run_until(handler, [item(1, "!a:x")], lambda: bool(handler.gave_up), idle(100))

    assert len(handler.attempts["$e1"]) == MAX_ATTEMPTS
    assert handler.gave_up == [("$e1", boom)]
    failed = [e for e in logs if e["event"] == "job_failed"]
    assert [e["attempt"] for e in failed] == list(range(1, MAX_ATTEMPTS + 1))
    # The traceback once, not once per attempt; the reason names the error, not its text.
    assert [bool(e["exc_info"]) for e in failed] == [True] + [False] * (MAX_ATTEMPTS - 1)
    assert all(e["reason"].startswith("handling failed: ValueError at ") for e in failed)
    assert all("bug in a backend" not in repr(e) for e in failed)


async def test_an_unexpected_error_that_passes_is_not_given_up(
    autojump_clock: trio.abc.Clock,
) -> None:
    handler = Handler(failures={"$e1": [ValueError("once")] * (MAX_ATTEMPTS - 1)})

    await run_until(handler, [item(1, "!a:x")], lambda: bool(handler.done))

    assert len(handler.attempts["$e1"]) == MAX_ATTEMPTS
    assert handler.gave_up == []


@pytest.mark.parametrize(
    "error",
    [
        Forbidden(403, "M_FORBIDDEN", "not in the room"),
        NotFound(404, "M_NOT_FOUND", "no such room"),
        MatrixError(400, "M_UNKNOWN", "bad request"),
    ],
    ids=type,
)
async def test_a_permanent_matrix_error_is_given_up_at_once(
    autojump_clock: trio.abc.Clock, error: Exception
) -> None:
    assert not is_transient(error)
    handler = Handler(forever={"$e1": error})

    await run_until(handler, [item(1, "!a:x")], lambda: bool(handler.gave_up))

    assert len(handler.attempts["$e1"]) == 1
    assert handler.gave_up == [("$e1", error)]


async def test_one_jobs_failure_does_not_stop_the_others(autojump_clock: trio.abc.Clock) -> None:
    handler = Handler(
        forever={"$e1": RuntimeError("poison"), "$e4": Forbidden(403, "M_FORBIDDEN", "no")}
    )
    items = [item(1, "!a:x"), item(2, "!a:x"), item(3, "!b:x"), item(4, "!b:x"), item(5, "!a:x")]

    await run_until(handler, items, lambda: len(handler.done) == 3)

    assert handler.done_ids("!a:x") == ["$e2", "$e5"]
    assert handler.done_ids("!b:x") == ["$e3"]
    assert sorted(eid for eid, _ in handler.gave_up) == ["$e1", "$e4"]
    # Room order holds across the failure: $e2 waited for $e1's last attempt.
    assert handler.attempts["$e2"][0] >= handler.attempts["$e1"][-1]


async def test_a_failing_give_up_does_not_stop_the_worker(autojump_clock: trio.abc.Clock) -> None:
    handler = Handler(forever={"$e1": ValueError("x")}, give_up_error=RuntimeError("store down"))

    await run_until(handler, [item(1, "!a:x"), item(2, "!a:x")], lambda: bool(handler.done))

    assert handler.done_ids() == ["$e2"]
    assert len(handler.gave_up) == 1


# --- jobs an earlier run left unfinished ---------------------------------------------------------


async def test_a_job_taken_up_again_is_counted_once_and_handled(
    autojump_clock: trio.abc.Clock,
) -> None:
    handler = Handler(
        resumptions={"$e1": MAX_RESUMPTIONS - 1}, failures={"$e1": [ValueError("once")]}
    )
    await run_until(
        handler, [item(2, "!a:x")], lambda: len(handler.done) == 2, resumed=[item(1, "!a:x")]
    )

    assert handler.done_ids() == ["$e1", "$e2"]
    # Counted per run, not per attempt; a job of this run is not counted at all.
    assert handler.resumptions == {"$e1": MAX_RESUMPTIONS}
    assert handler.gave_up == []


async def test_a_job_left_unfinished_by_too_many_runs_is_given_up_unhandled(
    autojump_clock: trio.abc.Clock,
) -> None:
    handler = Handler(resumptions={"$e1": MAX_RESUMPTIONS}, answered={"$e1"})
    resumed = [item(1, "!a:x"), item(2, "!a:x")]

    with capture_logs() as logs:
        await run_until(
            handler, [], lambda: bool(handler.done), idle(2 * RECEIPT_DELAY_S), resumed=resumed
        )

    assert "$e1" not in handler.attempts
    [(event_id, error)] = handler.gave_up
    assert event_id == "$e1"
    assert isinstance(error, LeftUnfinishedTooOften)
    assert error.runs == MAX_RESUMPTIONS + 1
    # The room goes on; the notice answered the job, so no receipt for it.
    assert handler.done_ids() == ["$e2"]
    assert handler.read == [("!a:x", "$e2")]
    assert not [e for e in logs if e["log_level"] == "error"]


async def test_a_job_whose_resumption_cannot_be_counted_is_still_handled(
    autojump_clock: trio.abc.Clock,
) -> None:
    handler = Handler(count_error=RuntimeError("store down"))

    with capture_logs() as logs:
        await run_until(handler, [], lambda: bool(handler.done), resumed=[item(1, "!a:x")])

    assert handler.done_ids() == ["$e1"]
    assert handler.gave_up == []
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["job_resumption_not_counted"]


# --- stopping ----------------------------------------------------------------------------------


async def test_stop_finishes_the_job_in_hand_and_leaves_the_queue(
    autojump_clock: trio.abc.Clock,
) -> None:
    handler = Handler(duration=10.0)
    items = [item(1, "!a:x"), item(2, "!a:x"), item(3, "!a:x")]
    t0 = trio.current_time()

    dispatcher = await run_until(handler, items, lambda: "$e1" in handler.attempts)

    # run_until returned once the dispatcher's run did: the job in hand was finished.
    assert trio.current_time() - t0 == 10.0
    assert handler.done_ids() == ["$e1"]
    assert set(handler.attempts) == {"$e1"}
    dispatcher.submit([item(4, "!a:x")])  # ignored after stop, and no error


async def test_stop_with_no_work_returns_at_once(autojump_clock: trio.abc.Clock) -> None:
    dispatcher = Dispatcher(Handler())
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(dispatcher.run)
        dispatcher.stop()

    assert trio.current_time() == t0


async def test_stop_during_a_transient_backoff_leaves_the_job(
    autojump_clock: trio.abc.Clock,
) -> None:
    handler = Handler(duration=0.0, forever={"$e1": NetworkError("down", maybe_processed=True)})

    # Stop while the worker waits out the backoff after the first failure.
    await run_until(handler, [item(1, "!a:x")], lambda: bool(handler.failed))

    # The retry after the backoff fails again; stopping, the worker leaves the job.
    assert len(handler.attempts["$e1"]) == 2
    assert handler.done == []
    assert handler.gave_up == []
    # A read receipt is a horizon for bot/intake.py after a store loss: one on an
    # unhandled message would leave that message unanswered for good.
    assert handler.read == []


async def test_a_transient_failure_while_stopping_is_not_retried(
    autojump_clock: trio.abc.Clock,
) -> None:
    handler = Handler(duration=1.0, forever={"$e1": NetworkError("down", maybe_processed=True)})
    t0 = trio.current_time()

    # Stop while the first attempt is still under way.
    await run_until(handler, [item(1, "!a:x")], lambda: bool(handler.attempts))

    assert len(handler.attempts["$e1"]) == 1
    assert trio.current_time() - t0 == 1.0
    assert handler.done == []
    assert handler.gave_up == []
    assert handler.read == []


async def test_a_lane_lives_only_while_its_room_has_work(autojump_clock: trio.abc.Clock) -> None:
    handler = Handler(duration=1.0)
    many = [item(seq, f"!quiet{seq}:x") for seq in range(10_000)]
    seen: list[int] = []

    async def watch(dispatcher: Dispatcher) -> None:
        seen.append(dispatcher.busy_rooms)
        await trio.sleep(5)
        seen.append(dispatcher.busy_rooms)

    t0 = trio.current_time()
    await run_until(handler, many[:3], lambda: len(handler.done) == 3, then=watch)
    dispatcher = await run_until(handler, many, lambda: len(handler.done) == 10_003)

    assert seen == [0, 0]  # three rooms done, their lanes gone
    assert dispatcher.busy_rooms == 0
    # Ten thousand rooms with one job each: side by side, not one after another.
    assert trio.current_time() - t0 < 10
