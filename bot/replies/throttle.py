"""At most one edit per interval: showing a growing answer without flooding the room.

A streamed answer grows by a token at a time; editing the reply for each would hit the
homeserver's rate limits and flicker in clients. `EditThrottler` keeps only the newest
text and sends it when the interval since the previous edit has passed; `finish` sends
the one final edit holding the whole answer (also no sooner than the interval allows).

The sending runs in a task of its own (`run`, or `open_edit_throttler` which starts it),
so `update` never waits for the network: a slow room does not stall the stream.

    async with open_edit_throttler(send_edit, interval_s=1.5) as throttle:
        async for text in answer_so_far:
            await throttle.update(text)
        await throttle.finish(answer)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

__all__ = ["EditThrottler", "SendEdit", "open_edit_throttler"]

SendEdit = Callable[[str, bool], Awaitable[None]]
"""``send_edit(text, final)``: show ``text``; ``final`` is True once, for the whole answer."""


class EditThrottler:
    """Coalesces updates so that ``send_edit`` starts at most once per ``interval_s``.

    The first update is sent at once; later ones wait out the interval, and only the
    newest text waiting then is sent (an unchanged text is not sent again). `finish`
    stops the partial edits, waits for one in flight, waits out the interval, and sends
    the final text with ``final=True``: every answer ends with exactly one final edit.
    An error from a partial ``send_edit`` propagates out of `run` (and so out of the
    nursery): a sender that can live without one edit catches its own errors.
    """

    def __init__(self, send_edit: SendEdit, interval_s: float) -> None:
        if interval_s < 0:
            raise ValueError("interval_s must not be negative")
        self._send = send_edit
        self.interval_s = interval_s
        self._pending: str | None = None
        self._last_sent: str | None = None
        self._next_at = -float("inf")
        self._wake = trio.Event()
        self._finishing = False
        self._sleep_scope: trio.CancelScope | None = None
        self._stopped = trio.Event()
        self._running = False
        self._run_scope = trio.CancelScope()
        self.partial_edits = 0
        """Partial edits sent so far (the final one not counted)."""
        self.finished = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send the partial edits until `finish` or `close`. Run it in a nursery."""
        self._running = True
        try:
            with self._run_scope:
                task_status.started()
                while not self._is_finishing():
                    await self._wake.wait()
                    if self._is_finishing():
                        break
                    self._wake = trio.Event()
                    with trio.CancelScope() as self._sleep_scope:
                        await trio.sleep_until(self._next_at)
                    self._sleep_scope = None
                    if self._is_finishing():
                        break
                    text = self._pending
                    if text is None or text == self._last_sent:
                        continue
                    await self._send_now(text, final=False)
                    self.partial_edits += 1
        finally:
            self._stopped.set()

    def _is_finishing(self) -> bool:
        # A method, not the attribute: `finish` flips it while `run` awaits.
        return self._finishing

    async def _send_now(self, text: str, *, final: bool) -> None:
        started = trio.current_time()
        await self._send(text, final)
        self._last_sent = text
        self._next_at = started + self.interval_s

    async def update(self, text: str) -> None:
        """The answer so far is ``text``; it will be shown when the interval allows."""
        if self._finishing:
            return
        self._pending = text
        self._wake.set()

    async def finish(self, text: str) -> None:
        """Stop partial edits and send ``text`` as the final edit (once).

        Waits for an edit in flight, then for the rest of the interval. Calling it again
        does nothing; an update after it is ignored.
        """
        if self._finishing:
            return
        self._finishing = True
        self._wake.set()
        if self._sleep_scope is not None:
            self._sleep_scope.cancel()
        if self._running:
            await self._stopped.wait()
        await trio.sleep_until(self._next_at)
        await self._send_now(text, final=True)
        self.finished = True

    def close(self) -> None:
        """Stop `run` now, an edit in flight included (for when the answer failed)."""
        self._finishing = True
        self._run_scope.cancel()


@asynccontextmanager
async def open_edit_throttler(
    send_edit: SendEdit, interval_s: float
) -> AsyncIterator[EditThrottler]:
    """An `EditThrottler` whose sending task runs for the ``async with`` block.

    Leaving the block without `EditThrottler.finish` (an error, a cancellation) stops
    the partial edits; nothing final is sent then. An error raised in the block, or by a
    partial ``send_edit``, propagates unwrapped.
    """
    throttler = EditThrottler(send_edit, interval_s)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(throttler.run)
            try:
                yield throttler
            finally:
                throttler.close()
    except BaseExceptionGroup as group:
        # The block's own error (or the sender's) comes out as itself, not wrapped in
        # the nursery's group: callers catch `BackendError` and `MatrixAPIError` as usual.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
