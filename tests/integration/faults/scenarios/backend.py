"""Scenario 7: a backend that raises, refuses, hiccups or hangs, in an in-process bot."""

from __future__ import annotations

import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial

import trio
from structlog.testing import capture_logs

from bot.backends import BackendError
from bot.chats import Chat
from bot.config import AllowList, Settings
from bot.messages import IncomingMessage
from bot.runtime import BotRuntime
from bot_harness import running_bot
from faults.harness.figures import Figures, figures
from faults.harness.lab import FaultLab, stage
from faults.harness.tasks import background, sole_error
from faults.harness.traffic import audit
from matrix_api.models import EventID
from matrix_api.testing.synapse import SynapseServer


class FlakyBackend:
    """A backend that misbehaves on purpose, by message body:

    ``raise``: raises a plain error every time; ``refuse``: raises `BackendError`;
    ``hang``: never answers; ``flaky``: raises on the first call, answers the second.
    Anything else is echoed.
    """

    name = "flaky"

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    async def reply(self, chat: Chat, message: IncomingMessage) -> str:
        del chat
        self.calls[message.body] += 1
        kind = message.body.split(" ", 1)[0]
        if kind == "raise":
            raise RuntimeError("the backend exploded")
        if kind == "refuse":
            raise BackendError("upstream 503", user_message="The assistant is unavailable.")
        if kind == "hang":
            await trio.sleep_forever()
        if kind == "flaky" and self.calls[message.body] == 1:
            raise RuntimeError("a passing hiccup")
        return f"echo: {message.body}"


@asynccontextmanager
async def in_process_bot(settings: Settings, backend: FlakyBackend) -> AsyncIterator[BotRuntime]:
    """`running_bot`, with a failure coming out as itself (not in an exception group)."""
    try:
        async with running_bot(settings, backend) as runtime:
            yield runtime
    except BaseExceptionGroup as group:
        raise sole_error(group) from None


async def run_backend_failures(
    lab: FaultLab,
    hs: SynapseServer,
    *,
    kinds: Sequence[str] = ("raise", "refuse", "flaky"),
    scenario: str = "7 backend failures",
) -> Figures:
    """Messages whose backend call raises, refuses, hiccups (or hangs), in one room of
    an in-process bot whose backend timeout is 2 s; then an ordinary message to show
    the room still works."""
    s = await stage(lab, hs, rooms=1)
    backend = FlakyBackend()
    settings = Settings(
        homeserver=hs.base_url,
        user_id=s.bot_user.user_id,
        access_token=s.bot_user.access_token,
        store_path=lab.workdir / f"backend-{uuid.uuid4().hex[:8]}.sqlite3",
        allowed=AllowList(servers=frozenset({hs.server_name})),
        drain_timeout_s=1.0,
        backend_timeout_s=2.0,
        user_messages_burst=100_000,  # delivery, not fairness, is measured here
    )
    outcomes: dict[str, str | None] = {}
    asked: dict[str, EventID] = {}
    with capture_logs() as logs:
        async with (
            in_process_bot(settings, backend) as runtime,
            background(partial(s.traffic.collect, s.observer)),
        ):
            for kind in kinds:
                asked[kind] = await s.traffic.send(s.sender, s.rooms[0], f"{kind} please")
                with contextlib.suppress(AssertionError):
                    await s.traffic.wait_answered([asked[kind]], timeout=60.0)
            asked["after"] = await s.traffic.send(s.sender, s.rooms[0], "after the failures")
            with contextlib.suppress(AssertionError):
                await s.traffic.wait_answered([asked["after"]], timeout=60.0)
            await trio.sleep(1.0)
            for kind, event_id in asked.items():
                outcomes[kind] = await runtime._store.handled_outcome(event_id)
    lab.captured.append(repr(logs))
    timelines = await audit(s.observer, s.rooms)
    notices = {
        kind: [a.content.get("body") for a in s.traffic.answers_to(event_id)]
        for kind, event_id in asked.items()
    }
    result = figures(
        scenario,
        s.traffic.sent,
        timelines,
        s.bot_user.user_id,
        notes={
            "calls": dict(backend.calls),
            "outcomes": outcomes,
        },
    )
    result.details.update(
        calls=backend.calls, outcomes=outcomes, notices=notices, logs=logs, asked=asked
    )
    return result
