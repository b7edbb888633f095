"""Logging in and out, and keeping the access token (and password) out of sight."""

from __future__ import annotations

import httpx
import pytest
import trio
from structlog.testing import capture_logs

from matrix_api import MatrixAPIError
from matrix_api.errors import MatrixError, MissingToken, NetworkError
from matrix_api.models import LoginResponse
from matrix_mock import (
    BOT,
    DEVICE,
    HOMESERVER,
    NO_RETRY,
    TOKEN,
    ScriptedServer,
    Step,
    matrix_error,
    ok,
    raw,
)

NEW_TOKEN = "syt_Ym90_FreshLoginToken_77e1"
PASSWORD = "correct horse battery staple"
LOGGED_IN = {"user_id": BOT, "access_token": NEW_TOKEN, "device_id": "NEWDEVICE"}


def reveals_a_secret(text: str) -> bool:
    return any(secret in text for secret in (TOKEN, NEW_TOKEN, PASSWORD))


# --- secrets stay out of reprs, messages and logs -------------------------------------------


async def test_the_client_repr_shows_who_but_not_the_token() -> None:
    async with ScriptedServer().client() as client:
        text = repr(client)
    assert TOKEN not in text
    assert HOMESERVER in text
    assert BOT in text
    assert DEVICE in text


def test_a_login_response_repr_hides_the_token() -> None:
    login = LoginResponse(user_id=BOT, access_token=NEW_TOKEN, device_id="NEWDEVICE")
    assert NEW_TOKEN not in repr(login)
    assert NEW_TOKEN not in str(login)
    assert "NEWDEVICE" in repr(login)


def reset_mentioning_the_url(request: httpx.Request) -> httpx.Response:
    raise httpx.ReadError(f"connection reset while reading {request.url}")


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(
            matrix_error(401, "M_UNKNOWN_TOKEN", "Invalid access token"), id="unknown-token"
        ),
        pytest.param(matrix_error(403, "M_FORBIDDEN", "You are not invited"), id="forbidden"),
        pytest.param(matrix_error(400, "X_CUSTOM", "custom"), id="custom-errcode"),
        pytest.param(
            matrix_error(429, "M_LIMIT_EXCEEDED", headers={"Retry-After": "9999"}), id="limit"
        ),
        pytest.param(raw(502, b"<html>Bad Gateway</html>", "text/html"), id="html-502"),
        pytest.param(raw(200, b'{"user_id": 5}'), id="bad-200"),
        pytest.param(httpx.ConnectError("Connection refused"), id="connect-error"),
        pytest.param(reset_mentioning_the_url, id="reset-with-url"),
    ],
)
async def test_no_raised_error_contains_the_token(answer: Step) -> None:
    server = ScriptedServer(answer)
    async with server.client(retry_policy=NO_RETRY) as client:
        with pytest.raises(MatrixAPIError) as caught:
            await client.whoami()

    err = caught.value
    assert not reveals_a_secret(str(err))
    assert not reveals_a_secret(repr(err))
    assert not reveals_a_secret(repr(err.args))
    assert not reveals_a_secret(getattr(err, "body_excerpt", ""))


async def test_a_client_without_a_token_raises_missing_token_without_a_request() -> None:
    server = ScriptedServer()
    async with server.client(access_token=None) as client:
        with pytest.raises(MissingToken) as caught:
            await client.joined_rooms()

    assert server.seen == []
    assert type(caught.value) is MissingToken
    assert (caught.value.status, caught.value.code) == (401, "M_MISSING_TOKEN")


async def test_retry_log_lines_do_not_contain_the_token(autojump_clock: trio.abc.Clock) -> None:
    server = ScriptedServer(
        matrix_error(503, "M_UNKNOWN", "down"),
        reset_mentioning_the_url,
        ok({"user_id": BOT}),
    )
    with capture_logs() as logs:
        async with server.client() as client:
            await client.whoami()

    retries = [entry for entry in logs if entry["event"] == "matrix_request_retry"]
    assert [entry["attempt"] for entry in retries] == [1, 2]
    assert retries[0]["path"] == "/_matrix/client/v3/account/whoami"
    assert not any(reveals_a_secret(repr(entry)) for entry in logs)


# --- login -------------------------------------------------------------------------------


async def test_login_sends_a_user_identifier_and_uses_the_new_token() -> None:
    server = ScriptedServer(ok(LOGGED_IN), ok({"joined_rooms": []}))
    async with server.client(access_token=None, user_id=None, device_id=None) as client:
        login = await client.login_password(
            "bot", PASSWORD, device_id="OLDDEVICE", initial_device_display_name="surfaces-bot"
        )
        await client.joined_rooms()

    login_request, next_request = server.seen
    assert (login_request.method, login_request.raw_path) == ("POST", "/_matrix/client/v3/login")
    assert login_request.json == {
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": "bot"},
        "password": PASSWORD,
        "device_id": "OLDDEVICE",
        "initial_device_display_name": "surfaces-bot",
    }
    assert login_request.authorization is None
    assert PASSWORD not in str(login_request.request.url)
    assert login == LoginResponse(user_id=BOT, access_token=NEW_TOKEN, device_id="NEWDEVICE")
    assert (client.user_id, client.device_id) == (BOT, "NEWDEVICE")
    assert next_request.authorization == f"Bearer {NEW_TOKEN}"


async def test_login_without_a_device_id_lets_the_server_pick_one() -> None:
    server = ScriptedServer(ok(LOGGED_IN))
    async with server.client(access_token=None) as client:
        await client.login_password("bot", PASSWORD)

    assert "device_id" not in server.only.json
    assert "initial_device_display_name" not in server.only.json
    assert client.device_id == "NEWDEVICE"


async def test_login_replaces_an_old_token() -> None:
    server = ScriptedServer(ok(LOGGED_IN), ok({"joined_rooms": []}))
    async with server.client() as client:
        await client.login_password("bot", PASSWORD)
        await client.joined_rooms()

    assert server.seen[0].authorization is None
    assert server.seen[1].authorization == f"Bearer {NEW_TOKEN}"


async def test_a_failed_login_leaves_no_token_and_hides_the_password() -> None:
    server = ScriptedServer(matrix_error(403, "M_FORBIDDEN", "Invalid username or password"))
    async with server.client(access_token=None) as client:
        with pytest.raises(MatrixError) as caught:
            await client.login_password("bot", PASSWORD)

    assert not client.has_access_token
    assert not reveals_a_secret(str(caught.value))
    assert not reveals_a_secret(repr(client))


async def test_a_login_without_device_id_is_not_retried_after_a_reset(
    autojump_clock: trio.abc.Clock,
) -> None:
    # Each such login creates a device: sending it twice could leave a stray one.
    server = ScriptedServer(httpx.ReadError("reset"))
    async with server.client(access_token=None) as client:
        with pytest.raises(NetworkError):
            await client.login_password("bot", PASSWORD)
    assert len(server.seen) == 1


async def test_a_login_with_a_device_id_is_retried_after_a_reset(
    autojump_clock: trio.abc.Clock,
) -> None:
    server = ScriptedServer(httpx.ReadError("reset"), ok(LOGGED_IN))
    async with server.client(access_token=None) as client:
        await client.login_password("bot", PASSWORD, device_id="OLDDEVICE")
    assert len(server.seen) == 2
    assert client.has_access_token


# --- whoami and logout ---------------------------------------------------------------------


async def test_whoami_remembers_the_user_and_device() -> None:
    server = ScriptedServer(ok({"user_id": "@other:example.org", "device_id": "D2"}))
    async with server.client(user_id=None, device_id=None) as client:
        who = await client.whoami()

    assert (who.user_id, who.device_id, who.is_guest) == ("@other:example.org", "D2", False)
    assert (client.user_id, client.device_id) == ("@other:example.org", "D2")


async def test_whoami_without_a_device_keeps_the_known_one() -> None:
    server = ScriptedServer(ok({"user_id": BOT}))
    async with server.client() as client:
        await client.whoami()
    assert client.device_id == DEVICE


async def test_logout_drops_the_token_and_later_calls_send_nothing() -> None:
    server = ScriptedServer(ok())
    async with server.client() as client:
        await client.logout()

        assert not client.has_access_token
        with pytest.raises(MissingToken):
            await client.whoami()

    logout = server.only
    assert (logout.method, logout.raw_path) == ("POST", "/_matrix/client/v3/logout")
    assert logout.request.content == b"{}"
    assert logout.authorization == f"Bearer {TOKEN}"


async def test_a_failed_logout_keeps_the_token() -> None:
    server = ScriptedServer(matrix_error(401, "M_UNKNOWN_TOKEN", "Invalid access token"))
    async with server.client(retry_policy=NO_RETRY) as client:
        with pytest.raises(MatrixError):
            await client.logout()
        assert client.has_access_token
