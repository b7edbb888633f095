"""From a /sync batch to the inbox: pick the events to handle, fill gaps, commit.

Three situations, one rule each:

* An ordinary batch (there is a stored sync token): every timeline event worth
  answering goes in. A ``limited`` timeline means the server left events out: they
  are fetched with /messages back to the previous token before anything commits.
* A start with no token in a room that is a known chat (the local store was lost):
  the server still knows how far the bot got: its read receipt, its replies (each
  points at the message it answers) and its other notices. Only what comes after
  that, and was not answered, goes in; /messages reaches back when the timeline
  does not go far enough.
* A start with no token in any other room (the very first start): history from
  before the bot managed the room is not answered.

The picked events and the new token are committed in one transaction
(`Store.commit_sync_batch`), so a crash before the commit replays the batch and a
crash after it finds the events in the inbox.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from matrix_api import MatrixAPIError, MatrixClient
from matrix_api.models import (
    EventID,
    JoinedRoom,
    RoomEvent,
    RoomID,
    StrippedStateEvent,
    SyncResponse,
    SyncToken,
)

from .chats import MAX_TITLE, Chat
from .e2ee.crypto import BotCrypto
from .invites import pick_invite, unreadable_invite_state
from .messages import in_reply_to, is_actionable, is_event_id, malformed
from .ops.metrics import BotMetrics
from .quarantine import failure_reason, log_quarantined_batch
from .store import InboxItem, NewInboxItem, Quarantined, redaction_item
from .store_api import BotStore

__all__ = ["Intake", "full_state_sync", "invite_item", "invited_room_name", "sync_filters"]

log = structlog.get_logger("bot.intake")


# The only timeline events the bot reads: messages (plain and encrypted), encryption
# being turned on, and memberships (its own join marks where a room's history ends).
# Verification events: a user verifying the bot from their direct chat (Element's way
# to verify another user) sends them in the room, in the clear. Redactions: a user
# deleting a message (`bot.store.redaction_item`).
_TIMELINE_TYPES = [
    "m.room.message",
    "m.room.encrypted",
    "m.room.encryption",
    "m.room.member",
    "m.room.redaction",
    "m.key.verification.*",
]


def sync_filters(bot_user_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The /sync filters: one for the start-up sync, one for the long-poll.

    Both ask for enough timeline per room that a busy room is rarely ``limited``
    (the server's default is 10), and only for the event types the bot reads: the
    other state events of a new room (creation, power levels, join rules, name...)
    were most of an empty store's start-up sync, 2 MB of the bot's memory with 300
    rooms. The start-up sync needs the bot's own events and receipts to see how far
    it got; the long-poll leaves out the bot's own events and all ephemeral ones,
    so its own replies and receipts do not wake it up.

    Neither asks for the rooms' state but ``m.room.encryption`` (which rooms to
    encrypt for; one small event per encrypted room): the bot reads chats from its
    room account data (the markers) and messages from timelines, and with
    ``full_state`` the state of every room was most of the start-up sync (half its
    bytes with 300 small rooms, and the peak of the bot's memory).
    """
    initial = {
        "room": {
            "timeline": {"limit": 50, "types": _TIMELINE_TYPES},
            "state": {"types": ["m.room.encryption"]},
            "ephemeral": {"types": ["m.receipt"]},
        },
        "presence": {"types": []},
    }
    long_poll = {
        "room": {
            "timeline": {"limit": 50, "types": _TIMELINE_TYPES, "not_senders": [bot_user_id]},
            "state": {"types": ["m.room.encryption"]},
            "ephemeral": {"types": []},
        },
        "presence": {"types": []},
        "account_data": {"types": []},
    }
    return initial, long_poll


# Event types under this namespace are never sent: a filter leaving one out filters nothing.
_START_NONCE_TYPE = "org.surfaces.start"


async def full_state_sync(
    client: MatrixClient, bot_user_id: str, since: SyncToken | None = None
) -> SyncResponse:
    """A full-state /sync with the start-up filter (``timeout=0``), never a replayed answer.

    Synapse answers a repeat of a recent /sync (same user, token, timeout, filter and
    ``full_state``) from a cache of about two minutes, so a quick restart (or a second
    maintenance command) could be handed the answer of the first, blind to what
    changed since. The start-up filter carries a nonce of its own: it leaves out one
    account-data type that nothing uses, so what comes back is exactly what the filter
    asks for, and every start's request is one the server has not seen.
    """
    initial_filter, _ = sync_filters(bot_user_id)
    nonce = f"{_START_NONCE_TYPE}.{secrets.token_hex(8)}"
    return await client.sync(
        since=since,
        timeout_ms=0,
        full_state=True,
        filter={**initial_filter, "account_data": {"not_types": [nonce]}},
    )


_PAGE = 100
# Bounds a walk back through history: a gap of up to _MAX_PAGES * _PAGE events.
_MAX_PAGES = 50


@dataclass(frozen=True, slots=True)
class _Horizon:
    """How far the bot is known to have got in one room."""

    index: int  # events[: index + 1] are handled or predate the chat; -1: none known
    answered: frozenset[str]


def invite_item(
    room_id: RoomID,
    inviter: str,
    bot_user_id: str,
    encrypted: bool = False,
    *,
    ambiguous: str | None = None,
    candidates: Sequence[str] = (),
    name: str | None = None,
) -> NewInboxItem:
    """An inbox entry for a pending invite (stripped state has no event id).

    An ``ambiguous`` one (see `bot.invites.pick_invite`) is declined when handled; it
    goes through the inbox like any invite, so the decline is durable. ``name`` is
    the room's name, if the invite state had one (the chat's title).
    """
    content: dict[str, Any] = {"membership": "invite", "encrypted": encrypted}
    if name:
        content["name"] = name
    if ambiguous is not None:
        content["ambiguous"] = ambiguous
        content["candidates"] = list(candidates)
    event = RoomEvent(
        type="m.room.member",
        event_id=EventID(f"invite:{room_id}"),
        sender=inviter,  # type: ignore[arg-type]  # a user id from the invite state
        origin_server_ts=0,
        content=content,
        state_key=bot_user_id,
        room_id=room_id,
    )
    return NewInboxItem(event.event_id, room_id, "invite", event)


def invited_room_name(invite_state: Sequence[StrippedStateEvent]) -> str | None:
    """The room name in an invite's stripped state (the last ``m.room.name``), cut
    to a bound: it comes from the inviting server and becomes at most a chat title
    (`bot.chats.safe_title` makes it safe when the invite is accepted)."""
    name = None
    for stripped in invite_state:
        if stripped.type == "m.room.name" and stripped.state_key == "":
            value = stripped.content.get("name")
            name = value[:_MAX_INVITED_NAME] if isinstance(value, str) else None
    return name


# Four times a title's length: room for characters `safe_title` drops.
_MAX_INVITED_NAME = 4 * MAX_TITLE


def encryption_changes(response: SyncResponse) -> dict[RoomID, str]:
    """Joined rooms whose ``m.room.encryption`` the batch shows (in its state or its
    timeline), with the content as JSON: the rotation settings are read from it."""
    found: dict[RoomID, str] = {}
    for room_id, room in response.rooms.join.items():
        for event in [*room.state, *room.timeline.events]:
            if (
                event.type == "m.room.encryption"
                and event.state_key == ""
                and isinstance(event.content.get("algorithm"), str)
            ):
                found[room_id] = json.dumps(event.content, separators=(",", ":"))
    return found


class Intake:
    """Turns sync responses into committed inbox items for one bot user."""

    def __init__(
        self,
        client: MatrixClient,
        store: BotStore,
        bot_user_id: str,
        *,
        metrics: BotMetrics | None = None,
    ) -> None:
        self._client = client
        self._store = store
        self._bot = bot_user_id
        self._metrics = metrics
        self.crypto: BotCrypto | None = None
        """Set once the bot's end-to-end encryption is up (never, with it off)."""

    async def commit(
        self, response: SyncResponse, since: SyncToken | None, *, salvage: bool = False
    ) -> list[InboxItem]:
        """Pick, gap-fill and commit ``response`` (fetched with ``since``).

        Each event is taken in on its own: one that did not decode, or that cannot
        be looked at, is quarantined (`bot.quarantine`) and the rest go on; so does
        a room whose events cannot be picked, for its own events.

        Returns the inbox items that are new. Raises what /messages raises; nothing
        is committed then, so the same batch is fetched and handled again. With
        ``salvage`` (the same batch failed before, see the sync loop) a gap that
        /messages cannot fill is left unfilled instead.
        """
        items: list[NewInboxItem] = []
        quarantined = self._unreadable(response)
        undecodable, intake_errors = len(quarantined), 0  # the rest is malformed
        odd_redactions = 0
        for room_id, room in response.rooms.join.items():
            try:
                events = await self._pick(room_id, room, since, salvage=salvage)
            except MatrixAPIError:
                raise
            except Exception as exc:  # one room's junk must not stop the others
                reason = failure_reason(exc, "intake")
                log.warning("intake_room_failed", room_id=room_id, reason=reason, exc_info=True)
                lost = self._quarantine_timeline(room_id, room, reason)
                quarantined.extend(lost)
                intake_errors += len(lost)
                continue
            for event in events:
                if event.type == "m.room.redaction":
                    redaction = self._redaction(room_id, event)
                    if redaction is not None:
                        items.append(redaction)
                    elif event.sender != self._bot:
                        odd_redactions += 1
                    continue
                problem: str | None
                try:
                    problem = malformed(event, self._bot)
                    actionable = problem is None and is_actionable(event, self._bot)
                except Exception as exc:  # noqa: BLE001  # one event's junk costs only itself
                    problem, actionable = failure_reason(exc, "intake"), False
                    intake_errors += 1
                if problem is not None:
                    quarantined.append(self._quarantine(room_id, event, problem))
                elif actionable:
                    items.append(NewInboxItem(event.event_id, room_id, "message", event))
        unreadable = unreadable_invite_state(response.skipped, response.rooms.invite)
        for room_id, invited in response.rooms.invite.items():
            # The inviter is the sender of the invite the server appended, last; a
            # state that says otherwise anywhere is declined (`pick_invite`).
            picked = pick_invite(
                invited.invite_state, self._bot, unreadable=unreadable.get(room_id, 0)
            )
            if picked is None:
                continue
            encrypted = any(s.type == "m.room.encryption" for s in invited.invite_state)
            items.append(
                invite_item(
                    room_id,
                    picked.inviter,
                    self._bot,
                    encrypted,
                    ambiguous=picked.ambiguous,
                    candidates=picked.candidates,
                    name=invited_room_name(invited.invite_state),
                )
            )
        log_quarantined_batch(quarantined)
        if odd_redactions:
            # Once per batch, whatever its size; never the content.
            log.warning("redactions_unreadable", count=odd_redactions)
        fresh = await self._commit(response, items, quarantined)
        if self._metrics is not None:
            malformed_count = len(quarantined) - undecodable - intake_errors
            self._count(fresh, undecodable=undecodable, errors=intake_errors, bad=malformed_count)
        return fresh

    def _count(self, fresh: list[InboxItem], *, undecodable: int, errors: int, bad: int) -> None:
        """A committed batch, in the metrics: what came in, how late, what was put aside."""
        metrics = self._metrics
        assert metrics is not None
        now_ms = self._client.server_time_ms()
        for item in fresh:
            metrics.took_in(item.kind)
            if item.kind == "message":
                metrics.lag(item.event.origin_server_ts, now_ms)
        for reason, count in (
            ("undecodable", undecodable),
            ("intake_error", errors),
            ("malformed", bad),
        ):
            if count:
                metrics.quarantine(reason, count)

    async def quarantine_batch(self, response: SyncResponse, reason: str) -> None:
        """Give up ``response``: record its timeline events as quarantined for
        ``reason`` and move the sync token past it (the last resort of the sync loop
        for a batch that failed again and again)."""
        quarantined = self._unreadable(response)
        for room_id, room in response.rooms.join.items():
            quarantined.extend(self._quarantine_timeline(room_id, room, reason))
        log_quarantined_batch(quarantined)
        await self._commit(response, [], quarantined)
        if self._metrics is not None and quarantined:
            self._metrics.quarantine("batch_given_up", len(quarantined))

    async def _commit(
        self, response: SyncResponse, items: list[NewInboxItem], quarantined: list[Quarantined]
    ) -> list[InboxItem]:
        # The crypto layer takes the batch's to-device events right before the commit
        # that stores what they changed, with no await in between (`bot.e2ee.crypto`).
        crypto = self.crypto.take_sync(response) if self.crypto is not None else None
        fresh = await self._store.commit_sync_batch(
            response.next_batch,
            items,
            quarantined,
            crypto=crypto.rows if crypto is not None else (),
            encryption=encryption_changes(response),
        )
        if self.crypto is not None and crypto is not None:
            self.crypto.batch_committed(crypto)
        return fresh

    def _redaction(self, room_id: RoomID, event: RoomEvent) -> NewInboxItem | None:
        """The inbox entry for an m.room.redaction, or None: the bot's own, or one
        whose ``redacts`` is not an event id. Room version 11 puts ``redacts`` in the
        content, older ones at the top level.
        Whether the store knows the target is the store's to say."""
        if event.sender == self._bot:
            return None
        target = event.content.get("redacts")
        if target is None:
            target = event.redacts
        if not is_event_id(target) or not isinstance(event.origin_server_ts, int):
            return None
        return redaction_item(
            event.event_id, room_id, event.sender, event.origin_server_ts, EventID(target)
        )

    @staticmethod
    def _quarantine(room_id: RoomID, event: RoomEvent, reason: str) -> Quarantined:
        return Quarantined(event.event_id, room_id, reason, event.sender)

    def _quarantine_timeline(
        self, room_id: RoomID, room: JoinedRoom, reason: str
    ) -> list[Quarantined]:
        """What others wrote in ``room``'s timeline, quarantined for ``reason``."""
        return [
            self._quarantine(room_id, event, reason)
            for event in room.timeline.events
            if event.sender != self._bot
        ]

    def _unreadable(self, response: SyncResponse) -> list[Quarantined]:
        """The events of ``response`` that did not decode, to record; the rest of what
        was skipped (a room, a value that is not an event) is logged here."""
        quarantined: list[Quarantined] = []
        other = []
        for skipped in response.skipped:
            if skipped.event_id is not None and skipped.room_id is not None:
                quarantined.append(
                    Quarantined(skipped.event_id, skipped.room_id, skipped.reason, skipped.sender)
                )
            else:
                other.append(skipped)
        if other:
            log.warning(
                "sync_events_skipped",
                count=len(other),
                first=[f"{s.where}: {s.reason}" for s in other[:5]],
            )
        return quarantined

    async def _pick(
        self, room_id: RoomID, room: JoinedRoom, since: SyncToken | None, *, salvage: bool
    ) -> list[RoomEvent]:
        """The events of ``room``'s timeline (and its gap) to consider taking in."""
        if since is None:
            chat = self._store.chat_for_room(room_id)
            if chat is None:
                return []
            try:
                return await self._since_horizon(room_id, room, chat)
            except MatrixAPIError as exc:
                if not salvage:
                    raise
                # Without the history the bot cannot tell what it answered: answer nothing.
                log.warning("catch_up_abandoned", room_id=room_id, error=str(exc))
                return []
        return await self._with_gap_filled(room_id, room, since, salvage=salvage)

    async def _with_gap_filled(
        self, room_id: RoomID, room: JoinedRoom, since: SyncToken, *, salvage: bool
    ) -> list[RoomEvent]:
        timeline = room.timeline
        arrived_at = _own_arrival_index(timeline.events, self._bot)
        if arrived_at is not None:
            # Newly joined: what came before the join is history, not for the bot.
            return list(timeline.events[arrived_at + 1 :])
        if not timeline.limited or timeline.prev_batch is None:
            return list(timeline.events)
        try:
            missed = await self._missed(room_id, timeline.prev_batch, since)
        except MatrixAPIError as exc:
            if not salvage:
                raise
            log.warning("sync_gap_unfilled", room_id=room_id, error=str(exc))
            return list(timeline.events)
        events = _dedupe([*missed, *timeline.events])
        arrived_at = _own_arrival_index(events, self._bot)
        # A join inside the gap: what came before it is history, not for the bot.
        return events[arrived_at + 1 :] if arrived_at is not None else events

    async def _missed(
        self, room_id: RoomID, prev_batch: SyncToken, since: SyncToken
    ) -> list[RoomEvent]:
        """The events of a gap, oldest first, from /messages back to ``since``."""
        missed: list[RoomEvent] = []  # newest first, as /messages pages backwards
        token: SyncToken | None = prev_batch
        pages = 0
        while token is not None and pages < _MAX_PAGES:
            page = await self._client.messages(
                room_id, direction="b", from_token=token, to_token=since, limit=_PAGE
            )
            missed.extend(page.chunk)
            pages += 1
            # An empty page with an ``end`` is not the end; no ``end`` is.
            token = page.end
        if token is not None:
            log.warning("sync_gap_truncated", room_id=room_id, events=len(missed))
        log.info("sync_gap_filled", room_id=room_id, events=len(missed), pages=pages)
        missed.reverse()
        return missed

    async def _since_horizon(
        self, room_id: RoomID, room: JoinedRoom, chat: Chat
    ) -> list[RoomEvent]:
        events = list(room.timeline.events)
        receipt = _own_receipt(room, self._bot)
        horizon = _horizon(events, self._bot, receipt)
        token = room.timeline.prev_batch if room.timeline.limited else None
        pages = 0
        while (
            horizon.index < 0
            and token is not None
            and pages < _MAX_PAGES
            and (not events or events[0].origin_server_ts >= chat.created_ts)
        ):
            page = await self._client.messages(
                room_id, direction="b", from_token=token, limit=_PAGE
            )
            events = [*reversed(page.chunk), *events]
            pages += 1
            token = page.end
            horizon = _horizon(events, self._bot, receipt)
        start = horizon.index + 1
        arrived_at = _own_arrival_index(events, self._bot)
        if arrived_at is not None:
            start = max(start, arrived_at + 1)
        picked = [
            event
            for event in events[start:]
            if event.event_id not in horizon.answered and event.origin_server_ts >= chat.created_ts
        ]
        if picked or pages:
            log.info(
                "catch_up_after_store_loss",
                room_id=room_id,
                chat_id=chat.chat_id,
                unanswered=len(picked),
                pages=pages,
            )
        return _dedupe(picked)


def _own_arrival_index(events: Sequence[RoomEvent], bot_user_id: str) -> int | None:
    """Where the bot came into the room, if ``events`` show it: its last join.

    The long-poll leaves out the bot's own events, its join among them: there the
    invite it accepted (sent by the inviter) stands for the join. What the inviter
    wrote between the two is then left to the chat's ``created_ts``.
    """
    for index in range(len(events) - 1, -1, -1):
        event = events[index]
        if event.type != "m.room.member" or event.state_key != bot_user_id:
            continue
        membership = event.content.get("membership")
        if membership == "invite" or (membership == "join" and not _was_joined(event)):
            return index
    return None


def _was_joined(member: RoomEvent) -> bool:
    """Whether a membership event follows a join (a profile change, not a join)."""
    previous = member.unsigned.get("prev_content")
    return isinstance(previous, dict) and previous.get("membership") == "join"


def _own_receipt(room: JoinedRoom, bot_user_id: str) -> str | None:
    """The event the bot's ``m.read`` receipt points at, if the sync carried it."""
    for event in room.ephemeral:
        if event.type != "m.receipt":
            continue
        for event_id, receipts in event.content.items():
            readers = receipts.get("m.read") if isinstance(receipts, dict) else None
            if isinstance(readers, dict) and bot_user_id in readers:
                return event_id
    return None


def _horizon(events: Sequence[RoomEvent], bot_user_id: str, receipt: str | None) -> _Horizon:
    """The last position the bot provably handled, and every event it answered.

    A reply marks the message it answers as handled, and (events of a room being
    handled in order) everything before that message. A notice that answers
    nothing (a greeting) marks itself. The read receipt marks its event.
    """
    position: dict[str, int] = {event.event_id: i for i, event in enumerate(events)}
    index = -1
    answered: set[str] = set()
    for i, event in enumerate(events):
        if event.event_id == receipt:
            index = max(index, i)
        if event.sender != bot_user_id:
            continue
        target = in_reply_to(event)
        if target is None:
            index = max(index, i)
        else:
            answered.add(target)
            index = max(index, position.get(target, -1))
    return _Horizon(index, frozenset(answered))


def _dedupe(events: list[RoomEvent]) -> list[RoomEvent]:
    seen: set[str] = set()
    unique = []
    for event in events:
        if event.event_id not in seen:
            seen.add(event.event_id)
            unique.append(event)
    return unique
