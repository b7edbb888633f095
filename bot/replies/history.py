"""A chat's conversation rebuilt from its room, and the markers replies carry for it.

The store keeps each chat's turns; when it has lost them, `load_room_context` rebuilds
them from the room itself (the room is the source of truth, as for chats), keeping what
live handling kept (`turns_from_history`), and fits them into the budget with
`bot.backends.context.trim_context`. The replies the bot sends mark what is not an
answer (`STREAMING_KEY`, `FAILED_KEY`) so that a rebuild leaves it out, and
`find_reply` finds a reply a crash left unfinished.

A thread is a conversation of its own (the main timeline's leaves every thread out):
`load_thread_turns` reads it the first time the bot answers in it, from the thread's
root and the ``/relations`` of the root.

Everything here is pure except the ``load_*`` functions, which only read the room.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from matrix_api import MatrixClient
from matrix_api.models import EventID, RoomEvent

from ..backends.context import Turn, trim_context
from ..chats import Chat
from ..commands import forget
from ..commands.parser import CommandError, parse_command
from ..messages import IncomingMessage, in_reply_to, parse_incoming

if TYPE_CHECKING:
    from ..config import Settings

__all__ = [
    "FAILED_KEY",
    "STREAMING_KEY",
    "Decrypt",
    "find_reply",
    "latest_contents",
    "load_room_context",
    "load_room_turns",
    "load_thread_turns",
    "turns_from_history",
]

STREAMING_KEY = "org.surfaces_bot.streaming"
"""Content key set (to true) on a reply while it is still growing; the final edit drops it.

A reply whose latest content still carries it was cut short (a crash mid-stream): it is
not part of the conversation, and the next run completes or replaces it.
"""

FAILED_KEY = "org.surfaces_bot.failed"
"""Content key set (to true) on a reply that reports a failure instead of an answer."""

Decrypt = Callable[[RoomEvent], Awaitable[RoomEvent | None]]
"""An encrypted event's plaintext, or None when it cannot be read (now)."""

# What a thread's context is made of; the rest of its relations (reactions, ...) not.
_CONTEXT_TYPES = frozenset({"m.room.message", "m.room.encrypted"})


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


def _command_name(body: str, prefix: str) -> str | None:
    """The command ``body`` holds as live handling reads it (`parse_command`): its name,
    "" for a malformed one (answered with a hint, so not conversation either), None
    when ``body`` is not a command."""
    try:
        parsed = parse_command(body, prefix)
    except CommandError:
        return ""
    return None if parsed is None else parsed.name


def _answer(replies: Sequence[RoomEvent], replaced: dict[str, dict[str, Any]]) -> str | None:
    """The whole answer the bot's ``replies`` to one message hold (the first one as its
    latest edit, the others continuing a long answer), or None when they do not hold a
    whole answer: one is cut short (streaming), a failure, redacted or not a notice."""
    if not replies:
        return None
    parts: list[str] = []
    for reply in replies:
        if reply.is_redacted:
            return None
        content = replaced.get(reply.event_id, reply.content)
        body = content.get("body")
        if (
            content.get("msgtype") != "m.notice"
            or content.get(STREAMING_KEY)
            or content.get(FAILED_KEY)
            or not isinstance(body, str)
        ):
            return None
        parts.append(body)
    # An answer too long for one event was cut at a paragraph break, mostly.
    return "\n\n".join(parts)


def turns_from_history(
    events: Sequence[RoomEvent],
    chat: Chat,
    settings: Settings,
    *,
    stop_at: str | None = None,
) -> list[Turn]:
    """The conversation held in ``events`` (chronological) as live handling kept it.

    Live handling (`bot.handler`) keeps two turns for each message it answered in
    full, the message and the answer, and ``!forget`` from the chat's owner or an
    admin empties them. The same rules, applied to the room alone:

    * A user turn is a message live handling answers: `bot.messages.parse_incoming`
      (``m.text`` or ``m.emote``, not the bot's, not an edit, not redacted; the
      rich-reply fallback stripped), from a sender ``settings.allowed`` allows, not
      older than the chat (``chat.created_ts``), and not a command as the live parser
      reads it (`bot.commands.parse_command`; a malformed command is not one either).
      A user's later edits do not count: the answer was to the message as sent.
    * It counts only with its whole answer: the bot's ``m.notice`` replies to it (the
      first as the bot's own latest edit of it, the rest the continuation of a long
      answer). No answer (an archived chat, a sender not allowed, a message given
      up), one cut short (`STREAMING_KEY`), a failure (`FAILED_KEY`) or a redacted
      one: live handling kept neither turn, and neither does this. Nothing else the
      bot wrote (greetings, answers to commands) and nothing anyone else wrote (other
      bots' notices, edits of the bot's messages by others) is an assistant turn.
    * ``!forget`` empties the turns before it when its sender may change the chat
      (`Chat.changeable_by`, the rule of the command itself); from anyone else it is
      a refused command and changes nothing.
    * ``stop_at``: the message being answered now; it and the messages after it are
      not context (the bot's answers to earlier messages may come after it).
    * Messages in a thread are the thread's conversation, not the main timeline's.

    A redacted message (the server serves it with an empty content and
    ``redacted_because``) is no turn, and neither is the bot's answer to it: live
    handling takes the exchange out of the conversation when the redaction comes.
    """
    return [turn for turn, _ in _sourced_turns(events, chat, settings, stop_at=stop_at)]


def _user_message(event: RoomEvent, chat: Chat, settings: Settings) -> IncomingMessage | None:
    """``event`` as a message live handling answers from the chat's users, or None."""
    if event.origin_server_ts < chat.created_ts:
        return None
    # Content is whatever the sending server let through: any JSON type.
    if not isinstance(event.content.get("msgtype"), str):
        return None
    message = parse_incoming(event, settings.user_id)
    if message is None or not settings.allowed.allows(message.sender):
        return None
    return message


def _sourced_turns(
    events: Sequence[RoomEvent],
    chat: Chat,
    settings: Settings,
    *,
    stop_at: str | None,
    thread: str | None = None,
    start: Sequence[tuple[Turn, str]] = (),
) -> list[tuple[Turn, str]]:
    """`turns_from_history`, each turn with the id of the message of its exchange;
    only the messages in ``thread`` (None: in the main timeline) count, after the
    turns it ``start``s with (which a ``!forget`` drops too)."""
    bot = settings.user_id
    replaced = latest_contents(events)
    answers: dict[str, list[RoomEvent]] = {}
    for event in events:
        if event.sender != bot or event.type != "m.room.message":
            continue
        target = in_reply_to(event)
        if target is not None and _replacement_target(event) is None:
            answers.setdefault(target, []).append(event)
    turns = list(start)
    for event in events:
        if stop_at is not None and event.event_id == stop_at:
            break
        message = _user_message(event, chat, settings)
        if message is None or message.thread_root != thread:
            continue
        command = _command_name(message.body, settings.command_prefix)
        if command is not None:
            if command == forget.COMMAND.name and chat.changeable_by(
                message.sender, settings.admins
            ):
                turns.clear()
            continue
        answer = _answer(answers.get(message.event_id, ()), replaced)
        if answer is not None:
            turns.append((Turn("user", message.body), message.event_id))
            turns.append((Turn("assistant", answer), message.event_id))
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
    chat: Chat,
    settings: Settings,
    *,
    budget_chars: int,
    stop_at: EventID | None = None,
    page_size: int = 100,
    max_pages: int = 10,
) -> list[Turn]:
    """Rebuild ``chat``'s conversation from its room, within ``budget_chars``.

    Pages back through ``/messages`` from the newest event until the messages read
    hold about twice the budget (edits and commands are read too), an event older
    than the chat (``chat.created_ts``) appears, the room's start is reached, or
    ``max_pages`` pages were read. The turns are those live handling would have kept
    (`turns_from_history`: ``settings.allowed``, the chat's owner and admins for
    ``!forget``, the command prefix). ``stop_at`` is the message being answered: it
    and what follows it are not context. Raises `matrix_api.MatrixAPIError` when the
    room cannot be read; the caller decides whether to answer without context.
    """
    turns, _ = await load_room_turns(
        client,
        chat,
        settings,
        budget_chars=budget_chars,
        stop_at=stop_at,
        page_size=page_size,
        max_pages=max_pages,
    )
    return turns


async def load_room_turns(
    client: MatrixClient,
    chat: Chat,
    settings: Settings,
    *,
    budget_chars: int,
    stop_at: EventID | None = None,
    decrypt: Decrypt | None = None,
    page_size: int = 100,
    max_pages: int = 10,
) -> tuple[list[Turn], list[str]]:
    """`load_room_context`, and for each turn the id of the message of its exchange
    (stored with it, so that a later redaction of that message takes it out).
    ``decrypt`` reads an encrypted room's events; without it they are left out."""
    types = ["m.room.message", "m.room.encrypted"] if decrypt else ["m.room.message"]
    read = _Reading(decrypt, budget_chars)
    token = None
    for _ in range(max_pages):
        page = await client.messages(
            chat.room_id,
            direction="b",
            from_token=token,
            limit=page_size,
            filter={"types": types},
        )
        reached_start = False
        for event in page.chunk:
            if event.origin_server_ts < chat.created_ts:
                reached_start = True
                break
            await read.take(event)
        if reached_start or page.end is None or read.enough:
            break
        token = page.end
    sourced = _sourced_turns(read.chronological(), chat, settings, stop_at=stop_at)
    return _within_budget(sourced, budget_chars)


def _within_budget(
    sourced: list[tuple[Turn, str]], budget_chars: int
) -> tuple[list[Turn], list[str]]:
    """The turns `trim_context` keeps of ``sourced``, and the message id of each."""
    # `trim_context` keeps some of the same Turn objects: found again by identity.
    source = {id(turn): event_id for turn, event_id in sourced}
    kept = trim_context([turn for turn, _ in sourced], budget_chars)
    return kept, [source[id(turn)] for turn in kept]


async def load_thread_turns(
    client: MatrixClient,
    chat: Chat,
    settings: Settings,
    root: EventID,
    *,
    budget_chars: int,
    stop_at: EventID | None = None,
    decrypt: Decrypt | None = None,
    page_size: int = 100,
    max_pages: int = 10,
) -> tuple[list[Turn], list[str]]:
    """The conversation of the thread rooted at ``root`` as the room shows it, within
    ``budget_chars``, and for each turn the id of the message of its exchange.

    It begins with the root: the user's message (a turn of its own: the bot answered
    it, if at all, in the main timeline), or the bot's whole answer with the message
    it answers (a thread started on an answer goes on from that exchange). Then the
    exchanges in the thread, by `turns_from_history`'s rules, read from the root's
    relations at any depth (so the bot's edits of its streamed answers come too), newest
    first until about twice the budget or ``max_pages`` pages. ``decrypt`` reads an
    encrypted room's events; without it they are left out. Raises
    `matrix_api.MatrixAPIError` when the room cannot be read.
    """
    read = _Reading(decrypt, budget_chars)
    token: str | None = None
    for _ in range(max_pages):
        page = await client.relations(
            chat.room_id, root, from_token=token, limit=page_size, recurse=True
        )
        for event in page.chunk:
            await read.take(event)
        if page.next_batch is None or read.enough:
            break
        token = page.next_batch
    events = read.chronological()
    root_event = await _readable(await client.get_event(chat.room_id, root), decrypt)
    seed: list[tuple[Turn, str]] = []
    if root_event is not None:
        replaced = latest_contents([root_event, *events])
        seed = await _thread_start(client, chat, settings, root_event, replaced, decrypt)
    sourced = _sourced_turns(events, chat, settings, stop_at=stop_at, thread=root, start=seed)
    return _within_budget(sourced, budget_chars)


async def _thread_start(
    client: MatrixClient,
    chat: Chat,
    settings: Settings,
    root: RoomEvent,
    replaced: dict[str, dict[str, Any]],
    decrypt: Decrypt | None,
) -> list[tuple[Turn, str]]:
    """The turns a thread rooted at ``root`` starts with (`load_thread_turns`)."""
    if root.sender != settings.user_id:
        message = _question(root, chat, settings)
        return [] if message is None else [(Turn("user", message.body), root.event_id)]
    answer = _answer([root], replaced)
    question_id = in_reply_to(root)
    if answer is None or question_id is None:
        return []
    question_event = await _readable(
        await client.get_event(chat.room_id, EventID(question_id)), decrypt
    )
    question = None if question_event is None else _question(question_event, chat, settings)
    if question is None:
        return []
    return [(Turn("user", question.body), question_id), (Turn("assistant", answer), question_id)]


def _question(event: RoomEvent, chat: Chat, settings: Settings) -> IncomingMessage | None:
    """``event`` as a thread's starting question: a message from the chat's users in
    the main timeline, and not a command."""
    message = _user_message(event, chat, settings)
    if message is None or message.thread_root is not None:
        return None
    if _command_name(message.body, settings.command_prefix) is not None:
        return None
    return message


class _Reading:
    """The events read back from a room, newest first, as context reads them."""

    def __init__(self, decrypt: Decrypt | None, budget_chars: int) -> None:
        self._decrypt = decrypt
        self._budget_chars = budget_chars
        self._newest_first: list[RoomEvent] = []
        self._chars = 0

    async def take(self, event: RoomEvent) -> None:
        readable = await _readable(event, self._decrypt)
        if readable is None:
            return
        self._newest_first.append(readable)
        body = readable.content.get("body")
        if isinstance(body, str):
            self._chars += len(body)

    @property
    def enough(self) -> bool:
        """Whether the text read is about twice the budget (edits and commands count
        too, and trimming keeps whole exchanges): reading further would be thrown away."""
        return self._chars >= 2 * self._budget_chars

    def chronological(self) -> list[RoomEvent]:
        return list(reversed(self._newest_first))


async def _readable(event: RoomEvent, decrypt: Decrypt | None) -> RoomEvent | None:
    """``event`` as context reads it: decrypted when it is encrypted, None when it
    cannot be, or when it is no message at all."""
    if event.type not in _CONTEXT_TYPES:
        return None
    if event.type == "m.room.encrypted":
        return None if decrypt is None else await decrypt(event)
    return event
