"""The E2EE endpoints (matrix_api/endpoints/keys.py) and /sync's E2EE fields, against a
scripted server: what goes on the wire, what a retry repeats, and what a hostile answer
turns into (a wrong-typed entry is dropped and recorded, never fatal; key objects are
handed on exactly as they came)."""

from __future__ import annotations

import copy
from typing import Any

import httpx
import msgspec
import pytest
import trio

from matrix_api import BadResponse, MatrixClient, NetworkError
from matrix_api.models import DeviceLists, SyncToken, UserID, decode_sync
from matrix_mock import BOT, NO_RETRY, ScriptedServer, matrix_error, ok, raw

V3 = "/_matrix/client/v3"
ALICE = UserID("@alice:example.org")
BOB = UserID("@bob:example.org")
CAROL = UserID("@carol:example.org")

# A device key object as a real client uploads it, with what a verifier needs kept
# byte for byte: unicode in the display name, an unknown field, the signatures.
ALICE_DEVICE: dict[str, Any] = {
    "user_id": ALICE,
    "device_id": "JLAFKJWSCS",
    "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
    "keys": {
        "curve25519:JLAFKJWSCS": "3C5BFWi2Y8MaVvjM8M22DBmh24PmgR0nPvJOIArzgyI",
        "ed25519:JLAFKJWSCS": "lEuiRJBit0IG6nUf5pUzWTUEsRVVe/HJkoKuEww9ULI",
    },
    "signatures": {ALICE: {"ed25519:JLAFKJWSCS": "dSO80A01XiigH3uBiDVx/EjzaoycHcjq9lfQX0uWsqxl"}},
    "org.example.future": {"n": [1, 2, {"x": None}]},
    "unsigned": {"device_display_name": "Алиса's phone \u202e"},
}
ONE_TIME_KEY: dict[str, Any] = {
    "key": "zKbLg+NrIjpnagy+pIY6uPL4ZwEG2v+8F9lmgsnlZzs",
    "signatures": {ALICE: {"ed25519:JLAFKJWSCS": "FLWxXqGbwrb8SM3Y795eB6OA8bwBcoMZFXBqnTn58AY"}},
}


async def call(server: ScriptedServer, method: str, *args: Any, **kwargs: Any) -> Any:
    async with server.client(retry_policy=NO_RETRY) as client:
        with trio.fail_after(5):
            return await getattr(client, method)(*args, **kwargs)


def where(skipped: list[Any]) -> list[str]:
    return [s.where for s in skipped]


# --- /keys/upload ------------------------------------------------------------------------


async def test_upload_sends_only_the_parts_given_and_returns_the_counts() -> None:
    server = ScriptedServer(ok({"one_time_key_counts": {"signed_curve25519": 50}}))
    otks = {"signed_curve25519:AAAAHg": ONE_TIME_KEY}

    counts = await call(server, "upload_keys", one_time_keys=otks)

    seen = server.only
    assert (seen.method, seen.raw_path) == ("POST", f"{V3}/keys/upload")
    assert seen.json == {"one_time_keys": otks}
    assert counts == {"signed_curve25519": 50}


async def test_upload_sends_device_and_fallback_keys_unchanged() -> None:
    server = ScriptedServer(ok({"one_time_key_counts": {}}))
    fallback = {"signed_curve25519:AAAAGj": {**ONE_TIME_KEY, "fallback": True}}

    counts = await call(server, "upload_keys", device_keys=ALICE_DEVICE, fallback_keys=fallback)

    assert server.only.json == {"device_keys": ALICE_DEVICE, "fallback_keys": fallback}
    assert counts == {}  # no algorithm listed: zero of each, as the spec says


async def test_upload_drops_counts_that_are_not_whole_numbers() -> None:
    counts = {
        "signed_curve25519": 7,
        "curve25519": "12",
        "a": True,
        "b": -1,
        "c": 1.5,
        "d": None,
        "e": [3],
        "huge": 10**30,
    }
    server = ScriptedServer(ok({"one_time_key_counts": counts}))

    assert await call(server, "upload_keys") == {"signed_curve25519": 7, "huge": 10**30}


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"{}", id="no-counts"),
        pytest.param(b'{"one_time_key_counts": [1]}', id="counts-list"),
        pytest.param(b'{"one_time_key_counts": null}', id="counts-null"),
        pytest.param(b"[]", id="not-an-object"),
        pytest.param(b'{"one_time_key_counts": {', id="truncated"),
    ],
)
async def test_upload_with_an_unusable_answer_is_a_bad_response(body: bytes) -> None:
    with pytest.raises(BadResponse):
        await call(ScriptedServer(raw(200, body)), "upload_keys")


async def test_upload_is_retried_after_a_lost_answer_with_the_same_body(
    autojump_clock: trio.abc.Clock,
) -> None:
    # Idempotent: the server keeps a one-time key id it already holds with the same key.
    server = ScriptedServer(
        httpx.ReadError("connection reset"),
        matrix_error(502, "M_UNKNOWN"),
        ok({"one_time_key_counts": {"signed_curve25519": 1}}),
    )
    otks = {"signed_curve25519:AAAAHg": ONE_TIME_KEY}
    async with server.client() as client:
        assert await client.upload_keys(one_time_keys=otks) == {"signed_curve25519": 1}

    assert len(server.seen) == 3
    assert len({seen.request.content for seen in server.seen}) == 1


# --- /keys/query -------------------------------------------------------------------------


async def test_query_asks_for_users_and_devices_with_a_timeout() -> None:
    server = ScriptedServer(ok({"device_keys": {}}))

    await call(server, "query_keys", {ALICE: [], BOB: ("DEV1", "DEV2")})

    seen = server.only
    assert (seen.method, seen.raw_path) == ("POST", f"{V3}/keys/query")
    assert seen.json == {"device_keys": {ALICE: [], BOB: ["DEV1", "DEV2"]}, "timeout": 10_000}


async def test_query_without_timeout_leaves_it_to_the_server() -> None:
    server = ScriptedServer(ok({}))

    answer = await call(server, "query_keys", {ALICE: []}, timeout_ms=None)

    assert server.only.json == {"device_keys": {ALICE: []}}
    assert (answer.device_keys, answer.failures, answer.skipped) == ({}, {}, [])


async def test_a_long_server_timeout_lengthens_the_read_timeout() -> None:
    server = ScriptedServer(ok({}), ok({}))
    async with server.client(retry_policy=NO_RETRY) as client:
        await client.query_keys({ALICE: []}, timeout_ms=60_000)
        await client.query_keys({ALICE: []})
    long_wait, default = (seen.request.extensions["timeout"]["read"] for seen in server.seen)
    assert long_wait >= 60
    assert default == 30.0


async def test_query_refuses_a_device_id_string_for_a_list() -> None:
    with pytest.raises(TypeError):
        await call(ScriptedServer(), "query_keys", {ALICE: "JLAFKJWSCS"})


async def test_query_keeps_device_key_objects_exactly_as_sent() -> None:
    body = {
        "device_keys": {ALICE: {"JLAFKJWSCS": ALICE_DEVICE}, BOB: {}},
        "failures": {"remote.example": {"status": 503, "message": "unreachable"}},
        "master_keys": {ALICE: {"usage": ["master"]}},
    }
    server = ScriptedServer(ok(body))

    answer = await call(server, "query_keys", {ALICE: [], BOB: []})

    assert answer.device_keys == {ALICE: {"JLAFKJWSCS": ALICE_DEVICE}, BOB: {}}
    assert answer.failures == {"remote.example": {"status": 503, "message": "unreachable"}}
    assert answer.skipped == []


async def test_query_drops_wrong_typed_entries_and_keeps_the_rest() -> None:
    body = {
        "device_keys": {
            ALICE: {
                "JLAFKJWSCS": ALICE_DEVICE,
                "STRING": "not a device",
                "LIST": [ALICE_DEVICE],
                "NULL": None,
            },
            BOB: ["DEV1"],
            "@carol:example.org": "junk",
        },
        "failures": {"ok.example": {}, "bad.example": "down"},
    }
    server = ScriptedServer(ok(body))

    answer = await call(server, "query_keys", {ALICE: [], BOB: []})

    assert answer.device_keys == {ALICE: {"JLAFKJWSCS": ALICE_DEVICE}}
    assert answer.failures == {"ok.example": {}}
    assert where(answer.skipped) == [
        f"device_keys.{ALICE}.STRING",
        f"device_keys.{ALICE}.LIST",
        f"device_keys.{ALICE}.NULL",
        f"device_keys.{BOB}",
        "device_keys.@carol:example.org",
        "failures.bad.example",
    ]


async def test_query_with_failures_of_the_wrong_type_keeps_the_devices() -> None:
    body = {"device_keys": {ALICE: {"JLAFKJWSCS": ALICE_DEVICE}}, "failures": ["x"]}

    answer = await call(ScriptedServer(ok(body)), "query_keys", {ALICE: []})

    assert answer.device_keys == {ALICE: {"JLAFKJWSCS": ALICE_DEVICE}}
    assert (answer.failures, where(answer.skipped)) == ({}, ["failures"])


async def test_one_device_nested_absurdly_deep_costs_only_its_deep_part() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    device = msgspec.json.encode(ALICE_DEVICE)
    body = (
        b'{"device_keys": {"@alice:example.org": {"JLAFKJWSCS": '
        + device
        + b', "DEEP": {"keys": '
        + deep
        + b"}}}}"
    )

    answer = await call(ScriptedServer(raw(200, body)), "query_keys", {ALICE: []})

    # The good device is intact; the deep one has its deep value cut (its signature
    # can no longer verify, which is the crypto layer's call), and that is recorded.
    assert answer.device_keys[ALICE]["JLAFKJWSCS"] == ALICE_DEVICE
    assert answer.device_keys[ALICE]["DEEP"]["keys"] is not None
    assert len(answer.skipped) == 1
    assert "nested deeper" in answer.skipped[0].reason


async def test_a_lone_surrogate_in_one_device_does_not_sink_the_answer() -> None:
    good = msgspec.json.encode(ALICE_DEVICE)
    body = (
        b'{"device_keys": {"@alice:example.org": {"JLAFKJWSCS": '
        + good
        + b', "BAD": {"unsigned": {"device_display_name": "\\ud800"}}}}}'
    )

    answer = await call(ScriptedServer(raw(200, body)), "query_keys", {ALICE: []})

    assert answer.device_keys[ALICE]["JLAFKJWSCS"] == ALICE_DEVICE
    assert answer.device_keys[ALICE]["BAD"] == {"unsigned": {"device_display_name": "\ufffd"}}
    assert [s.where for s in answer.skipped] == ["body"]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"device_keys": []}', id="device-keys-list"),
        pytest.param(b'{"device_keys": "x"}', id="device-keys-string"),
        pytest.param(b"null", id="null"),
        pytest.param(b"<html>502</html>", id="html"),
    ],
)
async def test_query_with_an_unusable_envelope_is_a_bad_response(body: bytes) -> None:
    with pytest.raises(BadResponse):
        await call(ScriptedServer(raw(200, body)), "query_keys", {ALICE: []})


async def test_query_is_retried_after_a_lost_answer(autojump_clock: trio.abc.Clock) -> None:
    server = ScriptedServer(
        httpx.ReadError("reset"), ok({"device_keys": {ALICE: {"JLAFKJWSCS": ALICE_DEVICE}}})
    )
    async with server.client() as client:
        answer = await client.query_keys({ALICE: []})
    assert len(server.seen) == 2
    assert answer.device_keys[ALICE]["JLAFKJWSCS"] == ALICE_DEVICE


# --- /keys/claim -------------------------------------------------------------------------


async def test_claim_asks_for_one_key_per_device() -> None:
    answer_body = {
        "one_time_keys": {ALICE: {"JLAFKJWSCS": {"signed_curve25519:AAAAHg": ONE_TIME_KEY}}},
        "failures": {},
    }
    server = ScriptedServer(ok(answer_body))

    answer = await call(server, "claim_keys", {ALICE: {"JLAFKJWSCS": "signed_curve25519"}})

    seen = server.only
    assert (seen.method, seen.raw_path) == ("POST", f"{V3}/keys/claim")
    assert seen.json == {
        "one_time_keys": {ALICE: {"JLAFKJWSCS": "signed_curve25519"}},
        "timeout": 10_000,
    }
    assert answer.one_time_keys == {
        ALICE: {"JLAFKJWSCS": {"signed_curve25519:AAAAHg": ONE_TIME_KEY}}
    }
    assert answer.skipped == []


async def test_claim_drops_wrong_typed_devices_and_keeps_key_maps_raw() -> None:
    fallback = {**ONE_TIME_KEY, "fallback": True}
    body = {
        "one_time_keys": {
            ALICE: {
                "GOOD": {"signed_curve25519:AAAAGj": fallback},
                # Inside a key map nothing is judged here: the crypto layer verifies.
                "ODD": {"curve25519:AAAA": "bare-key", "x": 5},
                "BAD": "signed_curve25519:AAAA",
            },
            BOB: 3,
        },
        "failures": {"remote.example": {"errcode": "M_UNKNOWN"}},
    }

    answer = await call(
        ScriptedServer(ok(body)),
        "claim_keys",
        {ALICE: {"GOOD": "signed_curve25519", "ODD": "signed_curve25519"}},
        timeout_ms=None,
    )

    assert answer.one_time_keys == {
        ALICE: {
            "GOOD": {"signed_curve25519:AAAAGj": fallback},
            "ODD": {"curve25519:AAAA": "bare-key", "x": 5},
        }
    }
    assert answer.failures == {"remote.example": {"errcode": "M_UNKNOWN"}}
    assert where(answer.skipped) == [f"one_time_keys.{ALICE}.BAD", f"one_time_keys.{BOB}"]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"failures": {}}', id="no-keys"),
        pytest.param(b'{"one_time_keys": ["k"]}', id="keys-list"),
        pytest.param(b'"one_time_keys"', id="string"),
    ],
)
async def test_claim_with_an_unusable_answer_is_a_bad_response(body: bytes) -> None:
    with pytest.raises(BadResponse):
        await call(
            ScriptedServer(raw(200, body)), "claim_keys", {ALICE: {"D": "signed_curve25519"}}
        )


async def test_claim_is_retried_after_a_lost_answer(autojump_clock: trio.abc.Clock) -> None:
    # A decision (see endpoints/keys.py): the first attempt's keys are lost, as when a
    # claimant crashes, and the retry gets fresh ones (or the fallback key).
    server = ScriptedServer(
        httpx.ReadError("reset"),
        ok({"one_time_keys": {ALICE: {"D": {"signed_curve25519:B": ONE_TIME_KEY}}}}),
    )
    async with server.client() as client:
        answer = await client.claim_keys({ALICE: {"D": "signed_curve25519"}})
    assert len(server.seen) == 2
    assert server.seen[0].request.content == server.seen[1].request.content
    assert answer.one_time_keys[ALICE]["D"] == {"signed_curve25519:B": ONE_TIME_KEY}


# --- /sendToDevice -----------------------------------------------------------------------


async def test_send_to_device_puts_messages_under_an_encoded_path() -> None:
    messages = {
        ALICE: {"JLAFKJWSCS": {"algorithm": "m.olm.v1.curve25519-aes-sha2"}},
        BOB: {"*": {}},
    }
    server = ScriptedServer(ok({}))

    result = await call(server, "send_to_device", "m.room.encrypted", messages, "txn/1 ..")

    seen = server.only
    assert result is None
    assert seen.method == "PUT"
    assert seen.raw_path == f"{V3}/sendToDevice/m.room.encrypted/txn%2F1%20.."
    assert seen.json == {"messages": messages}


@pytest.mark.parametrize(
    ("event_type", "segment"),
    [
        ("..", "%2E%2E"),
        ("org.example/x", "org.example%2Fx"),
        ("m.тест", "m.%D1%82%D0%B5%D1%81%D1%82"),
    ],
)
async def test_send_to_device_encodes_the_event_type_as_one_segment(
    event_type: str, segment: str
) -> None:
    server = ScriptedServer(ok({}))
    await call(server, "send_to_device", event_type, {ALICE: {"D": {}}}, "t1")
    assert server.only.raw_path == f"{V3}/sendToDevice/{segment}/t1"


async def test_send_to_device_retries_reuse_the_transaction_id(
    autojump_clock: trio.abc.Clock,
) -> None:
    server = ScriptedServer(
        httpx.ReadError("reset"),
        matrix_error(503, "M_UNKNOWN"),
        matrix_error(429, "M_LIMIT_EXCEEDED", retry_after_ms=2000),
        ok({}),
    )
    async with server.client() as client:
        await client.send_to_device("m.room_key_request", {ALICE: {"D": {"x": 1}}}, "once-txn")

    assert len(server.seen) == 4
    assert {seen.raw_path for seen in server.seen} == {
        f"{V3}/sendToDevice/m.room_key_request/once-txn"
    }
    assert len({seen.request.content for seen in server.seen}) == 1


async def test_send_to_device_accepts_any_object_answer() -> None:
    server = ScriptedServer(ok({"unexpected": [1]}))
    await call(server, "send_to_device", "m.dummy", {ALICE: {"D": {}}}, "t2")
    with pytest.raises(BadResponse):
        await call(ScriptedServer(raw(200, b"[]")), "send_to_device", "m.dummy", {}, "t3")


async def test_a_network_error_is_raised_after_the_last_attempt(
    autojump_clock: trio.abc.Clock,
) -> None:
    server = ScriptedServer(*[httpx.ReadError("reset")] * 5)
    async with server.client() as client:
        with pytest.raises(NetworkError):
            await client.send_to_device("m.dummy", {ALICE: {"D": {}}}, "t4")
    assert len(server.seen) == 5


# --- /keys/changes -----------------------------------------------------------------------


async def test_keys_changes_reads_user_ids_and_drops_the_rest() -> None:
    server = ScriptedServer(
        ok({"changed": [ALICE, 5, "not-a-user", None, BOB], "left": "junk", "extra": {}})
    )

    lists = await call(server, "keys_changes", SyncToken("s1_2"), SyncToken("s9 /x"))

    seen = server.only
    assert (seen.method, seen.raw_path) == ("GET", f"{V3}/keys/changes")
    assert seen.params == {"from": "s1_2", "to": "s9 /x"}
    assert lists == DeviceLists(changed=[ALICE, BOB], left=[])


async def test_keys_changes_of_an_empty_answer_is_empty() -> None:
    assert await call(ScriptedServer(ok({})), "keys_changes", SyncToken("a"), SyncToken("b")) == (
        DeviceLists()
    )


# --- /sync's E2EE fields -----------------------------------------------------------------


SYNC: dict[str, Any] = {
    "next_batch": "s2",
    "rooms": {
        "join": {
            "!room:example.org": {
                "timeline": {
                    "events": [
                        {
                            "type": "m.room.message",
                            "event_id": "$e",
                            "sender": ALICE,
                            "origin_server_ts": 1,
                            "content": {"body": "hi"},
                        }
                    ]
                }
            }
        }
    },
    "to_device": {
        "events": [
            {"type": "m.room.encrypted", "sender": ALICE, "content": {"algorithm": "x"}},
            {"type": "m.room.encrypted", "content": {}},  # no sender: dropped alone
        ]
    },
    "device_lists": {"changed": [ALICE, BOB], "left": [CAROL]},
    "device_one_time_keys_count": {"signed_curve25519": 49},
    "device_unused_fallback_key_types": ["signed_curve25519"],
}


def decode(body: dict[str, Any]) -> Any:
    return decode_sync(msgspec.json.encode(body))


def test_sync_exposes_the_e2ee_fields() -> None:
    sync = decode(SYNC)

    assert [event.sender for event in sync.to_device] == [ALICE]
    assert sync.device_lists == DeviceLists(changed=[ALICE, BOB], left=[CAROL])
    assert sync.device_one_time_keys_count == {"signed_curve25519": 49}
    assert sync.device_unused_fallback_key_types == ["signed_curve25519"]
    assert where(sync.skipped) == ["to_device[1]"]


def test_absent_fallback_key_types_differ_from_an_empty_list() -> None:
    absent = decode({"next_batch": "s1"})
    null = decode({"next_batch": "s1", "device_unused_fallback_key_types": None})
    empty = decode({"next_batch": "s1", "device_unused_fallback_key_types": []})

    assert absent.device_unused_fallback_key_types is None
    assert null.device_unused_fallback_key_types is None
    assert empty.device_unused_fallback_key_types == []
    assert (absent.device_lists, absent.device_one_time_keys_count) == (DeviceLists(), {})
    assert absent.skipped == empty.skipped == []


@pytest.mark.parametrize(
    ("field", "value", "read", "skipped"),
    [
        pytest.param(
            "device_lists",
            {"changed": [ALICE, 1, {"u": ALICE}, "bob"], "left": [None, BOB]},
            DeviceLists(changed=[ALICE], left=[BOB]),
            [
                "device_lists.changed[1]",
                "device_lists.changed[2]",
                "device_lists.changed[3]",
                "device_lists.left[0]",
            ],
            id="device-list-entries",
        ),
        pytest.param(
            "device_lists",
            {"changed": ALICE, "left": {"x": 1}},
            DeviceLists(),
            ["device_lists.changed", "device_lists.left"],
            id="device-list-parts",
        ),
        pytest.param(
            "device_lists", [ALICE], DeviceLists(), ["device_lists"], id="device-lists-list"
        ),
        pytest.param(
            "device_one_time_keys_count",
            {"signed_curve25519": "49", "curve25519": 3, "x": False, "y": -2, "z": 0.5},
            {"curve25519": 3},
            [
                "device_one_time_keys_count.signed_curve25519",
                "device_one_time_keys_count.x",
                "device_one_time_keys_count.y",
                "device_one_time_keys_count.z",
            ],
            id="counts",
        ),
        pytest.param(
            "device_one_time_keys_count", 49, {}, ["device_one_time_keys_count"], id="count-number"
        ),
        pytest.param(
            "device_unused_fallback_key_types",
            ["signed_curve25519", 7, None],
            ["signed_curve25519"],
            ["device_unused_fallback_key_types[1]", "device_unused_fallback_key_types[2]"],
            id="fallback-entries",
        ),
        pytest.param(
            # Garbled: read as "no fallback keys here", which uploads nothing.
            "device_unused_fallback_key_types",
            "signed_curve25519",
            None,
            ["device_unused_fallback_key_types"],
            id="fallback-string",
        ),
    ],
)
def test_a_hostile_e2ee_field_costs_only_its_bad_entries(
    field: str, value: Any, read: Any, skipped: list[str]
) -> None:
    body = copy.deepcopy(SYNC)
    body[field] = value

    sync = decode(body)

    assert getattr(sync, field) == read
    assert where(sync.skipped) == ["to_device[1]", *skipped]
    clean = decode(SYNC)
    assert sync.rooms == clean.rooms
    assert sync.to_device == clean.to_device
    for other in ("device_lists", "device_one_time_keys_count", "device_unused_fallback_key_types"):
        if other != field:
            assert getattr(sync, other) == getattr(clean, other)


def test_the_e2ee_fields_survive_an_envelope_read_piece_by_piece() -> None:
    body = copy.deepcopy(SYNC)
    body["rooms"] = ["not", "an", "object"]  # the typed decode fails: piecewise
    body["device_lists"]["changed"].append(3)

    sync = decode(body)

    assert sync.rooms.join == {}
    assert sync.device_lists == DeviceLists(changed=[ALICE, BOB], left=[CAROL])
    assert sync.device_one_time_keys_count == {"signed_curve25519": 49}
    assert sync.device_unused_fallback_key_types == ["signed_curve25519"]
    assert where(sync.skipped) == ["rooms", "to_device[1]", "device_lists.changed[2]"]


def test_deep_nesting_in_an_e2ee_field_does_not_sink_the_sync() -> None:
    body = msgspec.json.encode(SYNC)
    deep = b"[" * 50_000 + b"]" * 50_000
    body = body.replace(b'"left":["@carol:example.org"]', b'"left":' + deep)

    sync = decode_sync(body)

    assert sync.next_batch == "s2"
    assert sync.device_lists.changed == [ALICE, BOB]
    assert sync.device_lists.left == []
    assert len(sync.rooms.join) == 1


async def test_the_client_sync_carries_the_e2ee_fields() -> None:
    server = ScriptedServer(ok(SYNC))
    async with server.client(retry_policy=NO_RETRY) as client:
        assert isinstance(client, MatrixClient)
        sync = await client.sync(since=SyncToken("s1"))
    assert sync.device_one_time_keys_count == {"signed_curve25519": 49}
    assert sync.device_lists.changed == [ALICE, BOB]
    assert BOT not in sync.device_lists.changed
