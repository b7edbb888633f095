"""bot.chats: the chat marker written to the server and read back."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot.chats import (
    CHAT_MARKER,
    MARKER_VERSION,
    MAX_TITLE,
    Chat,
    MarkerError,
    chat_from_marker,
    marker_content,
    new_chat_id,
    safe_title,
    title_problem,
    write_marker,
)
from matrix_api.models import RoomID

ROOM = RoomID("!room:example.org")
CHAT = Chat(
    chat_id="c_abc", room_id=ROOM, owner="@alice:example.org", title="Plans", created_ts=1234
)


def test_a_marker_round_trips() -> None:
    content = marker_content(CHAT)

    assert content == {
        "version": MARKER_VERSION,
        "chat_id": "c_abc",
        "owner": "@alice:example.org",
        "title": "Plans",
        "created_ts": 1234,
        "archived": False,
    }
    assert chat_from_marker(ROOM, content) == CHAT


@given(
    chat_id=st.text(min_size=1),
    owner=st.text().map(lambda s: "@" + s),
    title=st.text(max_size=255),
    created_ts=st.integers(min_value=0, max_value=2**53),
    archived=st.booleans(),
)
def test_any_chat_round_trips(
    chat_id: str, owner: str, title: str, created_ts: int, archived: bool
) -> None:
    chat = Chat(chat_id, ROOM, owner, title, created_ts, archived)

    # A title the bot itself checked comes back as it was; any other comes back safe.
    assert chat_from_marker(ROOM, marker_content(chat)) == chat.with_title(safe_title(title))
    if title_problem(title) is None and title == " ".join(title.split()):
        assert safe_title(title) == title


@given(raw=st.text(st.characters(blacklist_categories=())) | st.text(max_size=400))
def test_a_safe_title_is_safe_and_stays_so(raw: str) -> None:
    title = safe_title(raw)

    assert title_problem(title) is None
    assert len(title) <= MAX_TITLE
    assert title == " ".join(title.split())
    assert safe_title(title) == title


@pytest.mark.parametrize(
    ("hostile", "restored"),
    [
        ("Pay\u202eecnalab", "Payecnalab"),
        ("\u200b\u200b", ""),
        ("ad\u200bmin\U000e0041\U000e007f", "admin"),
        ("line\u2028break\nand\ttab", "line break and tab"),
        ("\u200dx\u200d", "x"),
        ("a\u200d\u200bb", "ab"),
        ("\u0645\u06cc\u200c\u062e", "\u0645\u06cc\u200c\u062e"),
        ("x" * (MAX_TITLE - 1) + "\u200d" + "y", "x" * (MAX_TITLE - 1)),
    ],
)
def test_a_hostile_title_in_a_marker_is_made_safe_not_refused(hostile: str, restored: str) -> None:
    chat = chat_from_marker(ROOM, {**marker_content(CHAT), "title": hostile})

    assert chat.title == restored
    assert chat.chat_id == CHAT.chat_id


def test_the_room_comes_from_where_the_marker_is_not_from_the_marker() -> None:
    other = RoomID("!elsewhere:example.org")

    assert chat_from_marker(other, marker_content(CHAT)).room_id == other


def test_optional_fields_take_defaults() -> None:
    chat = chat_from_marker(ROOM, {"version": 1, "chat_id": "c_1", "owner": "@a:b"})

    assert chat == Chat("c_1", ROOM, "@a:b", title="", created_ts=0, archived=False)


def test_a_long_title_is_cut() -> None:
    content = {**marker_content(CHAT), "title": "x" * 1000}

    assert chat_from_marker(ROOM, content).title == "x" * 255


def test_unknown_fields_are_ignored() -> None:
    content = {**marker_content(CHAT), "org.example.extra": {"anything": 1}}

    assert chat_from_marker(ROOM, content) == CHAT


GOOD = marker_content(CHAT)


def without(key: str) -> dict[str, Any]:
    return {k: v for k, v in GOOD.items() if k != key}


@pytest.mark.parametrize(
    ("content", "says"),
    [
        pytest.param({}, "no version", id="empty"),
        pytest.param(without("version"), "no version", id="no-version"),
        pytest.param({**GOOD, "version": "1"}, "no version", id="version-string"),
        pytest.param({**GOOD, "version": True}, "no version", id="version-bool"),
        pytest.param({**GOOD, "version": 1.0}, "no version", id="version-float"),
        pytest.param({**GOOD, "version": MARKER_VERSION + 1}, "newer", id="newer-version"),
        pytest.param(without("chat_id"), "chat_id", id="no-chat-id"),
        pytest.param({**GOOD, "chat_id": ""}, "chat_id", id="empty-chat-id"),
        pytest.param({**GOOD, "chat_id": 7}, "chat_id", id="chat-id-int"),
        pytest.param({**GOOD, "chat_id": None}, "chat_id", id="chat-id-null"),
        pytest.param(without("owner"), "owner", id="no-owner"),
        pytest.param({**GOOD, "owner": "alice"}, "owner", id="owner-not-a-user-id"),
        pytest.param({**GOOD, "owner": ["@alice:example.org"]}, "owner", id="owner-list"),
        pytest.param({**GOOD, "title": 5}, "title", id="title-int"),
        pytest.param({**GOOD, "created_ts": True}, "created_ts", id="created-ts-bool"),
        pytest.param({**GOOD, "created_ts": "1234"}, "created_ts", id="created-ts-string"),
        pytest.param({**GOOD, "created_ts": 1.5}, "created_ts", id="created-ts-float"),
        pytest.param({**GOOD, "archived": 1}, "archived", id="archived-int"),
        pytest.param({**GOOD, "archived": "yes"}, "archived", id="archived-string"),
    ],
)
def test_a_malformed_marker_is_a_marker_error(content: dict[str, Any], says: str) -> None:
    with pytest.raises(MarkerError, match=says):
        chat_from_marker(ROOM, content)


def test_a_marker_error_is_a_value_error() -> None:
    assert issubclass(MarkerError, ValueError)


def test_new_chat_ids_are_fresh_and_not_room_ids() -> None:
    ids = {new_chat_id() for _ in range(1000)}

    assert len(ids) == 1000
    assert all(chat_id.startswith("c_") and len(chat_id) > 10 for chat_id in ids)


def test_with_title_changes_only_the_title() -> None:
    renamed = CHAT.with_title("New")

    assert renamed == Chat(CHAT.chat_id, ROOM, CHAT.owner, "New", CHAT.created_ts)
    assert CHAT.title == "Plans"


class RecordingClient:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    async def put_room_account_data(
        self, room_id: str, event_type: str, content: dict[str, Any]
    ) -> None:
        self.calls.append((room_id, event_type, content))


async def test_write_marker_puts_the_whole_marker_in_room_account_data() -> None:
    client = RecordingClient()

    await write_marker(client, CHAT)  # type: ignore[arg-type]

    assert client.calls == [(ROOM, CHAT_MARKER, marker_content(CHAT))]
