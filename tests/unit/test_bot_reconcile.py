"""bot.reconcile: the local chat map rebuilt from the markers in a full-state /sync."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest

from bot.chats import (
    CHAT_MARKER,
    MARKER_VERSION,
    SPACE_MARKER,
    Chat,
    marker_content,
    space_marker_content,
)
from bot.reconcile import LOGGED_ROOMS, reconcile_matrix_state, reconcile_single_room
from bot.store import Store
from matrix_api import MatrixClient, MatrixError, NetworkError, NotFound
from matrix_api.models import (
    Event,
    InvitedRoom,
    JoinedRoom,
    RoomID,
    Rooms,
    SyncResponse,
    SyncToken,
)

BOT = "@bot:example.org"
ALICE = "@alice:example.org"


def chat(chat_id: str, room_id: str, title: str = "a chat", owner: str = ALICE) -> Chat:
    return Chat(chat_id, RoomID(room_id), owner, title, created_ts=1000)


class FakeClient:
    """Answers ``joined_rooms`` only; touching anything else fails the test."""

    def __init__(self, joined: list[str] | Exception | None = None) -> None:
        self._joined = joined
        self.joined_rooms_calls = 0

    async def joined_rooms(self) -> list[RoomID]:
        self.joined_rooms_calls += 1
        if isinstance(self._joined, Exception):
            raise self._joined
        assert self._joined is not None, "joined_rooms was not expected to be called"
        return [RoomID(r) for r in self._joined]

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"reconcile used client.{name}")

    def api(self) -> MatrixClient:
        return cast("MatrixClient", self)


def joined(marker: dict[str, Any] | None = None, *, other_data: bool = True) -> JoinedRoom:
    account_data = [Event(type="m.fully_read", content={"event_id": "$x"})] if other_data else []
    if marker is not None:
        account_data.append(Event(type=CHAT_MARKER, content=marker))
    return JoinedRoom(account_data=account_data)


def marked(c: Chat) -> JoinedRoom:
    return joined(marker_content(c))


def sync(join: dict[str, JoinedRoom], invites: int = 0) -> SyncResponse:
    return SyncResponse(
        next_batch=SyncToken("s1"),
        rooms=Rooms(
            join={RoomID(room): room_data for room, room_data in join.items()},
            invite={RoomID(f"!invite{i}:x"): InvitedRoom() for i in range(invites)},
        ),
    )


def notes(report_list: list[Any]) -> list[tuple[str, str | None, str]]:
    return [(n.room_id, n.chat_id, n.reason) for n in report_list]


def by_id(store: Store) -> dict[str, str]:
    return {c.chat_id: c.room_id for c in store.chats()}


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(tmp_path / "bot.sqlite3", BOT)
    yield opened
    await opened.aclose()


async def test_markers_restore_an_empty_store(store: Store) -> None:
    client = FakeClient()
    initial = sync(
        {
            "!a:x": marked(chat("c_a", "!a:x")),
            "!b:x": marked(chat("c_b", "!b:x", "second")),
            "!plain:x": joined(None),
            "!broken:x": joined({"version": MARKER_VERSION, "owner": ALICE}),
        },
        invites=2,
    )

    report = await reconcile_matrix_state(client.api(), store, initial)

    assert sorted(notes(report.restored)) == [
        ("!a:x", "c_a", "restored"),
        ("!b:x", "c_b", "restored"),
    ]
    assert report.known == report.updated == report.conflicts == []
    assert sorted(notes(report.skipped)) == [
        ("!broken:x", None, "bad_marker"),
        ("!plain:x", None, "no_marker"),
    ]
    [bad] = [n for n in report.skipped if n.reason == "bad_marker"]
    assert "chat_id" in bad.detail
    assert report.rooms_seen == 4
    assert report.pending_invites == 2
    assert store.chat_for_room("!a:x") == chat("c_a", "!a:x")
    assert store.chat_for_room("!b:x") == chat("c_b", "!b:x", "second")
    assert store.chat_for_room("!plain:x") is None
    assert client.joined_rooms_calls == 0  # nothing local was missing


async def test_the_store_is_written_not_just_the_memory(store: Store, tmp_path: Path) -> None:
    await reconcile_matrix_state(
        FakeClient().api(), store, sync({"!a:x": marked(chat("c_a", "!a:x"))})
    )
    await store.aclose()

    reopened = await Store.open(tmp_path / "bot.sqlite3", BOT)
    try:
        assert reopened.chats() == [chat("c_a", "!a:x")]
    finally:
        await reopened.aclose()


async def test_chats_the_store_has_exactly_are_known(store: Store) -> None:
    await store.apply_chats(put=[chat("c_a", "!a:x")])

    report = await reconcile_matrix_state(
        FakeClient().api(), store, sync({"!a:x": marked(chat("c_a", "!a:x"))})
    )

    assert notes(report.known) == [("!a:x", "c_a", "known")]
    assert report.restored == report.updated == report.conflicts == report.skipped == []


@pytest.mark.parametrize(
    "server_side",
    [
        chat("c_a", "!a:x", title="renamed"),
        chat("c_a", "!a:x", owner="@bob:example.org"),
        Chat("c_a", RoomID("!a:x"), ALICE, "a chat", 1000, archived=True),
    ],
    ids=["title", "owner", "archived"],
)
async def test_a_local_copy_that_differs_is_updated_from_the_server(
    store: Store, server_side: Chat
) -> None:
    await store.apply_chats(put=[chat("c_a", "!a:x")])

    report = await reconcile_matrix_state(
        FakeClient().api(), store, sync({"!a:x": marked(server_side)})
    )

    assert notes(report.updated) == [("!a:x", "c_a", "updated")]
    assert report.conflicts == []
    assert store.chat_for_room("!a:x") == server_side


async def test_a_duplicate_chat_id_goes_to_the_lowest_room_id(store: Store) -> None:
    initial = sync(
        {
            "!c:x": marked(chat("c_dup", "!c:x")),
            "!a:x": marked(chat("c_dup", "!a:x")),
            "!b:x": marked(chat("c_dup", "!b:x")),
        }
    )

    report = await reconcile_matrix_state(FakeClient().api(), store, initial)

    assert notes(report.restored) == [("!a:x", "c_dup", "restored")]
    assert sorted(notes(report.conflicts)) == [
        ("!b:x", "c_dup", "duplicate_chat_id"),
        ("!c:x", "c_dup", "duplicate_chat_id"),
    ]
    assert all("!a:x" in n.detail for n in report.conflicts)
    assert by_id(store) == {"c_dup": "!a:x"}
    assert store.chat_for_room("!b:x") is None


async def test_a_duplicate_chat_id_stays_in_the_room_the_store_knows(store: Store) -> None:
    await store.apply_chats(put=[chat("c_dup", "!z:x")])
    initial = sync({"!a:x": marked(chat("c_dup", "!a:x")), "!z:x": marked(chat("c_dup", "!z:x"))})

    report = await reconcile_matrix_state(FakeClient().api(), store, initial)

    assert notes(report.known) == [("!z:x", "c_dup", "known")]
    assert notes(report.conflicts) == [("!a:x", "c_dup", "duplicate_chat_id")]
    assert by_id(store) == {"c_dup": "!z:x"}


async def test_the_duplicate_winner_is_the_same_whatever_the_sync_order(
    tmp_path: Path,
) -> None:
    rooms = ["!m:x", "!b:x", "!q:x"]
    winners = set()
    for order in (rooms, rooms[::-1], sorted(rooms)):
        store = await Store.open(tmp_path / f"{'-'.join(order)}.sqlite3", BOT)
        await reconcile_matrix_state(
            FakeClient().api(), store, sync({r: marked(chat("c_dup", r)) for r in order})
        )
        winners.add(store.chat_by_id("c_dup"))
        await store.aclose()

    assert winners == {chat("c_dup", "!b:x")}


async def test_a_marker_contradicting_the_store_wins(store: Store) -> None:
    await store.apply_chats(put=[chat("c_local", "!a:x")])

    report = await reconcile_matrix_state(
        FakeClient().api(), store, sync({"!a:x": marked(chat("c_server", "!a:x"))})
    )

    assert notes(report.conflicts) == [("!a:x", "c_server", "local_disagrees")]
    assert "c_local" in report.conflicts[0].detail
    assert report.restored == report.updated == []
    assert by_id(store) == {"c_server": "!a:x"}


async def test_a_stored_chat_whose_room_was_left_is_dropped(store: Store) -> None:
    await store.apply_chats(put=[chat("c_gone", "!gone:x"), chat("c_a", "!a:x")])
    client = FakeClient(joined=["!a:x"])

    report = await reconcile_matrix_state(
        client.api(), store, sync({"!a:x": marked(chat("c_a", "!a:x"))})
    )

    assert notes(report.conflicts) == [("!gone:x", "c_gone", "room_left")]
    assert notes(report.known) == [("!a:x", "c_a", "known")]
    assert by_id(store) == {"c_a": "!a:x"}
    assert client.joined_rooms_calls == 1


async def test_a_joined_room_whose_marker_is_gone_is_dropped_locally(store: Store) -> None:
    await store.apply_chats(put=[chat("c_a", "!a:x")])
    client = FakeClient(joined=["!a:x"])

    report = await reconcile_matrix_state(client.api(), store, sync({"!a:x": joined(None)}))

    assert notes(report.skipped) == [("!a:x", None, "no_marker")]
    assert notes(report.conflicts) == [("!a:x", "c_a", "local_disagrees")]
    assert store.chats() == []


async def test_a_chat_the_server_moved_to_another_room_follows_it(store: Store) -> None:
    await store.apply_chats(put=[chat("c_a", "!old:x")])
    client = FakeClient(joined=["!new:x"])

    report = await reconcile_matrix_state(
        client.api(), store, sync({"!new:x": marked(chat("c_a", "!new:x"))})
    )

    assert notes(report.restored) == [("!new:x", "c_a", "restored")]
    assert report.conflicts == []  # not reported as a room left
    assert by_id(store) == {"c_a": "!new:x"}
    assert store.chat_for_room("!old:x") is None


@pytest.mark.parametrize("missing", [0, 1, 2, 40])
async def test_joined_rooms_is_called_at_most_once(store: Store, missing: int) -> None:
    await store.apply_chats(put=[chat(f"c_gone{i}", f"!gone{i}:x") for i in range(missing)])
    client = FakeClient(joined=[f"!r{i}:x" for i in range(30)])
    initial = sync({f"!r{i}:x": marked(chat(f"c{i}", f"!r{i}:x")) for i in range(30)})

    report = await reconcile_matrix_state(client.api(), store, initial)

    assert client.joined_rooms_calls == min(missing, 1)
    assert len(report.restored) == 30
    assert len(report.conflicts) == missing
    assert len(store.chats()) == 30


async def test_a_failed_joined_rooms_falls_back_to_the_sync(store: Store) -> None:
    await store.apply_chats(put=[chat("c_gone", "!gone:x"), chat("c_a", "!a:x")])
    client = FakeClient(joined=NetworkError("connection reset", maybe_processed=True))

    report = await reconcile_matrix_state(client.api(), store, sync({"!a:x": joined(None)}))

    assert client.joined_rooms_calls == 1
    assert sorted(notes(report.conflicts)) == [
        ("!a:x", "c_a", "local_disagrees"),  # in the sync, so joined
        ("!gone:x", "c_gone", "room_left"),
    ]


async def test_reconciling_twice_finds_everything_known(store: Store) -> None:
    await store.apply_chats(put=[chat("c_local", "!a:x"), chat("c_gone", "!gone:x")])
    initial = sync(
        {
            "!a:x": marked(chat("c_server", "!a:x")),
            "!b:x": marked(chat("c_b", "!b:x")),
            "!c:x": marked(chat("c_b", "!c:x")),
        }
    )
    await reconcile_matrix_state(FakeClient(joined=["!a:x", "!b:x"]).api(), store, initial)

    second = FakeClient()
    report = await reconcile_matrix_state(second.api(), store, initial)

    assert sorted(notes(report.known)) == [("!a:x", "c_server", "known"), ("!b:x", "c_b", "known")]
    assert notes(report.conflicts) == [("!c:x", "c_b", "duplicate_chat_id")]
    assert report.restored == report.updated == []
    assert second.joined_rooms_calls == 0


async def test_the_log_fields_summarise_the_report(store: Store) -> None:
    await store.apply_chats(put=[chat("c_gone", "!gone:x")])
    report = await reconcile_matrix_state(
        FakeClient(joined=[]).api(),
        store,
        sync({"!a:x": marked(chat("c_a", "!a:x")), "!p:x": joined(None)}, invites=1),
    )

    fields = report.log_fields()

    assert {
        "rooms_seen": 2,
        "restored": 1,
        "known": 0,
        "updated": 0,
        "skipped": 1,
        "conflicts": 1,
        "pending_invites": 1,
        "skipped_rooms": [
            {"room_id": "!p:x", "chat_id": None, "reason": "no_marker", "detail": ""}
        ],
        "conflict_rooms": [
            {
                "room_id": "!gone:x",
                "chat_id": "c_gone",
                "reason": "room_left",
                "detail": "the bot is not in the room",
            }
        ],
    }.items() <= fields.items()
    assert fields["duration_ms"] >= 0


async def test_the_log_line_names_at_most_twenty_rooms_of_a_kind_and_counts_them_all(
    store: Store,
) -> None:
    foreign = {f"!foreign{n}:x": joined(None) for n in range(300)}
    report = await reconcile_matrix_state(FakeClient(joined=[]).api(), store, sync(foreign))

    fields = report.log_fields()

    assert fields["skipped"] == 300
    assert len(fields["skipped_rooms"]) == LOGGED_ROOMS == 20
    assert fields["conflict_rooms"] == []


# --- Spaces ----------------------------------------------------------------------------------


def space(owner: str = ALICE) -> JoinedRoom:
    return JoinedRoom(account_data=[Event(type=SPACE_MARKER, content=space_marker_content(owner))])


async def test_a_users_space_is_restored_and_is_not_a_skipped_room(store: Store) -> None:
    report = await reconcile_matrix_state(
        FakeClient().api(),
        store,
        sync({"!space:x": space(), "!a:x": marked(chat("c_a", "!a:x"))}),
    )

    assert report.spaces == 1
    assert report.skipped == report.conflicts == []
    assert store.space_for(ALICE) == "!space:x"
    assert store.chat_for_room("!space:x") is None


async def test_a_space_the_server_no_longer_has_is_forgotten(store: Store) -> None:
    await store.apply_spaces(put={ALICE: RoomID("!old-space:x")})

    report = await reconcile_matrix_state(FakeClient().api(), store, sync({"!p:x": joined(None)}))

    assert report.spaces == 0
    assert store.spaces() == {}


async def test_a_bad_space_marker_is_skipped(store: Store) -> None:
    bad = JoinedRoom(account_data=[Event(type=SPACE_MARKER, content={"version": 1})])

    report = await reconcile_matrix_state(FakeClient().api(), store, sync({"!s:x": bad}))

    assert notes(report.skipped) == [("!s:x", None, "bad_marker")]
    assert store.spaces() == {}


async def test_a_duplicate_space_is_settled_like_a_duplicate_chat(tmp_path: Path) -> None:
    winners = set()
    for index, order in enumerate((["!b:x", "!a:x"], ["!a:x", "!b:x"])):
        store = await Store.open(tmp_path / f"{index}.sqlite3", BOT)
        report = await reconcile_matrix_state(
            FakeClient().api(), store, sync({room: space() for room in order})
        )
        assert [n.reason for n in report.conflicts] == ["duplicate_space"]
        winners.add(store.space_for(ALICE))
        await store.aclose()

    assert winners == {"!a:x"}


# --- one room on demand -----------------------------------------------------------------


class MarkerClient:
    """Answers ``get_room_account_data`` with a marker or an error."""

    def __init__(self, answer: dict[str, Any] | Exception) -> None:
        self._answer = answer
        self.asked: list[tuple[str, str]] = []

    async def get_room_account_data(self, room_id: RoomID, event_type: str) -> dict[str, Any]:
        self.asked.append((room_id, event_type))
        if isinstance(self._answer, Exception):
            raise self._answer
        return self._answer

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"reconcile_single_room used client.{name}")

    def api(self) -> MatrixClient:
        return cast("MatrixClient", self)


ROOM = RoomID("!lost:x")


async def test_a_room_with_a_marker_is_restored(store: Store) -> None:
    client = MarkerClient(marker_content(chat("c_lost", ROOM)))

    report = await reconcile_single_room(client.api(), store, ROOM, ALICE)

    assert report.ok
    assert report.chat_id == "c_lost"
    assert report.room_id == ROOM
    assert store.chat_for_room(ROOM) == chat("c_lost", ROOM)
    assert client.asked == [(ROOM, CHAT_MARKER)]
    assert report.log_fields() == {"ok": True, "chat_id": "c_lost", "reason": report.reason}


async def test_a_room_whose_chat_was_elsewhere_moves_it(store: Store) -> None:
    await store.apply_chats(put=[chat("c_other", ROOM)])

    report = await reconcile_single_room(
        MarkerClient(marker_content(chat("c_lost", ROOM))).api(), store, ROOM, ALICE
    )

    assert report.ok
    assert by_id(store) == {"c_lost": ROOM}


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (NotFound(404, "M_NOT_FOUND", "Account data not found"), "no chat marker"),
        ({"version": MARKER_VERSION, "chat_id": "c_x", "owner": "nobody"}, "unreadable marker"),
        ({"version": MARKER_VERSION + 1, "chat_id": "c_x", "owner": ALICE}, "unreadable marker"),
        ({}, "unreadable marker"),
        (NetworkError("connection refused", maybe_processed=False), "could not read the marker"),
        (MatrixError(502, "M_UNKNOWN", "bad gateway"), "could not read the marker"),
    ],
    ids=["not-found", "bad-owner", "newer", "empty", "network", "server-error"],
)
async def test_a_room_that_cannot_be_restored_is_not_ok(
    store: Store, answer: dict[str, Any] | Exception, says: str
) -> None:
    report = await reconcile_single_room(MarkerClient(answer).api(), store, ROOM, ALICE)

    assert not report.ok
    assert says in report.reason
    assert store.chats() == []


async def test_a_chat_id_held_by_another_room_is_not_taken(store: Store) -> None:
    await store.apply_chats(put=[chat("c_taken", "!holder:x")])

    report = await reconcile_single_room(
        MarkerClient(marker_content(chat("c_taken", ROOM))).api(), store, ROOM, ALICE
    )

    assert not report.ok
    assert report.chat_id == "c_taken"
    assert "!holder:x" in report.reason
    assert by_id(store) == {"c_taken": "!holder:x"}
    assert store.chat_for_room(ROOM) is None
