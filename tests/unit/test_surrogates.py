"""One event with a lone surrogate escape must not sink a whole /sync or /messages page."""

from __future__ import annotations

import json

import pytest

from matrix_api.models import decode_sync
from matrix_api.models.responses import decode_messages
from matrix_api.models.surrogates import replace_lone_surrogates


@pytest.mark.parametrize(
    ("raw", "mended", "count"),
    [
        (rb'"\ud800"', rb'"\ufffd"', 1),
        (rb'"\udc00"', rb'"\ufffd"', 1),
        (rb'"x\uD800y"', rb'"x\ufffdy"', 1),
        (rb'"\ud83d\ude00"', rb'"\ud83d\ude00"', 0),  # a valid pair stays
        (rb'"\\ud800"', rb'"\\ud800"', 0),  # an escaped backslash, then text
        (rb'"\\\ud800"', rb'"\\\ufffd"', 1),  # an escaped backslash, then a lone one
        (rb'"\ud800\udc00\udc00"', rb'"\ud800\udc00\ufffd"', 1),
    ],
)
def test_only_lone_surrogate_escapes_are_replaced(raw: bytes, mended: bytes, count: int) -> None:
    assert replace_lone_surrogates(raw) == (mended, count)


def _message(event_id: str, body: str) -> str:
    """A message event as JSON text; ``body`` is already JSON (it may hold escapes)."""
    head = f'{{"type": "m.room.message", "event_id": "{event_id}", "sender": "@a:x", '
    return head + '"origin_server_ts": 1, "content": {"msgtype": "m.text", "body": ' + body + "}}"


def test_a_sync_with_a_lone_surrogate_decodes_the_rest_and_says_what_it_mended() -> None:
    events = ",".join([_message("$1", '"fine"'), _message("$2", r'"bad \ud800"')])
    body = (
        '{"next_batch": "s2", "rooms": {"join": {"!r:x": {"timeline": {"events": ['
        + events
        + "]}}}}}"
    ).encode()
    assert json.loads(body)  # valid JSON: it is msgspec that refuses the escape
    sync = decode_sync(body)
    timeline = sync.rooms.join["!r:x"].timeline.events
    assert [e.content["body"] for e in timeline] == ["fine", "bad \ufffd"]
    assert [s.where for s in sync.skipped] == ["body"]


def test_a_messages_page_with_a_lone_surrogate_decodes() -> None:
    body = ('{"start": "t1", "end": "t0", "chunk": [' + _message("$1", r'"\udfff"') + "]}").encode()
    page = decode_messages(body)
    assert page.chunk[0].content["body"] == "\ufffd"
    assert page.skipped
