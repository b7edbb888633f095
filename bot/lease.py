"""Active/standby (issue 22): one bot takes messages per store, the others wait.

The lease is the PostgreSQL store's session advisory lock (`bot.store_postgres`):
whoever holds it is the active instance. A standby (``BOT_STANDBY``) is a bot whose
store opening waits for that lock; once it has it, it starts exactly as after a
restart (a new client, store, runtime: authenticate, full-state sync, reconcile,
ready), so nothing from before it held the lock is used.

The active instance watches its lease (`watch_lease`) and stops at once, without a
drain, when it is lost: no lane takes another job and nothing more is sent.

* Another bot holds the store now (`StoreDeposed` from any store call, or from the
  watch's own round trip every `LEASE_CHECK_S`): found within about a second of the
  connection being cut, since a store that reconnects finds the other's session.
* The lease cannot be confirmed for `LEASE_BOUND_S` (a partition: the server cannot
  be reached): the server drops the lost session, and with it the lock, at the
  earliest about 25 s after the last packet it got (the store's keepalives, 10 s +
  3 x 5 s), so a bot that stops after 20 s without a confirmation has stopped before
  a standby can get the lock.

A reply sent by the deposed instance in the moment before it noticed is sent again
by the new one under the same transaction id (`bot.messages.reply_txn_id`, derived
from the message; the same device), and the homeserver returns the first event.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import structlog
import trio

from .store import StoreError, StoreUnavailable

__all__ = ["LEASE_BOUND_S", "LEASE_CHECK_S", "Deposed", "LeasedStore", "watch_lease"]

log = structlog.get_logger("bot.lease")

LEASE_CHECK_S = 1.0
LEASE_BOUND_S = 20.0


class Deposed(StoreError):
    """This bot no longer holds its store: another instance took over. It stopped
    taking and sending messages when it noticed (the message says how)."""


@runtime_checkable
class LeasedStore(Protocol):
    """A store whose hold can be lost while it is open (PostgreSQL's; SQLite's
    ``flock`` is held until the process ends)."""

    @property
    def deposed(self) -> bool: ...
    async def check_lease(self) -> None: ...
    async def wait_for_change(self) -> None: ...


async def watch_lease(
    store: LeasedStore,
    lost: Callable[[str], None],
    *,
    check_every_s: float = LEASE_CHECK_S,
    bound_s: float = LEASE_BOUND_S,
) -> None:
    """Call ``lost(reason)`` once, and return, when ``store`` is taken over or its
    lease goes unconfirmed for ``bound_s``; runs until then (cancel it to stop).

    Every store call that ends is looked at (one of them may have found the store
    taken over); with none for ``check_every_s``, the watch asks the server itself.
    Its question runs beside the clock: a call hanging on a cut connection does not
    hold up the bound.
    """
    confirmed_at = trio.current_time()
    reason: str | None = None

    async def confirm() -> None:
        nonlocal confirmed_at
        while True:
            try:
                await store.check_lease()
            except StoreUnavailable as exc:
                if store.deposed:
                    return
                log.warning("lease_unconfirmed", error=str(exc))
            else:
                confirmed_at = trio.current_time()
            await trio.sleep(check_every_s)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(confirm)
        while reason is None:
            with trio.move_on_after(check_every_s):
                await store.wait_for_change()
            if store.deposed:
                reason = "another instance holds the store now"
            elif trio.current_time() - confirmed_at > bound_s:
                reason = f"the lease could not be confirmed for {bound_s:.0f} s"
        nursery.cancel_scope.cancel()
        lost(reason)
