"""A chat's conversation as the model sees it: turns, a character budget, and history.

The store keeps each chat's turns; when it has lost them, `load_room_context` rebuilds
them from the room itself (the room is the source of truth, as for chats). Both ends
meet in `trim_context`, which fits a conversation into the configured budget.

Everything here is pure except `load_room_context`, which only reads the room.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from matrix_api import MatrixClient
from matrix_api.models import EventID, RoomEvent, RoomID

from ..messages import in_reply_to, strip_reply_fallback

__all__ = [
    "FAILED_KEY",
    "STREAMING_KEY",
    "Role",
    "Turn",
    "context_chars",
    "find_reply",
    "latest_contents",
    "load_room_context",
    "trim_context",
    "turns_from_history",
]

Role = Literal["system", "user", "assistant"]

STREAMING_KEY = "org.surfaces_bot.streaming"
"""Content key set (to true) on a reply while it is still growing; the final edit drops it.

A reply whose latest content still carries it was cut short (a crash mid-stream): it is
not part of the conversation, and the next run completes or replaces it.
"""

FAILED_KEY = "org.surfaces_bot.failed"
"""Content key set (to true) on a reply that reports a failure instead of an answer."""


@dataclass(frozen=True, slots=True)
class Turn:
    """One message of a conversation, in the chat-completions sense."""

    role: Role
    content: str

    def as_json(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def context_chars(turns: Iterable[Turn]) -> int:
    """The size of ``turns`` as the budget counts it: characters of content."""
    return sum(len(turn.content) for turn in turns)


def trim_context(turns: Sequence[Turn], budget_chars: int) -> list[Turn]:
    """The newest part of ``turns`` that fits in ``budget_chars`` characters of content.

    Kept whatever the budget: the leading system turns (the system prompt) and the
    newest user turn. Then turns are taken from the newest back while they fit; the
    first one that does not fit ends the history (no older turn is taken past a gap).
    A kept history never starts with an assistant turn, since chat templates expect a
    user turn first. Pure; the input is not changed.
    """
    head = 0
    while head < len(turns) and turns[head].role == "system":
        head += 1
    system = list(turns[:head])
    rest = list(turns[head:])
    last_user = max((i for i, turn in enumerate(rest) if turn.role == "user"), default=None)
    if last_user is None:
        # Nothing to answer: keep what fits, newest first.
        pinned: list[Turn] = []
        tail = rest
    else:
        pinned = [rest[last_user]]
        tail = rest[:last_user]
        after = rest[last_user + 1 :]
        # Turns after the newest user turn (rare: a prefilled assistant turn) stay too.
        pinned.extend(after)
    remaining = budget_chars - context_chars(system) - context_chars(pinned)
    kept: list[Turn] = []
    for turn in reversed(tail):
        if len(turn.content) > remaining:
            break
        kept.append(turn)
        remaining -= len(turn.content)
    kept.reverse()
    while kept and kept[0].role == "assistant":
        kept.pop(0)
    return system + kept + pinned


def _replacement_target(event: RoomEvent) -> str | None:
    relates = event.content.get("m.relates_to")
    if not isinstance(relates, dict) or relates.get("rel_type") != "m.replace":
        return None
    target = relates.get("event_id")
    return target if isinstance(target, str) else None


def latest_contents(events: Iterable[RoomEvent]) -> dict[str, dict[str, Any]]:
    """For each edited event, the ``m.new_content`` of its latest replacement.

    Only replacements by the original's sender count (the spec's rule; anyone else's
    "edit" is ignored). The latest is the one with the highest ``origin_server_ts``,
    later in ``events`` on a tie. Redacted replacements do not count.
    """
    senders: dict[str, str] = {}
    candidates: list[tuple[str, RoomEvent]] = []
    for event in events:
        if event.type != "m.room.message":
            continue
        target = _replacement_target(event)
        if target is None:
            senders[event.event_id] = event.sender
        elif not event.is_redacted and isinstance(event.content.get("m.new_content"), dict):
            candidates.append((target, event))
    latest: dict[str, tuple[int, dict[str, Any]]] = {}
    for target, event in candidates:
        if senders.get(target) != event.sender:
            continue
        seen = latest.get(target)
        if seen is None or event.origin_server_ts >= seen[0]:
            latest[target] = (event.origin_server_ts, event.content["m.new_content"])
    return {target: content for target, (_, content) in latest.items()}


def _is_command(body: str, command_prefix: str | None) -> bool:
    return bool(command_prefix) and body.lstrip().startswith(command_prefix or "")


def _is_forget(body: str, command_prefix: str | None, forget: str | None) -> bool:
    if not command_prefix or not forget:
        return False
    words = body.strip().split(maxsplit=1)
    return bool(words) and words[0] == f"{command_prefix}{forget}"


def turns_from_history(
    events: Sequence[RoomEvent],
    bot_user_id: str,
    *,
    command_prefix: str | None = "!",
    forget: str | None = "forget",
    stop_at: str | None = None,
) -> list[Turn]:
    """The conversation held in ``events`` (chronological), oldest turn first.

    * ``m.text`` messages from anyone but the bot are user turns (rich-reply fallback
      stripped); the bot's ``m.notice`` messages are assistant turns.
    * Edits are honoured: each message counts with the ``m.new_content`` of its latest
      replacement by the same sender (see `latest_contents`); redacted messages drop out.
    * Commands (bodies starting with ``command_prefix``) and the bot's answers to them
      are not conversation. The command ``forget`` (``!forget``) starts the
      conversation afresh: turns before it are dropped.
    * A bot reply still marked as streaming (`STREAMING_KEY`) was cut short, and one
      marked as failed (`FAILED_KEY`) holds no answer: both are left out, as are empty
      bodies.
    * ``stop_at``: the event being answered now; it and everything after it are ignored.
    """
    replaced = latest_contents(events)
    skipped: set[str] = set()
    turns: list[Turn] = []
    for event in events:
        if stop_at is not None and event.event_id == stop_at:
            break
        if event.type != "m.room.message" or event.is_redacted:
            continue
        if _replacement_target(event) is not None:
            continue
        content = replaced.get(event.event_id, event.content)
        body = content.get("body")
        msgtype = content.get("msgtype")
        if not isinstance(body, str):
            continue
        if event.sender == bot_user_id:
            if msgtype != "m.notice" or content.get(STREAMING_KEY) or content.get(FAILED_KEY):
                continue
            target = in_reply_to(event)
            if target is not None and target in skipped:
                continue
            role: Role = "assistant"
        else:
            if msgtype != "m.text":
                continue
            if in_reply_to(event) is not None:
                body = strip_reply_fallback(body)
            if _is_forget(body, command_prefix, forget):
                turns.clear()
            if _is_command(body, command_prefix):
                skipped.add(event.event_id)
                continue
            role = "user"
        if body.strip():
            turns.append(Turn(role, body))
    return turns


def find_reply(events: Iterable[RoomEvent], bot_user_id: str, source: str) -> RoomEvent | None:
    """The bot's first reply (a notice with ``m.in_reply_to`` = ``source``) in ``events``.

    After a crash mid-stream the store may not know the reply it had started; this finds
    it in the room so that the next run edits it instead of posting a second answer.
    """
    for event in events:
        if (
            event.sender == bot_user_id
            and event.type == "m.room.message"
            and _replacement_target(event) is None
            and in_reply_to(event) == source
        ):
            return event
    return None


async def load_room_context(
    client: MatrixClient,
    room_id: RoomID,
    bot_user_id: str,
    *,
    budget_chars: int,
    since_ts: int = 0,
    stop_at: EventID | None = None,
    command_prefix: str | None = "!",
    page_size: int = 100,
    max_pages: int = 10,
) -> list[Turn]:
    """Rebuild a chat's conversation from its room, within ``budget_chars``.

    Pages back through ``/messages`` from the newest event until the messages read
    hold about twice the budget (edits and commands are read too), an event older
    than ``since_ts`` (the chat's creation) appears, the room's start is reached, or
    ``max_pages`` pages were read. ``stop_at`` is the message being answered: it and
    what follows it are not context. Raises `matrix_api.MatrixAPIError` when the room
    cannot be read; the caller decides whether to answer without context.
    """
    newest_first: list[RoomEvent] = []
    chars = 0
    token = None
    for _ in range(max_pages):
        page = await client.messages(
            room_id,
            direction="b",
            from_token=token,
            limit=page_size,
            filter={"types": ["m.room.message"]},
        )
        reached_start = False
        for event in page.chunk:
            if event.origin_server_ts < since_ts:
                reached_start = True
                break
            newest_first.append(event)
            body = event.content.get("body")
            if isinstance(body, str):
                chars += len(body)
        if reached_start or page.end is None or chars >= 2 * budget_chars:
            break
        token = page.end
    events = list(reversed(newest_first))
    turns = turns_from_history(events, bot_user_id, command_prefix=command_prefix, stop_at=stop_at)
    return trim_context(turns, budget_chars)
