"""bot.invites: who invited the bot, read from stripped state a remote server may forge.

The homeserver appends the invite event itself after the state the inviting server
sent, so the real invite is the last entry for the bot. ``EVE`` is a remote user who is
not allowed and forges entries naming ``ALICE`` (allowed) as the inviter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from bot.chats import MAX_TITLE
from bot.config import AllowList, Settings
from bot.intake import Intake, invite_item, invited_room_name
from bot.invites import (
    AMBIGUOUS_REASON,
    MAX_CANDIDATES,
    InviteHandler,
    PickedInvite,
    pick_invite,
    unreadable_invite_state,
)
from bot.store import Store
from matrix_api import MatrixClient
from matrix_api.models import (
    InvitedRoom,
    RoomID,
    Rooms,
    SkippedEvent,
    StrippedStateEvent,
    SyncResponse,
    SyncToken,
    UserID,
    decode_sync,
)

BOT = "@bot:example.org"
ALICE = "@alice:example.org"
EVE = "@eve:evil.example"
ROOM = RoomID("!forged:evil.example")


def member(sender: str, membership: Any = "invite", state_key: str = BOT) -> StrippedStateEvent:
    return StrippedStateEvent(
        "m.room.member", state_key, UserID(sender), {"membership": membership}
    )


def other_state(sender: str = EVE) -> StrippedStateEvent:
    return StrippedStateEvent("m.room.name", "", UserID(sender), {"name": "A room"})


# --- pick_invite ------------------------------------------------------------------------


def test_a_plain_invite_names_its_sender() -> None:
    state = [other_state(ALICE), member(ALICE, "join", state_key=ALICE), member(ALICE)]

    assert pick_invite(state, BOT) == PickedInvite(ALICE)


def test_the_last_invite_is_the_one_the_server_appended() -> None:
    # Eve's server copies a forged invite "from Alice" into the state; the server
    # appends Eve's real invite last. Taking the first entry made Alice the owner.
    picked = pick_invite([member(ALICE), other_state(), member(EVE)], BOT)

    assert picked is not None
    assert picked.inviter == EVE
    assert picked.ambiguous is not None
    assert picked.candidates == (ALICE, EVE)


def test_agreeing_duplicates_are_not_ambiguous() -> None:
    assert pick_invite([member(ALICE), member(ALICE)], BOT) == PickedInvite(ALICE)


def test_a_last_entry_that_is_not_an_invite_is_ambiguous() -> None:
    picked = pick_invite([member(ALICE), member(EVE, "leave")], BOT)

    assert picked is not None
    assert picked.inviter == ""
    assert picked.ambiguous is not None
    assert picked.candidates == (ALICE,)


@pytest.mark.parametrize(
    "membership", [["invite"], {"invite": True}, None, 1, True, "INVITE", "invite "]
)
def test_a_membership_of_any_other_json_value_is_not_an_invite(membership: Any) -> None:
    # A list or an object must not crash (no hashing), nor count as an invite.
    assert pick_invite([member(ALICE, membership)], BOT) is None
    picked = pick_invite([member(ALICE), member(EVE, membership)], BOT)
    assert picked is not None
    assert picked.ambiguous is not None


def test_unreadable_entries_make_any_invite_ambiguous() -> None:
    # The real invite may be the entry that did not decode.
    picked = pick_invite([member(ALICE)], BOT, unreadable=1)

    assert picked is not None
    assert picked.ambiguous is not None
    assert picked.candidates == (ALICE,)
    nothing_readable = pick_invite([], BOT, unreadable=2)
    assert nothing_readable == PickedInvite("", nothing_readable.ambiguous, ())
    assert nothing_readable.ambiguous is not None


def test_no_invite_for_the_bot_is_not_an_invite() -> None:
    assert pick_invite([], BOT) is None
    assert pick_invite([member(ALICE, state_key=ALICE), other_state()], BOT) is None


def test_candidates_are_bounded_in_number_and_length() -> None:
    senders = [f"@u{i}:evil.example" for i in range(10_000)] + ["@" + "x" * 70_000 + ":e"]
    picked = pick_invite([member(s) for s in [*senders, EVE]], BOT)

    assert picked is not None
    assert picked.inviter == EVE
    assert len(picked.candidates) == MAX_CANDIDATES
    assert all(len(c) <= 255 for c in picked.candidates)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.just("invite"),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
)
_users = st.sampled_from([ALICE, EVE, BOT, "@carol:example.org", ""])
_stripped = st.builds(
    StrippedStateEvent,
    type=st.sampled_from(["m.room.member", "m.room.name", "m.room.create", "x"]),
    state_key=st.sampled_from([BOT, ALICE, "", EVE]),
    sender=_users,
    content=st.dictionaries(st.sampled_from(["membership", "name", "x"]), _json, max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(forged=st.lists(_stripped, max_size=12), real=_users, unreadable=st.integers(0, 2))
def test_a_forged_state_can_never_name_another_inviter(
    forged: list[StrippedStateEvent], real: str, unreadable: int
) -> None:
    """Whatever the inviting server puts first, the invite is either the real one,
    unambiguous only if no entry disagrees with it, or declined."""
    picked = pick_invite([*forged, member(real)], BOT, unreadable=unreadable)

    assert picked is not None
    assert picked.inviter == real
    others = {
        s.sender
        for s in forged
        if s.type == "m.room.member"
        and s.state_key == BOT
        and s.content.get("membership") == "invite"
        and s.sender != real
    }
    assert (picked.ambiguous is None) == (not others and not unreadable)
    if picked.ambiguous is not None:
        assert real in picked.candidates or len(picked.candidates) == MAX_CANDIDATES
    json.dumps(picked.candidates)  # what the inbox stores and the log shows


def test_unreadable_entries_are_counted_per_invited_room() -> None:
    skipped = [
        SkippedEvent(f"rooms.invite.{ROOM}.invite_state[0]", "bad"),
        SkippedEvent(f"rooms.invite.{ROOM}.invite_state.events[3]", "too deep"),
        SkippedEvent("rooms.invite.!b:x.y.invite_state[1]", "bad"),
        SkippedEvent(f"rooms.join.{ROOM}.timeline[0]", "bad"),
        SkippedEvent("rooms.invite.!c:x", "a whole room"),
        SkippedEvent("body", "surrogates"),
    ]

    assert unreadable_invite_state(skipped, [ROOM, "!b:x.y", "!c:x"]) == {ROOM: 2, "!b:x.y": 1}


def test_a_room_id_or_key_holding_invite_state_does_not_hide_an_unreadable_entry() -> None:
    # Remote servers choose room ids and content keys: neither may move the count elsewhere.
    odd_room = "!a.invite_state:evil.example"
    skipped = [
        SkippedEvent(f"rooms.invite.{odd_room}.invite_state[0]", "bad"),
        SkippedEvent(
            f"rooms.invite.{ROOM}.invite_state.events[1].content.x.invite_state.y...", "deep"
        ),
    ]

    assert unreadable_invite_state(skipped, [odd_room, ROOM]) == {odd_room: 1, ROOM: 1}


def test_an_invite_state_entry_that_does_not_decode_is_counted() -> None:
    # The decoder's own record of where a stripped event failed, read back.
    body = {
        "next_batch": "s1",
        "rooms": {
            "invite": {
                ROOM: {
                    "invite_state": {
                        "events": [
                            {
                                "type": "m.room.member",
                                "state_key": BOT,
                                "sender": ALICE,
                                "content": {"membership": "invite"},
                            },
                            {
                                "type": "m.room.member",
                                "state_key": BOT,
                                "sender": ["not", "a", "user"],
                                "content": {"membership": "invite"},
                            },
                        ]
                    }
                }
            }
        },
    }
    response = decode_sync(json.dumps(body).encode())

    unreadable = unreadable_invite_state(response.skipped, response.rooms.invite)
    assert unreadable == {ROOM: 1}
    picked = pick_invite(response.rooms.invite[ROOM].invite_state, BOT, unreadable=1)
    assert picked is not None
    assert picked.ambiguous is not None


# --- intake: the inbox item ------------------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> Any:
    opened = await Store.open(tmp_path / "store.sqlite3", BOT)
    yield opened
    await opened.aclose()


async def test_a_forged_invite_enters_the_inbox_marked_ambiguous(store: Store) -> None:
    invited = InvitedRoom(invite_state=[member(ALICE), other_state(), member(EVE)])
    response = SyncResponse(next_batch=SyncToken("n"), rooms=Rooms(invite={ROOM: invited}))
    intake = Intake(cast("MatrixClient", object()), store, BOT)

    [item] = await intake.commit(response, None)

    assert item.kind == "invite"
    assert item.event.sender == EVE
    assert item.event.content["ambiguous"]
    assert item.event.content["candidates"] == [ALICE, EVE]
    # Durable: what a restart reads back is the same.
    [again] = await store.pending()
    assert again.event.content == item.event.content


async def test_an_unreadable_invite_state_entry_makes_the_invite_ambiguous(store: Store) -> None:
    invited = InvitedRoom(invite_state=[member(ALICE)])
    response = SyncResponse(
        next_batch=SyncToken("n"),
        rooms=Rooms(invite={ROOM: invited}),
        skipped=[SkippedEvent(f"rooms.invite.{ROOM}.invite_state[1]", "nested too deep")],
    )
    intake = Intake(cast("MatrixClient", object()), store, BOT)

    [item] = await intake.commit(response, None)

    assert item.event.content["ambiguous"]


# --- InviteHandler: declining ---------------------------------------------------------------


class _Client:
    """Records what the handler asks of the homeserver; answers joins and sends."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def server_time_ms(self) -> int | None:
        return None

    async def leave_room(self, room_id: RoomID, reason: str | None = None) -> None:
        self.calls.append(("leave_room", (room_id, reason)))

    async def join_room(self, room_id: RoomID) -> RoomID:
        self.calls.append(("join_room", room_id))
        return room_id

    async def get_room_account_data(self, room_id: RoomID, event_type: str) -> Any:
        from matrix_api import NotFound

        raise NotFound(404, "M_NOT_FOUND", "no marker")

    async def put_room_account_data(self, room_id: RoomID, event_type: str, content: Any) -> None:
        self.calls.append(("put_room_account_data", (room_id, content)))

    async def put_state_event(
        self, room_id: RoomID, event_type: str, content: Any, state_key: str = ""
    ) -> str:
        self.calls.append(("put_state_event", (room_id, event_type, content, state_key)))
        return "$state"

    async def send_event(self, room_id: RoomID, event_type: str, content: Any, **kw: Any) -> str:
        self.calls.append(("send_event", (room_id, content)))
        return "$sent"


def _settings() -> Settings:
    return Settings(
        homeserver="https://example.org",
        user_id=BOT,
        access_token="t",
        allowed=AllowList(users=frozenset({ALICE})),
    )


async def _handle(store: Store, item_args: dict[str, Any]) -> _Client:
    client = _Client()
    [item] = await store.commit_sync_batch(SyncToken("n"), [invite_item(ROOM, **item_args)])
    await InviteHandler(cast("MatrixClient", client), store, _settings()).handle(item)
    return client


async def test_an_ambiguous_invite_is_declined_logged_and_leaves_the_inbox(store: Store) -> None:
    with capture_logs() as logs:
        client = await _handle(
            store,
            {
                "inviter": ALICE,
                "bot_user_id": BOT,
                "ambiguous": "the invites for the bot name different senders",
                "candidates": [EVE, ALICE],
            },
        )

    assert client.calls == [("leave_room", (ROOM, AMBIGUOUS_REASON))]
    assert await store.pending() == []
    assert store.chat_for_room(ROOM) is None
    [declined] = [e for e in logs if e["event"] == "invite_declined"]
    assert declined["reason"] == "ambiguous"
    assert declined["room_id"] == ROOM
    assert declined["candidates"] == [EVE, ALICE]
    assert declined["log_level"] == "warning"


async def test_a_clear_invite_from_an_allowed_user_is_still_accepted(store: Store) -> None:
    client = await _handle(store, {"inviter": ALICE, "bot_user_id": BOT})

    assert ("join_room", ROOM) in [(name, args) for name, args in client.calls]
    chat = store.chat_for_room(ROOM)
    assert chat is not None
    assert chat.owner == ALICE
    assert chat.title == f"Chat with {ALICE}"
    assert await store.pending() == []
    # A chat made now has no history: its first message will not read the room for it.
    assert await store.conversation(chat.chat_id) == []


# --- InviteHandler: the room's name and the owner's Space -----------------------------------


def _named(name: Any, sender: str = ALICE) -> StrippedStateEvent:
    return StrippedStateEvent("m.room.name", "", UserID(sender), {"name": name})


def test_the_invited_rooms_name_is_its_last_name_entry_cut_to_a_bound() -> None:
    assert invited_room_name([member(ALICE)]) is None
    assert invited_room_name([_named("Old"), _named("Holiday plans"), member(ALICE)]) == (
        "Holiday plans"
    )
    # Not a string, or a state key that is not "": no name.
    assert invited_room_name([_named(["a list"])]) is None
    assert invited_room_name([_named("Old"), _named(7)]) is None
    other_key = StrippedStateEvent("m.room.name", "x", UserID(EVE), {"name": "Forged"})
    assert invited_room_name([other_key]) is None
    huge = invited_room_name([_named("x" * 100_000)])
    assert huge is not None
    assert len(huge) == 4 * MAX_TITLE


async def test_an_invite_into_a_named_room_keeps_the_name_as_the_title(store: Store) -> None:
    await _handle(store, {"inviter": ALICE, "bot_user_id": BOT, "name": "Holiday plans"})

    chat = store.chat_for_room(ROOM)
    assert chat is not None
    assert chat.title == "Holiday plans"


@pytest.mark.parametrize(
    ("name", "title"),
    [
        ("Line one\nline two\u202e", "Line one line two"),  # made safe, not refused
        ("\u200b\u202e", f"Chat with {ALICE}"),  # nothing left: the default
        ("y" * 2000, "y" * MAX_TITLE),
    ],
)
async def test_a_hostile_room_name_becomes_a_safe_title(
    store: Store, name: str, title: str
) -> None:
    await _handle(store, {"inviter": ALICE, "bot_user_id": BOT, "name": name})

    chat = store.chat_for_room(ROOM)
    assert chat is not None
    assert chat.title == title


async def test_an_invited_room_joins_the_owners_space_when_there_is_one(store: Store) -> None:
    space = RoomID("!space:example.org")
    await store.apply_spaces(put={ALICE: space})

    client = await _handle(store, {"inviter": ALICE, "bot_user_id": BOT})

    chat = store.chat_for_room(ROOM)
    assert chat is not None
    assert chat.space_id == space
    [marker] = [args for name, args in client.calls if name == "put_room_account_data"]
    assert marker[1]["space_id"] == space
    links = [args for name, args in client.calls if name == "put_state_event"]
    assert links == [(space, "m.space.child", {"via": ["example.org"]}, ROOM)]
    # The link is made after the join (the room is in the Space only once the bot is in it).
    names = [name for name, _ in client.calls]
    assert names.index("join_room") < names.index("put_state_event")


async def test_without_a_space_an_invited_room_is_linked_to_none(store: Store) -> None:
    client = await _handle(store, {"inviter": ALICE, "bot_user_id": BOT})

    chat = store.chat_for_room(ROOM)
    assert chat is not None
    assert chat.space_id is None
    assert [name for name, _ in client.calls if name == "put_state_event"] == []
