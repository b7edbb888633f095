"""Depth without recursion: `exceeds_depth`, `cut_too_deep`, and the decoders that use them."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from matrix_api.models import MAX_EVENT_BYTES, MAX_EVENT_DEPTH, decode_sync
from matrix_api.models.nesting import cut_too_deep, exceeds_depth
from matrix_api.models.responses import decode_messages

PLACEHOLDER = b'"cut"'


def nested(depth: int, opener: str = "[") -> str:
    closer = "]" if opener == "[" else "}"
    if opener == "{":
        return '{"a":' * depth + "1" + "}" * depth
    return opener * depth + closer * depth


def event(event_id: str, content: str = '{"msgtype": "m.text", "body": "hi"}') -> str:
    return (
        f'{{"type": "m.room.message", "event_id": "{event_id}", "sender": "@a:b",'
        f' "origin_server_ts": 1, "content": {content}}}'
    )


def x_of(value: str) -> str:
    return '{"x": ' + value + "}"


def sync_body(*events: str, summary: str = "{}") -> bytes:
    timeline = ", ".join(events)
    return (
        f'{{"next_batch": "s2", "rooms": {{"join": {{"!r:x": {{"timeline": {{"events":'
        f' [{timeline}]}}, "summary": {summary}}}}}}}}}'
    ).encode()


# --- exceeds_depth -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "limit", "expected"),
    [
        (b"[]", 1, False),
        (b"[[]]", 1, True),
        (b'{"a": [1, {"b": 2}]}', 3, False),
        (b'{"a": [1, {"b": 2}]}', 2, True),
        (b'["[[[[[[", "{{{{{{"]', 1, False),  # brackets in strings do not count
        (b'["\\"[[[[[[", "\\\\", []]', 2, False),  # nor after escaped quotes
        (b'["\\\\"', 5, False),
        (b"[1], [2], [3], [4]", 1, False),  # many brackets, never deep
    ],
)
def test_exceeds_depth(raw: bytes, limit: int, expected: bool) -> None:
    assert exceeds_depth(raw, limit) is expected


@given(st.recursive(st.none() | st.integers() | st.text(), lambda inner: st.lists(inner)))
def test_exceeds_depth_agrees_with_a_recursive_walk(value: Any) -> None:
    def depth(v: Any) -> int:
        return 1 + max(map(depth, v), default=0) if isinstance(v, list) else 0

    raw = json.dumps(value).encode()
    for limit in range(depth(value) + 1):
        assert exceeds_depth(raw, limit) is (depth(value) > limit)


# --- cut_too_deep --------------------------------------------------------------------------


def test_a_shallow_document_is_returned_as_it_is() -> None:
    body = sync_body(event("$a"), event("$b"))
    assert cut_too_deep(body, 20, PLACEHOLDER, {"events"}) == (body, [])


def test_an_event_holding_a_deep_value_is_cut_whole_with_its_ids() -> None:
    body = sync_body(event("$a"), event("$deep", nested(50)), event("$c"))

    mended, [cut] = cut_too_deep(body, 20, PLACEHOLDER, {"events"})

    doc = json.loads(mended)
    events = doc["rooms"]["join"]["!r:x"]["timeline"]["events"]
    assert [e if e == "cut" else e["event_id"] for e in events] == ["$a", "cut", "$c"]
    assert cut.is_event
    assert (cut.event_id, cut.sender) == ("$deep", "@a:b")
    assert cut.path == ["rooms", "join", "!r:x", "timeline", "events", 1]


def test_ids_after_the_deep_content_are_kept_too() -> None:
    deep = '{"content": ' + nested(40, "{") + ', "event_id": "$late", "sender": "@z:b"}'
    body = sync_body(deep)

    _, [cut] = cut_too_deep(body, 20, PLACEHOLDER, {"events"})

    assert (cut.event_id, cut.sender) == ("$late", "@z:b")


def test_a_deep_value_outside_events_becomes_null_where_it_crosses_the_limit() -> None:
    body = sync_body(event("$a"), summary=x_of(nested(100)))

    mended, [cut] = cut_too_deep(body, 20, PLACEHOLDER, {"events"})

    assert not cut.is_event
    assert cut.path[:4] == ["rooms", "join", "!r:x", "summary"]
    doc = json.loads(mended)
    assert doc["rooms"]["join"]["!r:x"]["timeline"]["events"][0]["event_id"] == "$a"
    value = doc["rooms"]["join"]["!r:x"]["summary"]["x"]
    levels = 0
    while isinstance(value, list):
        value = value[0] if value else None
        levels += 1
    assert value is None
    assert levels == 20 - 5  # the limit, less the levels above "x"


def test_a_truncated_deep_document_is_cut_to_its_end_and_left_for_the_decoder() -> None:
    body = b'{"next_batch": "s", "events": [{"event_id": "$t", "content": ' + b"[" * 50
    mended, [cut] = cut_too_deep(body, 10, PLACEHOLDER, {"events"})
    assert mended.endswith(PLACEHOLDER)
    with pytest.raises(msgspec.DecodeError):
        decode_sync(mended)
    assert cut.is_event


def test_brackets_and_keys_inside_strings_do_not_confuse_the_cut() -> None:
    tricky = '{"body": "]]]}}} \\"events\\": [[[[", "event_id": "$s\\"q", "sender": "@a:b"}'
    body = sync_body(event("$deep", nested(30)), event("$t", tricky))

    mended, [cut] = cut_too_deep(body, 20, PLACEHOLDER, {"events"})

    events = json.loads(mended)["rooms"]["join"]["!r:x"]["timeline"]["events"]
    assert events[0] == "cut"
    assert events[1]["content"]["event_id"] == '$s"q'
    assert cut.event_id == "$deep"


# --- the decoders ----------------------------------------------------------------------


@pytest.mark.parametrize("depth", [MAX_EVENT_DEPTH + 1, 1_000, 200_000])
@pytest.mark.parametrize("opener", ["[", "{"])
def test_decode_sync_skips_a_deep_event_and_keeps_the_rest(depth: int, opener: str) -> None:
    body = sync_body(event("$a"), event("$deep", nested(depth, opener)), event("$c"))

    sync = decode_sync(body)

    timeline = sync.rooms.join["!r:x"].timeline.events
    assert [e.event_id for e in timeline] == ["$a", "$c"]
    [skipped] = sync.skipped
    assert (skipped.event_id, skipped.sender, skipped.room_id) == ("$deep", "@a:b", "!r:x")
    assert "nested deeper" in skipped.reason
    assert sync.next_batch == "s2"


def test_an_event_just_under_the_depth_limit_decodes() -> None:
    # The event object and its content are two of the levels.
    body = sync_body(event("$fine", x_of(nested(MAX_EVENT_DEPTH - 2))))
    sync = decode_sync(body)
    assert [e.event_id for e in sync.rooms.join["!r:x"].timeline.events] == ["$fine"]
    assert sync.skipped == []


def test_decode_sync_mends_a_deep_summary_and_keeps_the_room() -> None:
    sync = decode_sync(sync_body(event("$a"), summary=x_of(nested(5_000))))

    assert [e.event_id for e in sync.rooms.join["!r:x"].timeline.events] == ["$a"]
    [skipped] = sync.skipped
    assert skipped.where.startswith("rooms.join.!r:x.summary.x")
    assert skipped.event_id is None


def test_decode_sync_mends_a_deep_event_and_a_lone_surrogate_together() -> None:
    lone = event("$lone", '{"msgtype": "m.text", "body": "\\ud800"}')
    sync = decode_sync(sync_body(lone, event("$deep", nested(3_000))))

    [kept] = sync.rooms.join["!r:x"].timeline.events
    assert kept.content["body"] == "\ufffd"
    assert sorted(s.reason.split()[0] for s in sync.skipped) == ["1", "nested"]


def test_deep_events_in_every_section_are_skipped() -> None:
    deep = event("$deep", nested(2_000))
    body = (
        (
            '{"next_batch": "s", "account_data": {"events": [DEEP]},'
            ' "to_device": {"events": [DEEP]},'
            ' "rooms": {"invite": {"!i:x": {"invite_state": {"events": [DEEP]}}},'
            ' "leave": {"!l:x": {"state": {"events": [DEEP]}}}}}'
        )
        .replace("DEEP", deep)
        .encode()
    )

    sync = decode_sync(body)

    assert sync.rooms.invite["!i:x"].invite_state == []
    assert sync.rooms.leave["!l:x"].state == []
    assert len(sync.skipped) == 4
    assert {s.room_id for s in sync.skipped} == {None, "!i:x", "!l:x"}


def test_a_too_large_event_is_skipped_before_decoding() -> None:
    big = event("$big", json.dumps({"msgtype": "m.text", "body": "x" * MAX_EVENT_BYTES}))
    sync = decode_sync(sync_body(big, event("$ok")))

    assert [e.event_id for e in sync.rooms.join["!r:x"].timeline.events] == ["$ok"]
    [skipped] = sync.skipped
    assert (skipped.event_id, "larger than" in skipped.reason) == ("$big", True)


def test_a_broken_event_keeps_its_ids_for_the_record() -> None:
    bad = '{"type": "m.room.message", "event_id": "$bad", "sender": "@a:b", "content": []}'
    sync = decode_sync(sync_body(bad))

    [skipped] = sync.skipped
    assert (skipped.event_id, skipped.sender, skipped.room_id) == ("$bad", "@a:b", "!r:x")


def test_decode_messages_skips_a_deep_event() -> None:
    body = (
        '{"start": "t1", "end": "t0", "chunk": [A, B], "state": [S]}'.replace("A", event("$a"))
        .replace("B", event("$deep", nested(10_000)))
        .replace("S", event("$s", nested(10_000, "{")))
    ).encode()

    page = decode_messages(body)

    assert [e.event_id for e in page.chunk] == ["$a"]
    assert page.state == []
    assert sorted(s.event_id or "" for s in page.skipped) == ["$deep", "$s"]


@pytest.mark.parametrize(
    "body",
    [
        b'{"next_batch": ' + b"[" * 100_000,
        b"[" * 100_000 + b"]" * 100_000,
    ],
)
def test_an_envelope_deep_at_its_core_is_a_decode_error_and_nothing_else(body: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        decode_sync(body)


def test_an_envelope_part_deep_where_rooms_belong_is_left_out() -> None:
    body = b'{"next_batch": "s", "rooms": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"

    sync = decode_sync(body)

    assert sync.next_batch == "s"
    assert [s.where for s in sync.skipped] == ["rooms[0][0][0][0][0][0][0]...", "rooms"]
