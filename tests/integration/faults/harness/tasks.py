"""Running a scenario's helpers beside its body (`background`, `together`), with a
failure coming out as itself rather than inside an exception group (`sole_error`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio


def sole_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error inside (nested) ``group``, else the group itself."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        error = pending.pop()
        if isinstance(error, BaseExceptionGroup):
            pending.extend(error.exceptions)
        else:
            leaves.append(error)
    return leaves[0] if len(leaves) == 1 else group


@asynccontextmanager
async def background(
    *tasks: Callable[..., Awaitable[Any]],
) -> AsyncIterator[trio.Nursery]:
    """Start ``tasks`` (each with ``nursery.start``) for the body, then cancel them.

    An error in the body or in a task comes out as itself, not wrapped in an
    exception group, so a failing assertion reads as one.
    """
    try:
        async with trio.open_nursery() as nursery:
            for task in tasks:
                await nursery.start(task)
            yield nursery
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise sole_error(group) from None


async def together(*jobs: Callable[[], Awaitable[Any]]) -> None:
    """Run ``jobs`` concurrently until all are done; a failure comes out as itself."""
    try:
        async with trio.open_nursery() as nursery:
            for job in jobs:
                nursery.start_soon(job)
    except BaseExceptionGroup as group:
        raise sole_error(group) from None
