"""Driving the bot against the real Synapse: the bot in-process, a person as a client."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import trio

from bot.backends import Backend
from bot.backends.model import ModelSettings
from bot.config import AllowList, Settings
from bot.runtime import BotRuntime, run_bot
from fake_openai import API_KEY as OPENAI_API_KEY
from fake_openai import FakeOpenAI
from matrix_api import MatrixClient, new_txn_id
from matrix_api.models import RoomEvent, RoomID, SyncToken
from matrix_api.testing.synapse import RegisteredUser, SynapseServer

DELIVERY_BURST = 100_000
"""A per-user burst no test reaches (the per-user limit has tests of its own)."""


def bot_process_env(
    synapse: SynapseServer, bot_user: RegisteredUser, store_path: Path, **extra: str
) -> dict[str, str]:
    """The environment of a ``python -m bot`` process for ``bot_user`` (JSON logs)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MATRIX_", "BOT_"))}
    env.update(
        MATRIX_HOMESERVER=synapse.base_url,
        MATRIX_USER_ID=bot_user.user_id,
        MATRIX_ACCESS_TOKEN=bot_user.access_token,
        BOT_STORE_PATH=str(store_path),
        BOT_LOG_FORMAT="json",
        # These tests count deliveries, not fairness: no user runs out of messages.
        BOT_USER_MESSAGES_BURST=str(DELIVERY_BURST),
    )
    env.update(extra)
    return env


def bot_settings(
    synapse: SynapseServer, bot_user: RegisteredUser, store_path: Path, **overrides: Any
) -> Settings:
    settings = Settings(
        homeserver=synapse.base_url,
        user_id=bot_user.user_id,
        access_token=bot_user.access_token,
        device_id=bot_user.device_id,
        store_path=store_path,
        allowed=AllowList(servers=frozenset({synapse.server_name})),
        drain_timeout_s=5.0,
        user_messages_burst=DELIVERY_BURST,
    )
    return replace(settings, **overrides)


@asynccontextmanager
async def running_bot(
    settings: Settings, backend: Backend | None = None
) -> AsyncIterator[BotRuntime]:
    """The bot, ready (reconciled and taking messages) for the body of the block;
    ``backend`` instead of the one ``settings`` name."""
    async with trio.open_nursery() as nursery:
        runtime: BotRuntime = await nursery.start(partial(run_bot, settings, backend=backend))
        try:
            yield runtime
        finally:
            runtime.request_stop()


class Person:
    """A Matrix user driving the bot the way a client would."""

    def __init__(self, synapse: SynapseServer, user: RegisteredUser) -> None:
        self.user = user
        self.client = MatrixClient(
            synapse.base_url, access_token=user.access_token, user_id=user.user_id
        )
        self._since: SyncToken | None = None
        self.timeline: dict[RoomID, list[RoomEvent]] = {}

    async def aclose(self) -> None:
        await self.client.aclose()

    async def sync_once(self, timeout_ms: int = 0) -> None:
        response = await self.client.sync(since=self._since, timeout_ms=timeout_ms)
        self._since = response.next_batch
        for room_id, room in response.rooms.join.items():
            self.timeline.setdefault(room_id, []).extend(room.timeline.events)

    async def say(self, room_id: RoomID, body: str) -> str:
        return await self.client.send_event(
            room_id, "m.room.message", {"msgtype": "m.text", "body": body}, new_txn_id()
        )

    def bot_notices(self, room_id: RoomID, bot_user_id: str) -> list[RoomEvent]:
        return [
            e
            for e in self.timeline.get(room_id, [])
            if e.sender == bot_user_id
            and e.type == "m.room.message"
            and e.content.get("msgtype") == "m.notice"
        ]

    async def wait_until(
        self, condition: Callable[[], bool], *, timeout: float = 20.0, what: str = "condition"
    ) -> None:
        with trio.move_on_after(timeout) as scope:
            while not condition():
                await self.sync_once(timeout_ms=1000)
        if scope.cancelled_caught:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def replies_to(notices: list[RoomEvent]) -> list[str]:
    """The event ids the given notices answer (rich replies)."""
    targets = []
    for event in notices:
        relates = event.content.get("m.relates_to", {})
        target = relates.get("m.in_reply_to", {}).get("event_id")
        if target:
            targets.append(target)
    return targets


async def open_chat(person: Person, bot_id: str) -> RoomID:
    """A room ``person`` makes and invites the bot to, once its greeting is there."""
    # Imported here: bot.invites is heavy and only these tests need it.
    from bot.invites import GREETING

    room_id = await person.client.create_room(name="assistant", invite=[bot_id])
    await person.wait_until(
        lambda: any(e.content.get("body") == GREETING for e in person.bot_notices(room_id, bot_id)),
        what="the greeting",
    )
    return room_id


@asynccontextmanager
async def fake_openai_server(*models: str, token_delay: float = 0.0) -> AsyncIterator[FakeOpenAI]:
    """The fake OpenAI-compatible server, serving ``models`` (its default list when
    none) on a loopback port for the block."""
    server = FakeOpenAI(api_key=OPENAI_API_KEY, token_delay=token_delay)
    if models:
        server.models = frozenset(models)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server
        nursery.cancel_scope.cancel()


def model_bot(
    synapse: SynapseServer,
    bot: RegisteredUser,
    store: Path,
    server: FakeOpenAI,
    **model: Any,
) -> Settings:
    """The bot's settings with the model backend on ``server`` (``test-model``; any
    other `ModelSettings` field by name)."""
    settings = ModelSettings(
        base_url=server.base_url, model="test-model", api_key=OPENAI_API_KEY, **model
    )
    return replace(bot_settings(synapse, bot, store), backend="model", model=settings)
