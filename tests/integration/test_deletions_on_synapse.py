"""Deletions through the whole bot against a real Synapse (issue 23).

The person is a plain HTTP client: it sends with the suite's `Person` and deletes a
message the way any client does, ``PUT /rooms/{roomId}/redact/{eventId}/{txnId}``
(written here with httpx, not with the bot's own `matrix_api`). The model backend
talks to the fake OpenAI server of tests/backends, which records every context it
receives: a deleted message is absent from the next one, and a message deleted while
the bot was busy with an earlier one is never answered nor sent to the model.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from bot.invites import GREETING
from bot_harness import (
    Person,
    fake_openai_server,
    model_bot,
    replies_to,
    running_bot,
)
from conftest import MakeUser
from fake_openai import FakeOpenAI, Script
from matrix_api import new_txn_id
from matrix_api.models import RoomID
from matrix_api.testing.synapse import SynapseServer


@pytest.fixture
async def model_server() -> AsyncIterator[FakeOpenAI]:
    async with fake_openai_server() as server:
        yield server


async def delete(synapse: SynapseServer, person: Person, room_id: RoomID, event_id: str) -> None:
    """What a client does when its user deletes a message."""
    path = (
        f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/redact/"
        f"{quote(event_id, safe='')}/{new_txn_id()}"
    )
    async with httpx.AsyncClient(timeout=30) as http:
        answer = await http.put(
            f"{synapse.base_url}{path}",
            json={"reason": "I should not have written that"},
            headers={"Authorization": f"Bearer {person.user.access_token}"},
        )
    answer.raise_for_status()


async def answered(alice: Person, room_id: RoomID, bot_id: str, event_id: str) -> None:
    await alice.wait_until(
        lambda: event_id in replies_to(alice.bot_notices(room_id, bot_id)),
        timeout=60,
        what="the bot's answer",
    )


def contents(messages: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """The conversation a request carries, without its system prompt."""
    return [(m["role"], m["content"]) for m in messages if m["role"] != "system"]


def outcome(store: Path, event_id: str) -> str | None:
    connection = sqlite3.connect(store)
    try:
        row = connection.execute(
            "SELECT outcome FROM events WHERE event_id = ?", (event_id,)
        ).fetchone()
        return row[0] if row else None
    finally:
        connection.close()


async def test_a_deleted_message_leaves_the_context_and_one_deleted_in_time_is_not_answered(
    synapse: SynapseServer,
    make_user: MakeUser,
    alice: Person,
    model_server: FakeOpenAI,
    tmp_path: Path,
) -> None:
    bot = make_user("bot")
    store = tmp_path / "store.sqlite3"
    async with running_bot(model_bot(synapse, bot, store, model_server)):
        room_id = await alice.client.create_room(name="assistant", invite=[bot.user_id])
        await alice.wait_until(
            lambda: any(
                e.content.get("body") == GREETING for e in alice.bot_notices(room_id, bot.user_id)
            ),
            what="the greeting",
        )
        one = await alice.say(room_id, "one")
        await answered(alice, room_id, bot.user_id, one)
        secret = await alice.say(room_id, "my password is hunter2")
        await answered(alice, room_id, bot.user_id, secret)
        await delete(synapse, alice, room_id, secret)
        three = await alice.say(room_id, "three")
        await answered(alice, room_id, bot.user_id, three)

        assert contents(model_server.requests[-1].body["messages"]) == [
            ("user", "one"),
            ("assistant", "Echo: one"),
            ("user", "three"),
        ]

        # The model thinks for 5 s about "slow"; meanwhile "regret" is sent and deleted.
        model_server.then(Script(head_delay=5.0))
        slow = await alice.say(room_id, "slow")
        regret = await alice.say(room_id, "regret this")
        await delete(synapse, alice, room_id, regret)
        last = await alice.say(room_id, "last")
        await answered(alice, room_id, bot.user_id, last)
        assert slow in replies_to(alice.bot_notices(room_id, bot.user_id))
        assert regret not in replies_to(alice.bot_notices(room_id, bot.user_id))

    asked = [contents(request.body["messages"])[-1] for request in model_server.requests]
    assert asked == [
        ("user", "one"),
        ("user", "my password is hunter2"),
        ("user", "three"),
        ("user", "slow"),
        ("user", "last"),
    ]
    assert "hunter2" not in repr(model_server.requests[-1].body)
    # The answer to the secret may still have been streaming when it was deleted (the
    # person saw its first event): then it is recorded as redacted too, answer and all.
    assert outcome(store, secret) in ("replied", "redacted")
    assert outcome(store, regret) == "redacted"
    stored = b"".join(path.read_bytes() for path in tmp_path.glob("store.sqlite3*"))
    assert b"hunter2" not in stored
    assert b"regret this" not in stored
