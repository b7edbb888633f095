"""`MatrixClient.relations`: the request it sends, and what each answer becomes,
hostile ones included (one bad event costs only itself; a broken envelope is a
`BadResponse`; a huge body stops at the transport's limit)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import trio

from matrix_api import (
    BadResponse,
    MatrixAPIError,
    MatrixClient,
    MatrixError,
    NotFound,
    ResponseLimitExceeded,
)
from matrix_api.http import DEFAULT_LIMITS
from matrix_api.models import MAX_EVENT_BYTES, EventID, RelationsResponse, RoomID
from matrix_mock import NO_RETRY, ScriptedServer, matrix_error, ok, raw, room_event
from scripted_http import sends, serving

ROOM = RoomID("!room:example.org")
ROOT = EventID("$ro/ot+1")  # room version 3 event ids hold '/' and '+'
RELATIONS = "/_matrix/client/v1/rooms/%21room%3Aexample.org/relations/%24ro%2Fot%2B1"


def in_thread(event_id: str, root: str = ROOT) -> dict[str, Any]:
    return room_event(
        event_id,
        content={
            "msgtype": "m.text",
            "body": "in the thread",
            "m.relates_to": {"rel_type": "m.thread", "event_id": root},
        },
    )


async def page_for(answer: httpx.Response) -> RelationsResponse:
    server = ScriptedServer(answer)
    async with server.client(retry_policy=NO_RETRY) as client:
        return await client.relations(ROOM, ROOT, "m.thread")


async def failure_for(answer: httpx.Response) -> MatrixAPIError:
    with pytest.raises(MatrixAPIError) as raised:
        await page_for(answer)
    return raised.value


# --- the request ------------------------------------------------------------------------


async def test_every_path_segment_is_encoded_and_direction_defaults_to_newest_first() -> None:
    server = ScriptedServer(ok({"chunk": []}))
    async with server.client() as client:
        await client.relations(ROOM, ROOT, "org.example.rel/x", "org.example.тип ?")
    seen = server.only
    assert seen.method == "GET"
    assert seen.raw_path == (
        f"{RELATIONS}/org.example.rel%2Fx/org.example.%D1%82%D0%B8%D0%BF%20%3F"
    )
    assert seen.query == [("dir", "b")]  # no recurse, limit or from unless asked


async def test_the_paging_parameters_and_recurse_are_sent_when_asked() -> None:
    server = ScriptedServer(ok({"chunk": []}), ok({"chunk": []}))
    async with server.client() as client:
        await client.relations(
            ROOM, ROOT, "m.thread", from_token="t 1&x=y", limit=2, direction="f", recurse=True
        )
        await client.relations(ROOM, ROOT)
    paged, bare = server.seen
    assert paged.raw_path == f"{RELATIONS}/m.thread"
    assert paged.params == {"dir": "f", "from": "t 1&x=y", "limit": "2", "recurse": "true"}
    assert bare.raw_path == RELATIONS
    assert bare.query == [("dir", "b")]


@pytest.mark.parametrize(
    ("rel_type", "event_type"),
    [(None, "m.room.message"), ("", None), ("m.thread", "")],
)
async def test_a_path_the_spec_does_not_have_is_refused_before_sending(
    rel_type: str | None, event_type: str | None
) -> None:
    server = ScriptedServer()  # any request would fail the test
    async with server.client() as client:
        with pytest.raises(ValueError, match=r"rel_type|event_type"):
            await client.relations(ROOM, ROOT, rel_type, event_type)
    assert server.seen == []


async def test_a_dot_event_id_stays_a_segment_of_its_own() -> None:
    server = ScriptedServer(ok({"chunk": []}))
    async with server.client() as client:
        await client.relations(ROOM, EventID(".."), "..")
    assert server.only.raw_path.endswith("/relations/%2E%2E/%2E%2E")


# --- the answer -------------------------------------------------------------------------


async def test_a_page_decodes_with_its_tokens() -> None:
    page = await page_for(
        ok(
            {
                "chunk": [in_thread("$b"), in_thread("$a")],
                "next_batch": "n1",
                "prev_batch": "p1",
                "recursion_depth": 3,
                "original_event": {"unknown": "fields are ignored"},
            }
        )
    )
    assert [event.event_id for event in page.chunk] == ["$b", "$a"]
    assert page.chunk[0].content["m.relates_to"]["event_id"] == ROOT
    assert (page.next_batch, page.prev_batch, page.recursion_depth) == ("n1", "p1", 3)
    assert page.skipped == []


async def test_an_empty_last_page_has_no_tokens() -> None:
    page = await page_for(ok({"chunk": []}))
    assert page == RelationsResponse(chunk=[])


async def test_entries_that_are_not_events_are_skipped_and_the_rest_kept() -> None:
    hostile: list[Any] = [
        3,
        "an event?",
        None,
        [],
        {},
        {"event_id": "$no-type", "sender": "@a:b"},
        room_event("$bad-content", content=[]),
        room_event("$bad-ts", ts="yesterday"),
    ]
    page = await page_for(ok({"chunk": [in_thread("$first"), *hostile, in_thread("$last")]}))
    assert [event.event_id for event in page.chunk] == ["$first", "$last"]
    assert [skipped.where for skipped in page.skipped] == [f"chunk[{n}]" for n in range(1, 9)]
    assert [skipped.event_id for skipped in page.skipped][-3:] == [
        "$no-type",
        "$bad-content",
        "$bad-ts",
    ]


async def test_a_huge_or_deep_event_costs_only_itself() -> None:
    big = in_thread("$big")
    big["content"]["body"] = "x" * MAX_EVENT_BYTES
    # Nested deeper than json.dumps (or the decoder) would follow: spliced in as text.
    deep = json.dumps(in_thread("$deep")).replace(
        '"body":', '"x": ' + "[" * 5_000 + "]" * 5_000 + ', "body":'
    )
    chunk = ", ".join([deep, json.dumps(big), json.dumps(in_thread("$ok"))])
    page = await page_for(raw(200, f'{{"chunk": [{chunk}], "next_batch": "n"}}'.encode()))
    assert [event.event_id for event in page.chunk] == ["$ok"]
    assert sorted(skipped.event_id or "" for skipped in page.skipped) == ["$big", "$deep"]
    assert page.next_batch == "n"


async def test_a_lone_surrogate_in_one_event_is_mended_not_fatal() -> None:
    body = json.dumps({"chunk": [in_thread("$s"), in_thread("$t")]}).replace(
        "in the thread", "\\ud800", 1
    )
    page = await page_for(raw(200, body.encode()))
    assert [event.content["body"] for event in page.chunk] == ["\ufffd", "in the thread"]
    assert [skipped.where for skipped in page.skipped] == ["body"]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"[]", id="array"),
        pytest.param(b'"chunk"', id="string"),
        pytest.param(b"null", id="null"),
        pytest.param(b"", id="empty"),
        pytest.param(b'{"chunk": [', id="truncated"),
        pytest.param(b"<html>502 Bad Gateway</html>", id="html"),
        pytest.param(b"{}", id="no-chunk"),
        pytest.param(b'{"chunk": {}}', id="chunk-object"),
        pytest.param(b'{"chunk": "[]"}', id="chunk-string"),
        pytest.param(b'{"chunk": null}', id="chunk-null"),
        pytest.param(b'{"chunk": [], "next_batch": 7}', id="next-batch-number"),
        pytest.param(b'{"chunk": [], "next_batch": ["n"]}', id="next-batch-array"),
        pytest.param(b'{"chunk": [], "prev_batch": false}', id="prev-batch-bool"),
        pytest.param(b'{"chunk": [], "recursion_depth": "3"}', id="depth-string"),
        pytest.param(b'{"chunk": [], "recursion_depth": true}', id="depth-bool"),
        pytest.param(b'{"chunk": ' + b"[" * 100_000, id="nested-envelope"),
    ],
)
async def test_a_broken_envelope_is_a_bad_response(body: bytes) -> None:
    error = await failure_for(raw(200, body))
    assert isinstance(error, BadResponse)
    assert error.status == 200


async def test_an_unknown_parent_event_is_not_found() -> None:
    error = await failure_for(matrix_error(404, "M_NOT_FOUND", "Event not found."))
    assert isinstance(error, NotFound)
    assert (error.status, error.code) == (404, "M_NOT_FOUND")


async def test_synapses_unknown_parent_answer_is_a_404_matrix_error() -> None:
    # Synapse 1.163 answers an unknown parent with M_UNKNOWN, not the spec's M_NOT_FOUND.
    error = await failure_for(matrix_error(404, "M_UNKNOWN", "Unknown parent event."))
    assert isinstance(error, MatrixError)
    assert not isinstance(error, NotFound)
    assert (error.status, error.code) == (404, "M_UNKNOWN")


async def test_a_404_without_a_matrix_body_is_a_bad_response() -> None:
    error = await failure_for(raw(404, b"<html>Not Found</html>", "text/html"))
    assert isinstance(error, BadResponse)
    assert error.status == 404


async def test_a_huge_answer_stops_at_the_transports_limit() -> None:
    """Over a real socket (`H11Transport`): the relations request names no limits of
    its own, so `DEFAULT_LIMITS` bound it, and the body is refused before it is read."""
    over = DEFAULT_LIMITS.max_body_bytes + 1
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {over}\r\n\r\n".encode()
    async with (
        serving(sends(head, b'{"chunk": [', then_forever=b" " * 65536)) as server,
        MatrixClient(
            f"http://127.0.0.1:{server.port}", access_token="t", retry_policy=NO_RETRY
        ) as client,
    ):
        with trio.fail_after(10), pytest.raises(ResponseLimitExceeded) as raised:
            await client.relations(ROOM, ROOT, "m.thread")
    assert raised.value.limit == "max_body_bytes"


async def test_an_endless_chunked_answer_stops_at_the_transports_limit() -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    async with (
        serving(sends(head, then_forever=b"10000\r\n" + b" " * 0x10000 + b"\r\n")) as server,
        MatrixClient(
            f"http://127.0.0.1:{server.port}", access_token="t", retry_policy=NO_RETRY
        ) as client,
    ):
        with trio.fail_after(20), pytest.raises(ResponseLimitExceeded) as raised:
            await client.relations(ROOM, ROOT)
    assert raised.value.limit == "max_body_bytes"
