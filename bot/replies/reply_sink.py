"""Showing a backend's reply in a room: typing, a growing notice, the final answer.

`open_reply_sink` gives a `MatrixReplySink`, the `ReplySink` the handler hands to a
`StreamingBackend`:

* ``typing(on)`` sets the bot's typing notice (failures are logged, never raised);
* ``partial(text)`` goes through an `EditThrottler`: the first one sends the reply (a
  rich-reply ``m.notice`` marked with `STREAMING_KEY`), later ones edit it
  (``m.replace`` with ``m.new_content``), at most one per ``edit_interval_s``;
* `MatrixReplySink.finish` sends the whole answer once: as the final edit of the reply
  when one was started, else as the reply itself; Markdown becomes ``formatted_body``;
  an answer longer than one event allows continues in further notices, at most
  ``max_parts`` events in all: past that the answer is cut, and its last event ends
  with a note saying so (``[answer cut: longer than N messages]``).
* `MatrixReplySink.fail` ends a reply that has no answer with the user message (after
  the partial text, when some was shown).

Crash safety: the reply itself is sent with the handler's transaction id (derived from
the event answered, purpose ``reply``), and so is each further part (``part<n>``), so
re-handling the same message after a crash never posts a second answer: the re-run gets
the same reply event back and edits it. Edits use fresh transaction ids (a re-run's text
differs; the newest edit is what clients show), and the final edit is the last one sent.
A reply started before the crash is passed back as ``existing_event_id`` so that the
re-run edits it even when the server has forgotten the transaction;
`bot.replies.history.find_reply` finds it in the room when the store lost it.
A failure notice (`MatrixReplySink.fail`) is marked with `FAILED_KEY`, so a rebuilt
context leaves it out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, NoReturn

import msgspec
import structlog
import trio
from trio_util import RepeatedEvent

from matrix_api import MatrixAPIError, MatrixClient, new_txn_id
from matrix_api.models import EventID, RoomID

from ..backends.bounded_read import cut_note
from ..messages import mentions, notice, reply_txn_id
from .history import FAILED_KEY, STREAMING_KEY
from .markdown import DEFAULT_PART_BYTES, formatted_or_none, split_message
from .throttle import EditThrottler, open_edit_throttler

__all__ = [
    "DEFAULT_MAX_PARTS",
    "MAX_CONTENT_BYTES",
    "MatrixReplySink",
    "edit_content",
    "message_content",
    "open_reply_sink",
]

log = structlog.get_logger("bot.replies.reply_sink")

# A backend that answers within this long shows no typing notice at all: two typing
# requests per message cost more than the notice is worth for a quick answer.
TYPING_DELAY_S = 1.0
MAX_CONTENT_BYTES = 60_000
"""Largest event content sent (the whole event, signatures included, must stay under
65,536 bytes); past it the HTML is dropped, the plain body is always kept."""
_FALLBACK_CHARS = 1_000
DEFAULT_MAX_PARTS = 16
"""The most events one answer becomes (16 x 30 KB: an answer of 100,000 characters of
any script fits)."""

OnStarted = Callable[[EventID], Awaitable[None]]


def _size(content: dict[str, Any]) -> int:
    return len(msgspec.json.encode(content))


def _formatted(body: str) -> dict[str, Any]:
    # An answer mentions no one: a name in it notifies nobody.
    content: dict[str, Any] = {"msgtype": "m.notice", "body": body, "m.mentions": mentions()}
    html = formatted_or_none(body)
    if html is not None:
        content["format"] = "org.matrix.custom.html"
        content["formatted_body"] = html
    return content


def message_content(
    body: str,
    *,
    reply_to: EventID | None,
    streaming: bool = False,
    thread: EventID | None = None,
) -> dict[str, Any]:
    """A reply notice holding ``body`` (Markdown rendered), within `MAX_CONTENT_BYTES`,
    in the thread rooted at ``thread`` if given."""
    rendered = _formatted(body)
    content = notice(
        body, reply_to=reply_to, formatted_body=rendered.get("formatted_body"), thread=thread
    )
    if _size(content) > MAX_CONTENT_BYTES:
        content = notice(body, reply_to=reply_to, thread=thread)
    if streaming:
        content[STREAMING_KEY] = True
    return content


def edit_content(original: EventID, body: str, *, streaming: bool = False) -> dict[str, Any]:
    """An edit (``m.replace``) of ``original`` to ``body`` (Markdown rendered).

    An edit carries no thread relation (an event has one relation): a reply in a
    thread stays there through its edits.

    The top-level ``body`` is the ``* ...`` fallback of clients without edits; it is
    shortened, then the HTML dropped, to keep within `MAX_CONTENT_BYTES`.
    """
    new_content = _formatted(body)
    if streaming:
        new_content[STREAMING_KEY] = True
    content: dict[str, Any] = {
        "msgtype": "m.notice",
        "body": f"* {body}",
        # Those the edit newly mentions (none): an edit never notifies anyone again.
        "m.mentions": mentions(),
        "m.new_content": new_content,
        "m.relates_to": {"rel_type": "m.replace", "event_id": original},
    }
    if "formatted_body" in new_content:
        content["format"] = new_content["format"]
        content["formatted_body"] = f"* {new_content['formatted_body']}"
    if _size(content) > MAX_CONTENT_BYTES:
        content.pop("format", None)
        content.pop("formatted_body", None)
        if len(body) > _FALLBACK_CHARS:
            content["body"] = f"* {body[:_FALLBACK_CHARS]}…"
    if _size(content) > MAX_CONTENT_BYTES:
        new_content.pop("format", None)
        new_content.pop("formatted_body", None)
    return content


class MatrixReplySink:
    """The reply to one message, as it grows; made by `open_reply_sink`."""

    def __init__(
        self,
        client: MatrixClient,
        room_id: RoomID,
        reply_to: EventID,
        *,
        thread: EventID | None = None,
        existing_event_id: EventID | None = None,
        on_started: OnStarted | None = None,
        part_bytes: int = DEFAULT_PART_BYTES,
        typing_timeout_ms: int = 120_000,
        max_parts: int = DEFAULT_MAX_PARTS,
    ) -> None:
        if max_parts < 1:
            raise ValueError("max_parts must be at least 1")
        self.client = client
        self.room_id = room_id
        self.reply_to = reply_to
        self.thread = thread
        """The root of the thread the reply goes in; None: the main timeline."""
        self.event_id: EventID | None = existing_event_id
        """The reply being shown (the first part of the answer), once there is one."""
        self.event_ids: list[EventID] = []
        """Every event of the final answer, in order (after `finish`)."""
        self.shown = ""
        """The text last shown by a partial edit."""
        self._on_started = on_started
        self._part_bytes = part_bytes
        self._max_parts = max_parts
        self._typing_timeout_ms = typing_timeout_ms
        self._typing = False
        """Whether the backend is waiting (what `typing` was told last)."""
        self._typing_shown = False
        """Whether the room was told the bot is typing (and not told otherwise since)."""
        self._typing_wanted = RepeatedEvent()
        self._typing_requests = trio.Lock()
        self._throttler: EditThrottler | None = None
        self._failed = False

    @property
    def partial_edits(self) -> int:
        """Updates shown before the final answer (the first of them sent the reply)."""
        return self._throttler.partial_edits if self._throttler is not None else 0

    # -- ReplySink ----------------------------------------------------------------------

    async def partial(self, text: str) -> None:
        assert self._throttler is not None, "use open_reply_sink"
        await self._throttler.update(text)

    async def typing(self, on: bool) -> None:
        """The room sees the bot typing only once the backend has waited
        `TYPING_DELAY_S`: an answer quicker than that costs no typing requests."""
        if on == self._typing:
            return
        self._typing = on
        if on:
            self._typing_wanted.set()
        elif self._typing_shown:
            await self._set_typing(False)

    async def _typist(self) -> NoReturn:
        """Shows the typing notice when the backend is still waiting after the delay."""
        while True:
            if not self._typing or self._typing_shown:
                await self._typing_wanted.wait()
                continue
            await trio.sleep(TYPING_DELAY_S)
            if self._typing and not self._typing_shown:
                await self._set_typing(True)

    async def _set_typing(self, on: bool) -> None:
        # One request at a time, so that "off" never overtakes the "on" before it.
        async with self._typing_requests:
            self._typing_shown = on
            try:
                await self.client.set_typing(self.room_id, on, timeout_ms=self._typing_timeout_ms)
            except MatrixAPIError as exc:
                log.warning("typing_failed", on=on, error=str(exc))

    # -- the end of the reply -----------------------------------------------------------

    async def finish(self, answer: str) -> list[EventID]:
        """Show ``answer`` as the whole reply; the events holding it, in order.

        Raises `MatrixAPIError` when it cannot be sent (the caller's retry re-sends it
        with the same transaction ids).
        """
        assert self._throttler is not None, "use open_reply_sink"
        await self.typing(False)
        await self._throttler.finish(answer)
        return self.event_ids

    async def fail(self, user_message: str, partial: str = "") -> EventID:
        """End the reply with ``user_message``: appended to ``partial`` (the text the
        backend had when it failed) or to what was shown, as the reply's final edit, or
        sent as the reply when none was started. Raises `MatrixAPIError`."""
        self._failed = True
        shown = partial or self.shown
        text = f"{shown.rstrip()}\n\n⚠️ {user_message}" if shown.strip() else user_message
        ids = await self.finish(split_message(text, self._part_bytes)[0])
        return ids[0]

    # -- sending ------------------------------------------------------------------------

    async def _send(self, text: str, final: bool) -> None:
        if final:
            await self._send_final(text)
            return
        head = split_message(text, self._part_bytes)[0]
        try:
            await self._show(head, streaming=True)
        except MatrixAPIError as exc:
            # A partial edit is only a preview: the final edit carries the answer.
            log.warning("partial_edit_failed", error=str(exc))
            return
        self.shown = text

    async def _show(self, body: str, *, streaming: bool) -> None:
        """Send the reply with ``body``, or edit it to ``body`` when there is one."""
        if self.event_id is None:
            content = message_content(
                body, reply_to=self.reply_to, streaming=streaming, thread=self.thread
            )
            if self._failed:
                content[FAILED_KEY] = True
            event_id = await self.client.send_event(
                self.room_id, "m.room.message", content, txn_id=reply_txn_id(self.reply_to)
            )
            self.event_id = event_id
            if self._on_started is not None:
                await self._on_started(event_id)
            return
        content = edit_content(self.event_id, body, streaming=streaming)
        if self._failed:
            content["m.new_content"][FAILED_KEY] = True
        await self.client.send_event(self.room_id, "m.room.message", content, txn_id=new_txn_id())

    def _parts(self, answer: str) -> list[str]:
        """``answer`` as at most ``max_parts`` event bodies; cut with a note past that.

        Only the head that can fill ``max_parts`` events is split (a part holds at most
        ``part_bytes`` bytes, so at most as many characters): a huge answer costs no more.
        """
        most = self._max_parts
        head = answer[: most * self._part_bytes + 1]
        parts = split_message(head, self._part_bytes)
        if len(parts) <= most:
            return parts
        note = cut_note(f"longer than {most} messages")
        parts = parts[:most]
        room = self._part_bytes - len(f"\n\n{note}".encode())
        last = split_message(parts[-1], max(room, 64))[0]
        parts[-1] = f"{last.rstrip()}\n\n{note}"
        log.warning("reply_cut", parts=most, chars=len(answer))
        return parts

    async def _send_final(self, answer: str) -> None:
        parts = self._parts(answer)
        await self._show(parts[0], streaming=False)
        assert self.event_id is not None
        self.event_ids = [self.event_id]
        for index, part in enumerate(parts[1:], start=1):
            event_id = await self.client.send_event(
                self.room_id,
                "m.room.message",
                message_content(part, reply_to=self.reply_to, thread=self.thread),
                txn_id=reply_txn_id(self.reply_to, f"part{index}"),
            )
            self.event_ids.append(event_id)
        log.info(
            "reply_sent",
            parts=len(parts),
            partial_edits=self.partial_edits,
            chars=len(answer),
        )


@asynccontextmanager
async def open_reply_sink(
    client: MatrixClient,
    room_id: RoomID,
    reply_to: EventID,
    *,
    edit_interval_s: float,
    thread: EventID | None = None,
    existing_event_id: EventID | None = None,
    on_started: OnStarted | None = None,
    part_bytes: int = DEFAULT_PART_BYTES,
    typing_timeout_ms: int = 120_000,
    max_parts: int = DEFAULT_MAX_PARTS,
) -> AsyncIterator[MatrixReplySink]:
    """A `MatrixReplySink` for the reply to ``reply_to``, for the ``async with`` block.

    ``thread``: the root of the thread the reply goes in (that of ``reply_to``).
    ``on_started(event_id)`` is awaited once the reply exists (record it: it is the
    ``existing_event_id`` of a re-run after a crash). Leaving the block without
    `MatrixReplySink.finish` or `MatrixReplySink.fail` stops the partial edits and leaves
    the reply as it is (marked as streaming: a re-run completes it).
    """
    sink = MatrixReplySink(
        client,
        room_id,
        reply_to,
        thread=thread,
        existing_event_id=existing_event_id,
        on_started=on_started,
        part_bytes=part_bytes,
        typing_timeout_ms=typing_timeout_ms,
        max_parts=max_parts,
    )
    async with (
        open_edit_throttler(sink._send, edit_interval_s) as throttler,
        trio.open_nursery() as nursery,
    ):
        sink._throttler = throttler
        nursery.start_soon(sink._typist)
        try:
            yield sink
        finally:
            nursery.cancel_scope.cancel()
