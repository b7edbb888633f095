"""Fixtures of the backend tests: captured logs and the fake OpenAI-compatible server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, MutableMapping
from typing import Any

import pytest
import trio
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from bot.logging import merge_log_context
from fake_openai import API_KEY, FakeOpenAI

Logs = list[MutableMapping[str, Any]]


@pytest.fixture
def logs() -> Iterator[Logs]:
    with capture_logs(processors=[merge_contextvars, merge_log_context]) as entries:
        yield entries


@pytest.fixture
async def openai() -> AsyncIterator[FakeOpenAI]:
    """A fake OpenAI-compatible server on loopback that wants `API_KEY`."""
    server = FakeOpenAI(api_key=API_KEY)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server
        nursery.cancel_scope.cancel()
