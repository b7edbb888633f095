"""People writing to the bot at a steady rate (`Traffic`), a collector reading the
bot's answers from /sync by their ``m.in_reply_to`` targets, and `audit`, which
re-reads each room through /messages for the final count and order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from bot.messages import in_reply_to
from matrix_api import (
    LimitExceeded,
    MatrixAPIError,
    MatrixClient,
    MatrixError,
    new_txn_id,
)
from matrix_api import TransportError as MatrixTransportError
from matrix_api.models import EventID, RoomEvent, RoomID, SyncToken


@dataclass(frozen=True)
class Sent:
    event_id: EventID
    room_id: RoomID
    sender: str
    index: int
    at: float  # wall clock, once the server accepted it


@dataclass(frozen=True)
class Answer:
    event_id: EventID
    room_id: RoomID
    bot: str
    target: str | None
    ts: float  # the server's origin_server_ts in seconds (same machine, same clock)
    content: dict[str, Any]


_COLLECTOR_FILTER = {
    "room": {
        "timeline": {"limit": 200, "types": ["m.room.message"]},
        "state": {"lazy_load_members": True, "types": []},
        "ephemeral": {"types": []},
        "account_data": {"types": []},
    },
    "presence": {"types": []},
    "account_data": {"types": []},
}
_PAGE_FILTER = {"types": ["m.room.message"]}


def _transient(error: MatrixAPIError) -> bool:
    return isinstance(error, MatrixTransportError | LimitExceeded) or (
        isinstance(error, MatrixError) and error.status >= 500
    )


class Traffic:
    """People writing to the bot, and the bot's answers as they see them.

    `send` keeps trying (same transaction id) through outages and rate limits, so a
    message counts as sent only once the server has it. `collect` long-polls /sync
    and records every message of the bots, filling ``limited`` gaps with /messages.
    """

    def __init__(self, bots: Collection[str]) -> None:
        self.bots = frozenset(bots)
        self.sent: list[Sent] = []
        self.seen: dict[EventID, Answer] = {}

    async def send(
        self,
        client: MatrixClient,
        room_id: RoomID,
        body: str | None = None,
        *,
        content: dict[str, Any] | None = None,
        patience: float = 180.0,
    ) -> EventID:
        content = content if content is not None else {"msgtype": "m.text", "body": body}
        txn_id = new_txn_id()
        deadline = trio.current_time() + patience
        while True:
            try:
                event_id = await client.send_event(room_id, "m.room.message", content, txn_id)
                break
            except MatrixAPIError as exc:
                if not _transient(exc) or trio.current_time() > deadline:
                    raise
                await trio.sleep(0.5)
        self.sent.append(
            Sent(event_id, room_id, client.require_user_id(), len(self.sent), time.time())
        )
        return event_id

    async def stream(
        self,
        client: MatrixClient,
        rooms: Sequence[RoomID],
        count: int,
        rate: float | None,
        *,
        label: str = "message",
    ) -> None:
        """``count`` messages round-robin over ``rooms``, ``rate`` a second (None: back
        to back); a send that takes longer delays the ones after it."""
        started = trio.current_time()
        for index in range(count):
            if rate is not None:
                await trio.sleep_until(started + index / rate)
            await self.send(client, rooms[index % len(rooms)], f"{label} {index}")

    async def collect(
        self, client: MatrixClient, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        since: SyncToken | None = None
        while True:
            try:
                response = await client.sync(
                    since=since, timeout_ms=0 if since is None else 2000, filter=_COLLECTOR_FILTER
                )
                batches = []
                for room_id, room in response.rooms.join.items():
                    events = list(room.timeline.events)
                    prev = room.timeline.prev_batch
                    if since is not None and room.timeline.limited and prev is not None:
                        events = [*await self._missed(client, room_id, prev, since), *events]
                    batches.append((room_id, events))
            except MatrixAPIError:
                await trio.sleep(0.5)
                continue
            for room_id, events in batches:
                self._note(room_id, events)
            if since is None:
                task_status.started()
            since = response.next_batch

    @staticmethod
    async def _missed(
        client: MatrixClient, room_id: RoomID, prev: SyncToken, since: SyncToken
    ) -> list[RoomEvent]:
        missed: list[RoomEvent] = []
        token: SyncToken | None = prev
        while token is not None:
            page = await client.messages(
                room_id,
                direction="b",
                from_token=token,
                to_token=since,
                limit=500,
                filter=_PAGE_FILTER,
            )
            missed.extend(page.chunk)
            if not page.chunk:
                break
            token = page.end
        missed.reverse()
        return missed

    def _note(self, room_id: RoomID, events: Iterable[RoomEvent]) -> None:
        for event in events:
            if event.sender in self.bots and event.event_id not in self.seen:
                self.seen[event.event_id] = Answer(
                    event.event_id,
                    room_id,
                    event.sender,
                    in_reply_to(event),
                    event.origin_server_ts / 1000,
                    dict(event.content),
                )

    def answers_to(self, event_id: str, bot: str | None = None) -> list[Answer]:
        return [
            a for a in self.seen.values() if a.target == event_id and (bot is None or a.bot == bot)
        ]

    def unanswered(
        self, events: Iterable[str] | None = None, bots: Iterable[str] | None = None
    ) -> list[str]:
        wanted = list(events) if events is not None else [s.event_id for s in self.sent]
        answered = {(a.bot, a.target) for a in self.seen.values()}
        return [
            event_id
            for event_id in wanted
            if any((bot, event_id) not in answered for bot in (bots or self.bots))
        ]

    async def wait_answered(
        self,
        events: Iterable[str] | None = None,
        *,
        timeout: float,
        bots: Iterable[str] | None = None,
        fail_if: Callable[[], str | None] | None = None,
    ) -> float:
        """Wait until each of ``events`` (default: all sent) has an answer from each
        bot; returns the seconds it took. Fails after ``timeout`` s, or as soon as
        ``fail_if()`` gives a reason instead of None (`BotProcess.exited`)."""
        wanted = list(events) if events is not None else None
        bot_list = list(bots) if bots is not None else None
        started = trio.current_time()
        while True:
            missing = self.unanswered(wanted, bot_list)
            if not missing:
                return trio.current_time() - started
            reason = fail_if() if fail_if is not None else None
            if reason is not None:
                raise AssertionError(f"{len(missing)} message(s) unanswered: {reason}")
            if trio.current_time() - started > timeout:
                raise AssertionError(
                    f"{len(missing)} message(s) still unanswered after {timeout} s "
                    f"(of {len(wanted) if wanted is not None else len(self.sent)})"
                )
            await trio.sleep(0.1)


async def audit(client: MatrixClient, rooms: Iterable[RoomID]) -> dict[RoomID, list[RoomEvent]]:
    """Every ``m.room.message`` of each room, oldest first, read through /messages."""
    timelines: dict[RoomID, list[RoomEvent]] = {}
    for room_id in rooms:
        events: list[RoomEvent] = []
        token: SyncToken | None = None
        while True:
            page = await client.messages(
                room_id, direction="f", from_token=token, limit=500, filter=_PAGE_FILTER
            )
            events.extend(page.chunk)
            if not page.chunk or page.end is None:
                break
            token = page.end
        timelines[room_id] = events
    return timelines


def replies_by_target(
    timelines: dict[RoomID, list[RoomEvent]], bot: str
) -> dict[str, list[RoomEvent]]:
    """The bot's notices in ``timelines``, grouped by the message they answer."""
    replies: dict[str, list[RoomEvent]] = {}
    for events in timelines.values():
        for event in events:
            target = in_reply_to(event) if event.sender == bot else None
            if target is not None:
                replies.setdefault(target, []).append(event)
    return replies


def order_violations(
    sent: Sequence[Sent], timelines: dict[RoomID, list[RoomEvent]], bot: str
) -> list[str]:
    """Rooms where the bot answered the sent messages in another order than the room has them."""
    ours = {s.event_id for s in sent}
    bad: list[str] = []
    for room_id, events in timelines.items():
        asked = [e.event_id for e in events if e.event_id in ours]
        answered: list[str] = []
        for event in events:
            target = in_reply_to(event) if event.sender == bot else None
            if target in ours and target not in answered:
                answered.append(target)
        expected = [e for e in asked if e in set(answered)]
        if answered != expected:
            bad.append(room_id)
    return bad
