"""bot.intake: which events of a /sync batch enter the inbox, and how gaps are filled.

Timelines are hand-built; ``$mN`` are Alice's messages in time order, the bot's events are
named after what they are. The fake client answers /messages from a script keyed by the
``from`` token and records every call.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import msgspec
import pytest

from bot.chats import Chat
from bot.intake import Intake, full_state_sync, sync_filters
from bot.messages import is_actionable
from bot.store import Store
from matrix_api import MatrixClient, NetworkError
from matrix_api.models import (
    Event,
    EventID,
    InvitedRoom,
    JoinedRoom,
    MessagesResponse,
    RoomEvent,
    RoomID,
    Rooms,
    StrippedStateEvent,
    SyncResponse,
    SyncToken,
    Timeline,
    UserID,
)

BOT = "@bot:example.org"
ALICE = "@alice:example.org"
ROOM = RoomID("!chat:example.org")
STRANGER_ROOM = RoomID("!unknown:example.org")
CREATED = 10_000
CHAT = Chat("c_1", ROOM, ALICE, "a chat", created_ts=CREATED)


def msg(n: int, *, ts: int | None = None, sender: str = ALICE) -> RoomEvent:
    return RoomEvent(
        type="m.room.message",
        event_id=EventID(f"$m{n}"),
        sender=UserID(sender),
        origin_server_ts=CREATED + n * 10 if ts is None else ts,
        content={"msgtype": "m.text", "body": f"message {n}"},
    )


def reply(to: str, *, eid: str | None = None, ts: int = CREATED + 5) -> RoomEvent:
    return RoomEvent(
        type="m.room.message",
        event_id=EventID(eid or f"$reply-to-{to.lstrip('$')}"),
        sender=UserID(BOT),
        origin_server_ts=ts,
        content={
            "msgtype": "m.notice",
            "body": "answer",
            "m.relates_to": {"m.in_reply_to": {"event_id": to}},
        },
    )


def greeting(ts: int = CREATED + 1) -> RoomEvent:
    return RoomEvent(
        type="m.room.message",
        event_id=EventID("$greeting"),
        sender=UserID(BOT),
        origin_server_ts=ts,
        content={"msgtype": "m.notice", "body": "Hello!"},
    )


def bot_join(ts: int = CREATED, *, prev: str | None = None) -> RoomEvent:
    return RoomEvent(
        type="m.room.member",
        event_id=EventID("$bot-join" if prev is None else "$bot-profile"),
        sender=UserID(BOT),
        origin_server_ts=ts,
        content={"membership": "join"},
        state_key=BOT,
        unsigned={"prev_content": {"membership": prev}} if prev else {},
    )


def receipt(event_id: str, user: str = BOT) -> Event:
    return Event(type="m.receipt", content={event_id: {"m.read": {user: {"ts": 1}}}})


def room(
    events: list[RoomEvent],
    *,
    limited: bool = False,
    prev_batch: str | None = None,
    ephemeral: list[Event] | None = None,
) -> JoinedRoom:
    return JoinedRoom(
        timeline=Timeline(
            events=events,
            limited=limited,
            prev_batch=SyncToken(prev_batch) if prev_batch else None,
        ),
        ephemeral=ephemeral or [],
    )


def sync(
    join: dict[RoomID, JoinedRoom], invite: dict[RoomID, InvitedRoom] | None = None
) -> SyncResponse:
    return SyncResponse(next_batch=SyncToken("next"), rooms=Rooms(join=join, invite=invite or {}))


@dataclass
class Call:
    room_id: str
    direction: str
    from_token: str | None
    to_token: str | None
    limit: int | None


class FakeClient:
    """/messages from a script keyed by the ``from`` token; nothing else is allowed."""

    def __init__(self, pages: dict[str, tuple[list[RoomEvent], str | None]] | None = None) -> None:
        self.pages = pages or {}
        self.calls: list[Call] = []
        self.fail: Exception | None = None

    async def messages(
        self,
        room_id: RoomID,
        *,
        direction: str,
        from_token: SyncToken | None = None,
        to_token: SyncToken | None = None,
        limit: int | None = None,
        filter: Any = None,
    ) -> MessagesResponse:
        self.calls.append(Call(room_id, direction, from_token, to_token, limit))
        if self.fail is not None:
            raise self.fail
        assert from_token in self.pages, f"unscripted /messages from {from_token}"
        chunk, end = self.pages[from_token]
        return MessagesResponse(
            start=SyncToken(from_token),
            chunk=chunk,
            end=SyncToken(end) if end is not None else None,
        )

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"intake used client.{name}")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(tmp_path / "bot.sqlite3", BOT)
    await opened.apply_chats(put=[CHAT])
    yield opened
    await opened.aclose()


async def picked(
    store: Store,
    client: FakeClient,
    response: SyncResponse,
    since: str | None = None,
) -> list[str]:
    """Commit ``response`` and return the event ids that entered the inbox, in order."""
    intake = Intake(cast("MatrixClient", client), store, BOT)
    fresh = await intake.commit(response, SyncToken(since) if since else None)
    assert store.sync_token == response.next_batch
    pending = await store.pending()
    assert all(item in pending for item in fresh)
    return [item.event_id for item in fresh]


# --- no token, a known chat: from where the bot provably got to ----------------------------


async def test_events_after_the_last_answered_message_are_picked(store: Store) -> None:
    timeline = [msg(1), msg(2), msg(3), reply("$m2", ts=CREATED + 35), msg(4)]

    assert await picked(store, FakeClient(), sync({ROOM: room(timeline)})) == ["$m3", "$m4"]


async def test_replies_out_of_order_take_the_furthest(store: Store) -> None:
    timeline = [msg(1), msg(2), msg(3), reply("$m3", ts=CREATED + 31), reply("$m1"), msg(4)]

    assert await picked(store, FakeClient(), sync({ROOM: room(timeline)})) == ["$m4"]


async def test_a_greeting_marks_itself(store: Store) -> None:
    timeline = [msg(1, ts=CREATED + 1), greeting(ts=CREATED + 2), msg(2), msg(3)]

    assert await picked(store, FakeClient(), sync({ROOM: room(timeline)})) == ["$m2", "$m3"]


async def test_the_bots_read_receipt_marks_its_event(store: Store) -> None:
    response = sync({ROOM: room([msg(1), msg(2), msg(3)], ephemeral=[receipt("$m2")])})

    assert await picked(store, FakeClient(), response) == ["$m3"]


async def test_someone_elses_receipt_marks_nothing(store: Store) -> None:
    response = sync({ROOM: room([msg(1), msg(2), msg(3)], ephemeral=[receipt("$m3", user=ALICE)])})

    assert await picked(store, FakeClient(), response) == ["$m1", "$m2", "$m3"]


async def test_everything_handled_picks_nothing(store: Store) -> None:
    timeline = [msg(1), reply("$m1", ts=CREATED + 11), msg(2), reply("$m2", ts=CREATED + 21)]

    assert await picked(store, FakeClient(), sync({ROOM: room(timeline)})) == []


async def test_events_older_than_the_chat_are_not_picked(store: Store) -> None:
    timeline = [msg(1, ts=CREATED - 500), msg(2, ts=CREATED - 1), msg(3, ts=CREATED), msg(4)]

    assert await picked(store, FakeClient(), sync({ROOM: room(timeline)})) == ["$m3", "$m4"]


async def test_events_before_the_bots_join_are_not_picked(store: Store) -> None:
    timeline = [msg(1), msg(2), bot_join(ts=CREATED + 25), msg(3), msg(4)]

    assert await picked(store, FakeClient(), sync({ROOM: room(timeline)})) == ["$m3", "$m4"]


async def test_the_bot_and_notices_are_never_picked(store: Store) -> None:
    timeline = [
        msg(1),
        msg(2, sender=BOT),
        RoomEvent(
            type="m.room.message",
            event_id=EventID("$other-bot"),
            sender=UserID("@otherbot:example.org"),
            origin_server_ts=CREATED + 30,
            content={"msgtype": "m.notice", "body": "beep"},
        ),
        msg(3),
    ]
    # Any event of the bot's that answers nothing marks itself, its text messages too.
    assert await picked(store, FakeClient(), sync({ROOM: room(timeline)})) == ["$m3"]


async def test_a_limited_timeline_pages_back_until_a_horizon(store: Store) -> None:
    # In time order: m1, reply->m1, m2, m3, m4 | m5, m6 (the timeline).
    client = FakeClient(
        {
            "p1": ([msg(4), msg(3)], "p2"),
            "p2": ([msg(2), reply("$m1", ts=CREATED + 15), msg(1)], "p3"),
            "p3": ([msg(0)], None),  # never asked for: the horizon is found on p2
        }
    )
    response = sync({ROOM: room([msg(5), msg(6)], limited=True, prev_batch="p1")})

    assert await picked(store, client, response) == ["$m2", "$m3", "$m4", "$m5", "$m6"]
    assert [(c.room_id, c.direction, c.from_token, c.to_token) for c in client.calls] == [
        (ROOM, "b", "p1", None),
        (ROOM, "b", "p2", None),
    ]


async def test_a_limited_timeline_with_a_horizon_is_not_paged(store: Store) -> None:
    client = FakeClient()
    timeline = [msg(1), reply("$m1", ts=CREATED + 11), msg(2)]
    response = sync({ROOM: room(timeline, limited=True, prev_batch="p1")})

    assert await picked(store, client, response) == ["$m2"]
    assert client.calls == []


async def test_paging_back_stops_at_the_receipt(store: Store) -> None:
    client = FakeClient({"p1": ([msg(3), msg(2)], "p2"), "p2": ([msg(1)], "p3")})
    response = sync(
        {ROOM: room([msg(4)], limited=True, prev_batch="p1", ephemeral=[receipt("$m2")])}
    )

    assert await picked(store, client, response) == ["$m3", "$m4"]
    assert len(client.calls) == 1


async def test_paging_back_stops_before_the_chat_existed(store: Store) -> None:
    client = FakeClient(
        {
            "p1": ([msg(3), msg(2)], "p2"),
            "p2": ([msg(1), msg(0, ts=CREATED - 1)], "p3"),
            "p3": ([msg(-1, ts=CREATED - 100)], "p4"),  # never asked for
        }
    )
    response = sync({ROOM: room([msg(4)], limited=True, prev_batch="p1")})

    assert await picked(store, client, response) == ["$m1", "$m2", "$m3", "$m4"]
    assert [c.from_token for c in client.calls] == ["p1", "p2"]


async def test_paging_back_stops_at_the_start_of_the_room(store: Store) -> None:
    client = FakeClient({"p1": ([msg(2)], "p2"), "p2": ([], "p3"), "p3": ([msg(1)], None)})
    response = sync({ROOM: room([msg(3)], limited=True, prev_batch="p1")})

    assert await picked(store, client, response) == ["$m1", "$m2", "$m3"]
    assert [c.from_token for c in client.calls] == ["p1", "p2", "p3"]


async def test_paging_back_finds_the_bots_join(store: Store) -> None:
    client = FakeClient({"p1": ([msg(2), bot_join(ts=CREATED + 15), msg(1)], "p2")})
    response = sync({ROOM: room([msg(3)], limited=True, prev_batch="p1")})

    assert await picked(store, client, response) == ["$m2", "$m3"]
    assert len(client.calls) == 1


async def test_a_timeline_that_is_not_limited_is_not_paged(store: Store) -> None:
    client = FakeClient()
    response = sync({ROOM: room([msg(1), msg(2)], prev_batch="p1")})

    assert await picked(store, client, response) == ["$m1", "$m2"]
    assert client.calls == []


async def test_rooms_that_are_not_chats_are_ignored_without_a_token(store: Store) -> None:
    client = FakeClient()
    response = sync(
        {
            STRANGER_ROOM: room([msg(1), msg(2)], limited=True, prev_batch="p1"),
            ROOM: room([msg(7)]),
        }
    )

    assert await picked(store, client, response) == ["$m7"]
    assert client.calls == []


async def test_a_pending_invite_is_taken_into_the_inbox(store: Store) -> None:
    invited = InvitedRoom(
        invite_state=[
            StrippedStateEvent("m.room.name", "", UserID(ALICE), {"name": "x"}),
            StrippedStateEvent("m.room.member", BOT, UserID(ALICE), {"membership": "invite"}),
        ]
    )
    intake = Intake(cast("MatrixClient", FakeClient()), store, BOT)

    [item] = await intake.commit(sync({}, invite={STRANGER_ROOM: invited}), None)

    assert item.kind == "invite"
    assert item.room_id == STRANGER_ROOM
    assert item.event_id == f"invite:{STRANGER_ROOM}"
    assert item.event.sender == ALICE


async def test_an_invite_for_someone_else_is_not_taken(store: Store) -> None:
    invited = InvitedRoom(
        invite_state=[
            StrippedStateEvent("m.room.member", ALICE, UserID(ALICE), {"membership": "invite"})
        ]
    )

    assert await picked(store, FakeClient(), sync({}, invite={STRANGER_ROOM: invited})) == []


# --- with a token: everything new, gaps filled --------------------------------------------------


async def test_with_a_token_every_answerable_event_is_picked(store: Store) -> None:
    timeline = [msg(1), reply("$m1"), greeting(), msg(2)]
    response = sync({ROOM: room(timeline), STRANGER_ROOM: room([msg(3)])})

    assert await picked(store, FakeClient(), response, since="s0") == ["$m1", "$m2", "$m3"]


async def test_encrypted_events_of_others_are_picked_to_be_answered(store: Store) -> None:
    def encrypted(eid: str, sender: str) -> RoomEvent:
        return RoomEvent(
            type="m.room.encrypted",
            event_id=EventID(eid),
            sender=UserID(sender),
            origin_server_ts=CREATED + 50,
            content={"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "..."},
        )

    response = sync({ROOM: room([encrypted("$theirs", ALICE), encrypted("$ours", BOT)])})

    assert await picked(store, FakeClient(), response, since="s0") == ["$theirs"]


async def test_a_limited_timeline_is_filled_back_to_the_previous_token(store: Store) -> None:
    # In time order: m1 .. m6; the timeline holds m5, m6. /messages pages back from
    # prev_batch, overlaps the timeline by one event, and has an empty page in the middle.
    client = FakeClient(
        {
            "p1": ([msg(5), msg(4), msg(3)], "p2"),
            "p2": ([], "p3"),  # empty but with an end: not the end
            "p3": ([msg(2), msg(1)], None),
        }
    )
    response = sync({ROOM: room([msg(5), msg(6)], limited=True, prev_batch="p1")})

    ids = await picked(store, client, response, since="s0")

    assert ids == ["$m1", "$m2", "$m3", "$m4", "$m5", "$m6"]
    assert [(c.room_id, c.direction, c.from_token, c.to_token) for c in client.calls] == [
        (ROOM, "b", "p1", "s0"),
        (ROOM, "b", "p2", "s0"),
        (ROOM, "b", "p3", "s0"),
    ]


async def test_a_gap_in_a_room_that_is_not_a_chat_is_filled_too(store: Store) -> None:
    client = FakeClient({"p1": ([msg(1)], None)})
    response = sync({STRANGER_ROOM: room([msg(2)], limited=True, prev_batch="p1")})

    assert await picked(store, client, response, since="s0") == ["$m1", "$m2"]
    assert [c.room_id for c in client.calls] == [STRANGER_ROOM]


async def test_with_a_token_a_newly_joined_room_starts_after_the_join(store: Store) -> None:
    timeline = [msg(1), msg(2), bot_join(ts=CREATED + 25), msg(3)]
    response = sync({STRANGER_ROOM: room(timeline, limited=True, prev_batch="p1")})
    client = FakeClient()

    assert await picked(store, client, response, since="s0") == ["$m3"]
    assert client.calls == []


async def test_in_the_long_poll_the_bots_invite_stands_for_its_join(store: Store) -> None:
    # The long-poll leaves out the bot's own events: its join is not there, the
    # invite it accepted is (its sender is the inviter).
    invite = RoomEvent(
        type="m.room.member",
        event_id=EventID("$invite"),
        sender=UserID(ALICE),
        origin_server_ts=CREATED - 5,
        content={"membership": "invite"},
        state_key=BOT,
    )
    timeline = [msg(1), msg(2), invite, msg(3)]
    response = sync({STRANGER_ROOM: room(timeline, limited=True, prev_batch="p1")})
    client = FakeClient()

    assert await picked(store, client, response, since="s0") == ["$m3"]
    assert client.calls == []


async def test_a_profile_change_is_not_a_join(store: Store) -> None:
    timeline = [msg(1), bot_join(ts=CREATED + 15, prev="join"), msg(2)]

    assert await picked(store, FakeClient(), sync({ROOM: room(timeline)}), since="s0") == [
        "$m1",
        "$m2",
    ]


@pytest.mark.parametrize("prev_content", ["join", None, ["join"], 7])
async def test_a_join_whose_unsigned_prev_content_is_not_an_object_is_a_join(
    store: Store, prev_content: object
) -> None:
    # A server's mistake in ``unsigned`` must not stop the sync loop at every start.
    join = msgspec.structs.replace(
        bot_join(ts=CREATED + 25), unsigned={"prev_content": prev_content}
    )
    response = sync({STRANGER_ROOM: room([msg(1), join, msg(2)])})

    assert await picked(store, FakeClient(), response, since="s0") == ["$m2"]


async def test_a_join_inside_the_gap_still_hides_the_history_before_it(store: Store) -> None:
    # In time order: m1, m2 (before the bot was there), the bot's join, m3 | m4 (timeline).
    client = FakeClient({"p1": ([msg(3), bot_join(ts=CREATED + 25), msg(2), msg(1)], None)})
    response = sync({STRANGER_ROOM: room([msg(4)], limited=True, prev_batch="p1")})

    assert await picked(store, client, response, since="s0") == ["$m3", "$m4"]


async def test_an_event_delivered_again_is_not_picked_again(store: Store) -> None:
    response = sync({ROOM: room([msg(1), msg(2)])})
    first = await picked(store, FakeClient(), response, since="s0")

    again = await picked(store, FakeClient(), response, since="next")

    assert first == ["$m1", "$m2"]
    assert again == []


async def test_a_failed_gap_fill_commits_nothing(store: Store) -> None:
    await store.commit_sync_batch(SyncToken("s0"), [])
    client = FakeClient()
    client.fail = NetworkError("connection reset", maybe_processed=True)
    response = sync(
        {
            ROOM: room([msg(1)]),
            STRANGER_ROOM: room([msg(2)], limited=True, prev_batch="p1"),
        }
    )
    intake = Intake(cast("MatrixClient", client), store, BOT)

    with pytest.raises(NetworkError):
        await intake.commit(response, SyncToken("s0"))

    assert store.sync_token == "s0"
    assert await store.pending() == []


@pytest.mark.parametrize(
    "event",
    [
        msg(1),
        RoomEvent(
            type="m.room.encrypted",
            event_id=EventID("$enc"),
            sender=UserID(ALICE),
            origin_server_ts=CREATED,
            content={"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "x"},
        ),
        RoomEvent(
            type="m.room.encryption",
            event_id=EventID("$on"),
            sender=UserID(ALICE),
            origin_server_ts=CREATED,
            content={"algorithm": "m.megolm.v1.aes-sha2"},
            state_key="",
        ),
    ],
)
def test_the_sync_filters_let_through_every_event_the_bot_acts_on(event: RoomEvent) -> None:
    assert is_actionable(event, BOT)
    for definition in sync_filters(BOT):
        assert event.type in definition["room"]["timeline"]["types"]


def test_the_sync_filters_keep_memberships_for_the_bots_own_join() -> None:
    # The bot's own join marks where a room's history ends (test_events_before_the_bots_join_...).
    for definition in sync_filters(BOT):
        assert "m.room.member" in definition["room"]["timeline"]["types"]


async def test_the_start_up_sync_is_timeout_0_full_state_and_a_request_never_seen_before() -> None:
    seen: list[httpx.URL] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        return httpx.Response(200, json={"next_batch": "s1"})

    async with MatrixClient(
        "https://hs.test", access_token="t", transport=httpx.MockTransport(answer)
    ) as client:
        await full_state_sync(client, "@bot:hs.test")
        await full_state_sync(client, "@bot:hs.test", since=SyncToken("s0"))

    first, second = (dict(url.params) for url in seen)
    assert (first["timeout"], first["full_state"]) == ("0", "true")
    assert (second["timeout"], second["since"]) == ("0", "s0")
    filters = [json.loads(params["filter"]) for params in (first, second)]
    assert filters[0] != filters[1]  # two starts, two requests Synapse cannot replay
    initial, _ = sync_filters("@bot:hs.test")
    for sent in filters:
        (nonce,) = sent.pop("account_data")["not_types"]
        assert nonce.startswith("org.surfaces.start.")
        assert sent == initial  # otherwise exactly the start-up filter
