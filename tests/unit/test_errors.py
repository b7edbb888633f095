"""What a homeserver's answer turns into: one error class per errcode, BadResponse otherwise."""

from __future__ import annotations

import email.utils
import inspect
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from matrix_api import errors
from matrix_api.errors import (
    BadJSON,
    BadResponse,
    Exclusive,
    Forbidden,
    GuestAccessForbidden,
    InvalidParam,
    InvalidRequest,
    InvalidRoomState,
    LimitExceeded,
    MatrixAPIError,
    MatrixError,
    MissingParam,
    MissingToken,
    NotFound,
    NotJSON,
    ResourceLimitExceeded,
    RoomInUse,
    TooLarge,
    TransportError,
    UnknownToken,
    Unrecognized,
    UnsupportedRoomVersion,
    UserDeactivated,
    UserInUse,
)
from matrix_api.models import RoomID, SyncToken
from matrix_mock import NO_RETRY, ScriptedServer, Step, matrix_error, ok, raw

# errcode -> (class, a status servers really send it with)
ERRCODES: dict[str, tuple[type[MatrixError], int]] = {
    "M_FORBIDDEN": (Forbidden, 403),
    "M_NOT_FOUND": (NotFound, 404),
    "M_UNKNOWN_TOKEN": (UnknownToken, 401),
    "M_MISSING_TOKEN": (MissingToken, 401),
    "M_LIMIT_EXCEEDED": (LimitExceeded, 429),
    "M_UNRECOGNIZED": (Unrecognized, 404),
    "M_BAD_JSON": (BadJSON, 400),
    "M_NOT_JSON": (NotJSON, 400),
    "M_MISSING_PARAM": (MissingParam, 400),
    "M_INVALID_PARAM": (InvalidParam, 400),
    "M_TOO_LARGE": (TooLarge, 413),
    "M_UNSUPPORTED_ROOM_VERSION": (UnsupportedRoomVersion, 400),
    "M_ROOM_IN_USE": (RoomInUse, 400),
    "M_INVALID_ROOM_STATE": (InvalidRoomState, 400),
    "M_USER_IN_USE": (UserInUse, 400),
    "M_USER_DEACTIVATED": (UserDeactivated, 403),
    "M_GUEST_ACCESS_FORBIDDEN": (GuestAccessForbidden, 403),
    "M_EXCLUSIVE": (Exclusive, 400),
    "M_RESOURCE_LIMIT_EXCEEDED": (ResourceLimitExceeded, 403),
}


async def error_from(*answers: Step) -> MatrixAPIError:
    """The error a GET raises when the server gives ``answers``, one attempt each."""
    server = ScriptedServer(*answers)
    async with server.client(retry_policy=NO_RETRY) as client:
        with pytest.raises(MatrixAPIError) as caught:
            await client.joined_rooms()
    return caught.value


def test_the_table_covers_every_errcode_class() -> None:
    declared = {
        cls.errcode: cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, MatrixError) and cls is not MatrixError
    }
    assert {code: cls for code, (cls, _) in ERRCODES.items()} == declared


@pytest.mark.parametrize(("errcode", "cls", "status"), [(c, *v) for c, v in ERRCODES.items()])
async def test_each_errcode_raises_its_own_class(
    errcode: str, cls: type[MatrixError], status: int
) -> None:
    err = await error_from(matrix_error(status, errcode, "the server's words"))

    assert type(err) is cls
    assert isinstance(err, MatrixError)
    assert err.status == status
    assert err.code == errcode
    assert err.message == "the server's words"
    assert err.body["errcode"] == errcode
    assert str(err) == f"{status} {errcode}: the server's words"


@pytest.mark.parametrize("errcode", ["M_UNKNOWN", "M_SOMETHING_FROM_A_FUTURE_SPEC", "X_ACME_QUOTA"])
async def test_an_errcode_without_a_class_raises_the_base_class(errcode: str) -> None:
    err = await error_from(matrix_error(400, errcode, "hm"))

    assert type(err) is MatrixError
    assert (err.status, err.code, err.message) == (400, errcode, "hm")


async def test_a_matrix_error_without_a_message_has_an_empty_one() -> None:
    err = await error_from(raw(403, b'{"errcode": "M_FORBIDDEN"}'))

    assert type(err) is Forbidden
    assert err.message == ""


@pytest.mark.parametrize(
    ("fields", "soft_logout"),
    [
        ({"soft_logout": True}, True),
        ({"soft_logout": False}, False),
        ({}, False),
        ({"soft_logout": "true"}, False),
    ],
)
async def test_unknown_token_tells_a_soft_logout(fields: dict[str, Any], soft_logout: bool) -> None:
    err = await error_from(matrix_error(401, "M_UNKNOWN_TOKEN", "Token expired", **fields))

    assert isinstance(err, UnknownToken)
    assert err.soft_logout is soft_logout


# --- answers that are not Matrix errors -------------------------------------------------

HTML_502 = (
    b"<html><head><title>502 Bad Gateway</title></head>"
    b"<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
)


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        pytest.param(raw(502, HTML_502, "text/html"), 502, id="html-502-from-proxy"),
        pytest.param(raw(500, b"", "text/plain"), 500, id="empty-500"),
        pytest.param(raw(400, b'{"error": "no code"}'), 400, id="json-without-errcode"),
        pytest.param(raw(400, b'{"errcode": 42, "error": "x"}'), 400, id="errcode-not-a-string"),
        pytest.param(raw(403, b'["M_FORBIDDEN"]'), 403, id="json-list"),
        pytest.param(raw(404, b'{"errcode": "M_NOT_FO'), 404, id="truncated-json"),
    ],
)
async def test_an_error_status_without_a_matrix_body_is_a_bad_response(
    answer: Step, status: int
) -> None:
    err = await error_from(answer)

    assert type(err) is BadResponse
    assert isinstance(err, TransportError)
    assert err.status == status
    assert f"HTTP {status}" in str(err)


async def test_a_bad_response_keeps_an_excerpt_of_the_body() -> None:
    err = await error_from(raw(502, HTML_502, "text/html"))

    assert isinstance(err, BadResponse)
    assert err.body_excerpt.startswith("<html><head><title>502 Bad Gateway")
    assert len(err.body_excerpt) <= 200
    assert "text/html" in str(err)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"user_id": "@bot:exa', id="truncated"),
        pytest.param(b'{"user_id": 5}', id="user-id-not-a-string"),
        pytest.param(b'{"device_id": "D"}', id="user-id-missing"),
        pytest.param(b'["@bot:example.org"]', id="list-instead-of-object"),
        pytest.param(b"", id="empty"),
        pytest.param(b"<html>OK</html>", id="html"),
    ],
)
async def test_a_200_that_is_not_what_the_endpoint_promises_is_a_bad_response(body: bytes) -> None:
    server = ScriptedServer(raw(200, body))
    async with server.client(retry_policy=NO_RETRY) as client:
        with pytest.raises(BadResponse) as caught:
            await client.whoami()

    assert caught.value.status == 200
    assert caught.value.body_excerpt == body.decode()
    assert "GET /_matrix/client/v3/account/whoami" in str(caught.value)


async def test_a_200_object_where_a_list_is_promised_is_a_bad_response() -> None:
    server = ScriptedServer(ok({"events": []}))
    async with server.client(retry_policy=NO_RETRY) as client:
        with pytest.raises(BadResponse):
            await client.get_state(RoomID("!room:example.org"))


# --- how long a rate limit asks us to wait ---------------------------------------------


def http_date(seconds_from_now: float) -> str:
    return email.utils.format_datetime(
        datetime.now(UTC) + timedelta(seconds=seconds_from_now), usegmt=True
    )


async def rate_limited(*, headers: dict[str, str] | None = None, **fields: object) -> LimitExceeded:
    err = await error_from(
        matrix_error(429, "M_LIMIT_EXCEEDED", "Too many", headers=headers, **fields)
    )
    assert isinstance(err, LimitExceeded)
    return err


async def test_retry_after_comes_from_the_header_in_seconds() -> None:
    assert (await rate_limited(headers={"Retry-After": "3"})).retry_after == 3.0


async def test_retry_after_comes_from_an_http_date_header() -> None:
    err = await rate_limited(headers={"Retry-After": http_date(120)})
    # The header has whole seconds and the wall clock moves during the test.
    assert err.retry_after == pytest.approx(120, abs=2)


async def test_a_retry_after_date_is_measured_from_the_answers_own_date() -> None:
    # The server's clock is an hour behind ours: its "in 30 s" is 30 s, not nothing.
    err = await rate_limited(
        headers={"Retry-After": http_date(-3600 + 30), "Date": http_date(-3600)}
    )
    assert err.retry_after == pytest.approx(30, abs=1)


async def test_a_retry_after_date_in_the_past_means_now() -> None:
    assert (await rate_limited(headers={"Retry-After": http_date(-60)})).retry_after == 0.0


async def test_retry_after_falls_back_to_the_body_in_milliseconds() -> None:
    assert (await rate_limited(retry_after_ms=1500)).retry_after == 1.5


async def test_the_retry_after_header_wins_over_the_body() -> None:
    err = await rate_limited(headers={"Retry-After": "2"}, retry_after_ms=9000)
    assert err.retry_after == 2.0


async def test_an_unreadable_retry_after_header_falls_back_to_the_body() -> None:
    err = await rate_limited(headers={"Retry-After": "soon"}, retry_after_ms=2500)
    assert err.retry_after == 2.5


@pytest.mark.parametrize("retry_after_ms", [-5, True, "1500", None])
async def test_a_nonsense_retry_after_ms_is_ignored(retry_after_ms: object) -> None:
    assert (await rate_limited(retry_after_ms=retry_after_ms)).retry_after is None


async def test_a_rate_limit_without_any_wait_has_none() -> None:
    assert (await rate_limited()).retry_after is None


async def test_a_retry_after_header_with_non_ascii_digits_is_ignored() -> None:
    answer = httpx.Response(
        429,
        headers=[(b"Retry-After", "²".encode())],
        json={"errcode": "M_LIMIT_EXCEEDED", "error": "Too many", "retry_after_ms": 1000},
    )
    err = await error_from(answer)
    assert isinstance(err, LimitExceeded)
    assert err.retry_after == 1.0


class _NotGzip(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"this is not gzip"


# httpx abandons its body iterators when decoding fails; trio reports them when collected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_body_that_does_not_match_its_content_encoding_is_a_matrix_api_error() -> None:
    answer = httpx.Response(
        200,
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        stream=_NotGzip(),
    )
    err = await error_from(answer)
    assert isinstance(err, TransportError)


async def test_a_url_no_server_takes_is_an_invalid_request_not_an_httpx_error() -> None:
    server = ScriptedServer(ok({}))
    async with server.client() as client:
        with pytest.raises(InvalidRequest) as refused:
            await client.messages(RoomID("!r:x"), direction="b", from_token=SyncToken("p" * 70_000))
    assert "cannot be sent" in str(refused.value)


def test_the_servers_words_in_an_error_text_are_bounded_and_escaped() -> None:
    """A hostile homeserver's "error" (megabytes, or a forged log line) reaches a log
    line only as `str(error)`: cut and escaped there; the message itself is kept."""
    huge = MatrixError.from_response(500, {"errcode": "M_UNKNOWN", "error": "x" * 1_000_000})
    assert len(str(huge)) < 400
    assert huge.message == "x" * 1_000_000
    forged = MatrixError.from_response(
        400, {"errcode": "X_\nevil", "error": "fine\n2026-12-03 [error] forged_line"}
    )
    assert "\n" not in str(forged)
    assert forged.code == "X_\nevil"
