"""Fixtures for tests against a real Synapse (see matrix_api/testing/synapse.py).

Every test in this directory is marked ``synapse``. There is deliberately no skip: if Synapse
cannot be installed or started, the fixture raises and the tests error, so CI cannot go green
without really running them.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Protocol

import pytest

from bot_harness import Person
from matrix_api.testing.synapse import RegisteredUser, SynapseServer

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees the whole session's items, not just ours.
    for item in items:
        if item.path.is_relative_to(_HERE):
            item.add_marker(pytest.mark.synapse)


class MakeUser(Protocol):
    def __call__(self, prefix: str = "user", *, admin: bool = False) -> RegisteredUser: ...


@pytest.fixture(scope="session")
def synapse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SynapseServer]:
    """One Synapse for the whole session, with rate limits out of reach.

    Tests may stop and start it (outages) but must leave it running.
    """
    with SynapseServer(tmp_path_factory.mktemp("synapse")) as server:
        yield server


@pytest.fixture(scope="session")
def strict_synapse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SynapseServer]:
    """A second Synapse with its default rate limits, for tests that need real 429s.

    Started only when a test asks for it.
    """
    data_dir = tmp_path_factory.mktemp("strict-synapse")
    with SynapseServer(data_dir, relaxed_rate_limits=False) as server:
        yield server


@pytest.fixture
def make_user(synapse: SynapseServer) -> MakeUser:
    """Register fresh users on `synapse`.

    ``make_user("alice")`` gives ``@alice-<12 hex digits>:localhost``; ``admin=True`` for admins.
    """

    def make(prefix: str = "user", *, admin: bool = False) -> RegisteredUser:
        return synapse.register_user(f"{prefix}-{uuid.uuid4().hex[:12]}", admin=admin)

    return make


@pytest.fixture
async def alice(synapse: SynapseServer, make_user: MakeUser) -> AsyncIterator[Person]:
    """A user of the bot driving it as a client would (`bot_harness.Person`)."""
    person = Person(synapse, make_user("alice"))
    yield person
    await person.aclose()
