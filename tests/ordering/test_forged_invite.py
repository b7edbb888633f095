"""A forged invite state is declined, through the inbox like any invite (issue 15).

A remote server sends the invite's stripped state; the bot's homeserver appends the real
invite event after it. Here the inviting server put an invite "from Alice" (allowed) first;
the real inviter, last, is Eve, who is not allowed. Synapse's own clients cannot make such a
state (it is built by the server), so this is proved here, against the scripted homeserver,
and not against Synapse.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import trio

from bot.config import Settings
from bot.intake import invite_item
from bot.store import Store
from fake_homeserver import ALICE, BOT, FakeHomeserver
from matrix_api.models import RoomID, SyncToken
from ordering_harness import Logs, log_events, running_bot

EVE = "@eve:evil.test"  # another server: not allowed
BOB = "@bob:hs.test"  # allowed
FORGED = "!forged:evil.test"


def member(sender: str, membership: Any = "invite") -> dict[str, Any]:
    return {
        "type": "m.room.member",
        "state_key": BOT,
        "sender": sender,
        "content": {"membership": membership},
    }


def forge_invite_state(hs: FakeHomeserver, room_id: str, events: Sequence[dict[str, Any]]) -> None:
    """The initial sync shows ``events`` as the invite state of ``room_id`` while the bot
    is invited there (an invite added with `FakeHomeserver.add_invite`)."""
    original = hs._initial_sync

    async def initial_sync() -> tuple[int, dict[str, Any]]:
        status, body = await original()
        invites = body["rooms"]["invite"]
        if room_id in invites:
            invites[room_id] = {"invite_state": {"events": list(events)}}
        return status, body

    hs._initial_sync = initial_sync  # type: ignore[method-assign]


async def _declined(hs: FakeHomeserver, store: Store) -> None:
    await hs.wait_for(lambda call: call.endpoint == "leave", ended=True)
    while await store.pending():  # noqa: ASYNC110  # the store tells no one when it commits
        await trio.sleep(0.01)


def _assert_declined_unjoined(hs: FakeHomeserver, logs: Logs, room_id: str) -> dict[str, Any]:
    assert [call.room_id for call in hs.of("leave")] == [room_id]
    assert hs.of("join") == []
    assert hs.account_data_writes() == []  # no marker: no chat, no owner recorded
    assert hs.sent_in(room_id) == []  # no greeting
    [declined] = [entry for entry in logs if entry["event"] == "invite_declined"]
    assert declined["room_id"] == room_id
    assert "invite_accepted" not in log_events(logs)
    return dict(declined)


async def test_a_forged_inviter_first_and_the_real_one_last_is_declined(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, logs: Logs, settings: Settings
) -> None:
    hs.add_invite(FORGED, EVE)
    forge_invite_state(
        hs,
        FORGED,
        [
            member(ALICE),  # copied from Eve's server: forged
            {"type": "m.room.name", "state_key": "", "sender": EVE, "content": {"name": "hi"}},
            member(EVE),  # appended by the bot's own server: the real invite
        ],
    )

    async with running_bot(settings, hs) as bot:
        await _declined(hs, bot.store)
        assert bot.store.chat_for_room(FORGED) is None

    declined = _assert_declined_unjoined(hs, logs, FORGED)
    assert declined["reason"] == "ambiguous"
    assert declined["candidates"] == [ALICE, EVE]


async def test_an_ambiguous_invite_between_allowed_users_is_declined_and_leaves_the_inbox(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, logs: Logs, settings: Settings
) -> None:
    # Both allowed: still, the state names two inviters, so whose chat it is is a guess.
    hs.add_invite(FORGED, ALICE)
    forge_invite_state(hs, FORGED, [member(BOB), member(["invite"]), member(ALICE)])

    async with running_bot(settings, hs) as bot:
        await _declined(hs, bot.store)
        assert await bot.store.pending() == []

    declined = _assert_declined_unjoined(hs, logs, FORGED)
    assert declined["reason"] == "ambiguous"
    assert declined["candidates"] == [BOB, ALICE]


async def test_an_ambiguous_invite_left_in_the_inbox_by_a_crash_is_declined_at_the_next_start(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, logs: Logs, settings: Settings
) -> None:
    # The previous run committed the ambiguous invite and stopped before declining it.
    store = await Store.open(settings.store_path, BOT)
    try:
        await store.commit_sync_batch(
            SyncToken("s0"),
            [
                invite_item(
                    RoomID(FORGED),
                    EVE,
                    BOT,
                    ambiguous="the invites for the bot name different senders",
                    candidates=[ALICE, EVE],
                )
            ],
        )
    finally:
        await store.aclose()
    hs.add_invite(FORGED, EVE)
    forge_invite_state(hs, FORGED, [member(ALICE), member(EVE)])

    async with running_bot(settings, hs) as bot:
        await _declined(hs, bot.store)

    declined = _assert_declined_unjoined(hs, logs, FORGED)
    assert declined["candidates"] == [ALICE, EVE]


async def test_a_plain_invite_is_still_accepted(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, logs: Logs, settings: Settings
) -> None:
    hs.add_invite(FORGED, ALICE)
    forge_invite_state(
        hs,
        FORGED,
        [
            {"type": "m.room.member", "state_key": ALICE, "sender": ALICE,
             "content": {"membership": "join"}},
            member(ALICE),
        ],
    )  # fmt: skip

    async with running_bot(settings, hs) as bot:
        await hs.wait_for(lambda call: call.endpoint == "join", ended=True)
        while bot.store.chat_for_room(FORGED) is None:  # noqa: ASYNC110
            await trio.sleep(0.01)
        chat = bot.store.chat_for_room(FORGED)

    assert chat is not None
    assert chat.owner == ALICE
    assert hs.of("leave") == []
