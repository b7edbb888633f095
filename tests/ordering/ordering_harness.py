"""Running the bot against `FakeHomeserver` under the mock clock, and reading the order back.

Why the heartbeat: should a store call outlast the autojump threshold (see conftest.py), the
clock jumps to the next deadline while the call is in its worker thread; a heartbeat keeps that
deadline near, so such a jump can never reach the test's own time limit.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, MutableMapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import trio
from trio_util import periodic

from bot.backends import Backend, EchoBackend
from bot.chats import Chat
from bot.config import AllowList, Settings
from bot.runtime import BotRuntime, Phase
from bot.store import NewInboxItem, Store
from fake_homeserver import ALICE, BASE_TS, BOT, HOMESERVER, Call, FakeHomeserver
from matrix_api import MatrixClient
from matrix_api.models import EventID, RoomEvent, RoomID, SyncToken

__all__ = [
    "CHAT_TS",
    "LIMIT_S",
    "Logs",
    "RunningBot",
    "bot_parts",
    "chat",
    "log_events",
    "make_settings",
    "only_log",
    "reply_to",
    "running_bot",
    "seed_store",
    "ticking",
    "until_handled",
]

Logs = list[MutableMapping[str, Any]]
"""What `structlog.testing.capture_logs` collects."""

# Virtual seconds a test may take before it fails instead of hanging.
LIMIT_S = 900.0
HEARTBEAT_S = 10.0
CHAT_TS = BASE_TS - 86_400_000


def make_settings(tmp_path: Path) -> Settings:
    return Settings(
        homeserver=HOMESERVER,
        user_id=BOT,
        access_token="tok",
        store_path=tmp_path / "s.sqlite3",
        allowed=AllowList(servers=frozenset({"hs.test"})),
        drain_timeout_s=5,
    )


def chat(chat_id: str, room_id: str, *, title: str | None = None, owner: str = ALICE) -> Chat:
    """A chat created a day before the scripted events (so they are not history to it)."""
    return Chat(
        chat_id=chat_id,
        room_id=RoomID(room_id),
        owner=owner,
        title=title if title is not None else f"Chat {chat_id}",
        created_ts=CHAT_TS,
    )


async def seed_store(
    path: Path,
    *,
    chats: Sequence[Chat] = (),
    token: str | None = None,
    inbox: Sequence[tuple[str, dict[str, Any]]] = (),
) -> None:
    """Leave a store behind as a previous run would: chats, a sync token, inbox items
    (room id, event as /sync delivered it) still waiting to be handled."""
    store = await Store.open(path, BOT)
    try:
        if chats:
            await store.apply_chats(put=chats)
        if token is not None:
            items = [
                NewInboxItem(
                    EventID(event["event_id"]),
                    RoomID(room_id),
                    "message",
                    msgspec.convert({**event, "room_id": room_id}, RoomEvent),
                )
                for room_id, event in inbox
            ]
            await store.commit_sync_batch(SyncToken(token), items)
        else:
            assert not inbox, "inbox items come with the sync token of their batch"
    finally:
        await store.aclose()


async def _heartbeat() -> None:
    async for _ in periodic(HEARTBEAT_S):
        pass


@asynccontextmanager
async def ticking(limit_s: float = LIMIT_S) -> AsyncIterator[trio.Nursery]:
    """A heartbeat for the autojump clock (see the module docstring) and a bound on the
    virtual time the block may take; yields a nursery for the caller's own tasks, which
    must have finished when the block ends."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_heartbeat)
        with trio.fail_after(limit_s):
            async with trio.open_nursery() as tasks:
                yield tasks
        nursery.cancel_scope.cancel()


@dataclass
class RunningBot:
    runtime: BotRuntime
    store: Store

    async def stop(self) -> None:
        """Stop gracefully and wait until the runtime has stopped (the store stays open)."""
        self.runtime.request_stop()
        await self.runtime.phase.wait_value(Phase.STOPPED)


@asynccontextmanager
async def bot_parts(
    settings: Settings, hs: FakeHomeserver, backend: Backend | None = None
) -> AsyncIterator[tuple[BotRuntime, Store]]:
    """A runtime (not started) on a client of ``hs`` and an open store; closes both.

    The backend is echo unless ``backend`` is given. Whatever runs the runtime must have
    finished before the block ends.
    """
    async with MatrixClient(
        settings.homeserver,
        access_token=settings.access_token,
        user_id=settings.user_id,
        transport=hs.transport(),
    ) as client:
        store = await Store.open(settings.store_path, settings.user_id)
        try:
            runtime = BotRuntime(
                settings, client, store, backend or EchoBackend(), rng=random.Random(7)
            )
            yield runtime, store
        finally:
            with trio.CancelScope(shield=True):
                await store.aclose()


@asynccontextmanager
async def running_bot(
    settings: Settings,
    hs: FakeHomeserver,
    *,
    before_start: Callable[[BotRuntime], None] | None = None,
    backend: Backend | None = None,
) -> AsyncIterator[RunningBot]:
    """The bot against ``hs`` (with ``backend``, echo by default), ready (reconciled,
    taking messages) for the block.

    The runtime is stopped gracefully when the block ends, if the block did not stop it;
    the store is closed after the runtime has stopped.
    """
    async with ticking(), bot_parts(settings, hs, backend) as (runtime, store):
        if before_start is not None:
            before_start(runtime)
        async with trio.open_nursery() as nursery:
            await nursery.start(runtime.run)
            bot = RunningBot(runtime, store)
            yield bot
            await bot.stop()


async def until_handled(store: Store, *event_ids: str) -> None:
    """Wait, in virtual time, until ``store`` records each of ``event_ids`` as handled.

    Neither a reply nor a read receipt says so: the store records an event after its
    reply was sent, and a replied event gets no receipt.
    """
    # No polling: a virtual wait that is not a deadline costs no wall time, so a
    # broken order fails at the test's time limit within seconds, not minutes.
    while not all([await store.handled_outcome(event_id) for event_id in event_ids]):
        await store.wait_for_change()


def reply_to(event_id: str) -> Callable[[Call], bool]:
    """Matches the bot's reply to ``event_id``."""

    def matches(call: Call) -> bool:
        relates = call.body.get("m.relates_to", {}) if isinstance(call.body, dict) else {}
        return call.endpoint == "send" and relates.get("m.in_reply_to", {}).get("event_id") == (
            event_id
        )

    return matches


def log_events(logs: Logs) -> list[str]:
    return [entry["event"] for entry in logs]


def only_log(logs: Logs, event: str) -> tuple[int, MutableMapping[str, Any]]:
    """The one log entry named ``event`` and its position; fails unless there is exactly one."""
    found = [(index, entry) for index, entry in enumerate(logs) if entry["event"] == event]
    assert len(found) == 1, f"expected one {event!r} log entry, got {len(found)}"
    return found[0]
