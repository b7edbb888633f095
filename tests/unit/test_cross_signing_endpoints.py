"""The cross-signing endpoints (matrix_api/endpoints/cross_signing.py), user-interactive
auth with a password (matrix_api/uia.py) and the cross-signing keys in a /keys/query
answer, against a scripted server: what goes on the wire, how many times, and what a
hostile 401 turns into (a clear error after at most one authenticated retry, never a
loop, and never the password in a message, a repr or a log line)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import trio
from structlog.testing import capture_logs

from matrix_api import BadResponse, MatrixError, NetworkError, Request, UnknownToken
from matrix_api.errors import Forbidden
from matrix_api.models import UserID
from matrix_api.uia import (
    AuthBody,
    AuthChallenge,
    AuthFlowUnsupported,
    AuthNotAccepted,
    AuthRequired,
    BadAuthChallenge,
    InteractiveAuthError,
    PasswordAuth,
    PasswordRefused,
)
from matrix_mock import BOT, NO_RETRY, ScriptedServer, matrix_error, ok, raw

V3 = "/_matrix/client/v3"
UPLOAD = f"{V3}/keys/device_signing/upload"
ALICE = UserID("@alice:example.org")
PASSWORD = "hunter2-Sup3r-S3cret!"
SESSION = "xYzAbCdEfGhIjKlMnOpQrStU"

MASTER: dict[str, Any] = {
    "user_id": BOT,
    "usage": ["master"],
    "keys": {"ed25519:bWFzdGVy": "bWFzdGVy"},
    "signatures": {BOT: {"ed25519:BOTDEVICE": "c2lnbmVkIGJ5IHRoZSBkZXZpY2U"}},
}
SELF_SIGNING: dict[str, Any] = {
    "user_id": BOT,
    "usage": ["self_signing"],
    "keys": {"ed25519:c2VsZg": "c2VsZg"},
    "signatures": {BOT: {"ed25519:bWFzdGVy": "c2lnbmVkIGJ5IHRoZSBtYXN0ZXI"}},
}
USER_SIGNING: dict[str, Any] = {
    "user_id": BOT,
    "usage": ["user_signing"],
    "keys": {"ed25519:dXNlcg": "dXNlcg"},
    "signatures": {BOT: {"ed25519:bWFzdGVy": "c2lnbmVkIGJ5IHRoZSBtYXN0ZXIgdG9v"}},
}
KEYS = {"master_key": MASTER, "self_signing_key": SELF_SIGNING, "user_signing_key": USER_SIGNING}
PASSWORD_AUTH = {
    "type": "m.login.password",
    "identifier": {"type": "m.id.user", "user": BOT},
    "password": PASSWORD,
    "session": SESSION,
}


def challenge(
    flows: Any = (("m.login.password",),), session: Any = SESSION, **fields: Any
) -> httpx.Response:
    """A 401 user-interactive auth answer, as Synapse sends it (no errcode)."""
    body: dict[str, Any] = {"params": {}, **fields}
    if flows is not None:
        body["flows"] = [{"stages": list(f)} for f in flows] if isinstance(flows, tuple) else flows
    if session is not None:
        body["session"] = session
    return httpx.Response(401, json=body)


def wrong_password(**fields: Any) -> httpx.Response:
    return matrix_error(401, "M_FORBIDDEN", "Invalid username or password", **fields)


async def upload(server: ScriptedServer, **kwargs: Any) -> None:
    async with server.client(retry_policy=NO_RETRY) as client:
        with trio.fail_after(5):
            await client.upload_cross_signing_keys(**{**KEYS, **kwargs})


async def refused(server: ScriptedServer, error: type[Exception], **kwargs: Any) -> Exception:
    with pytest.raises(error) as caught:
        await upload(server, **{"password": PASSWORD, **kwargs})
    assert_no_password(caught.value)
    return caught.value


def assert_no_password(error: BaseException) -> None:
    """Neither the error, its challenge nor anything it was raised from shows it."""
    seen: BaseException | None = error
    while seen is not None:
        assert PASSWORD not in str(seen)
        assert PASSWORD not in repr(seen)
        assert PASSWORD not in repr(getattr(seen, "challenge", None))
        seen = seen.__cause__ or seen.__context__


# --- /keys/device_signing/upload ---------------------------------------------------------


async def test_a_first_upload_taken_at_once_is_one_request_without_auth() -> None:
    # MSC3967: a user's first cross-signing keys need no auth.
    server = ScriptedServer(ok({}))

    await upload(server, password=PASSWORD)

    seen = server.only
    assert (seen.method, seen.raw_path) == ("POST", UPLOAD)
    assert seen.json == KEYS
    assert PASSWORD.encode() not in seen.request.content


async def test_only_the_keys_given_are_sent() -> None:
    server = ScriptedServer(ok({}))
    async with server.client(retry_policy=NO_RETRY) as client:
        await client.upload_cross_signing_keys(self_signing_key=SELF_SIGNING)
    assert server.only.json == {"self_signing_key": SELF_SIGNING}


async def test_no_key_at_all_is_refused_before_sending() -> None:
    server = ScriptedServer()
    async with server.client() as client:
        with pytest.raises(ValueError, match="no cross-signing key"):
            await client.upload_cross_signing_keys(password=PASSWORD)
    assert server.seen == []


async def test_a_challenge_is_answered_once_with_the_password_and_session() -> None:
    server = ScriptedServer(challenge(), ok({}))

    await upload(server, password=PASSWORD)

    first, second = server.seen
    assert first.json == KEYS
    assert (second.method, second.raw_path) == ("POST", UPLOAD)
    assert second.json == {**KEYS, "auth": PASSWORD_AUTH}


async def test_a_challenge_without_a_session_is_answered_without_one() -> None:
    # The spec: the session is passed back "if one is provided".
    server = ScriptedServer(challenge(session=None), ok({}))

    await upload(server, password=PASSWORD)

    auth = server.seen[1].json["auth"]
    assert "session" not in auth
    assert auth["password"] == PASSWORD


async def test_password_is_found_among_other_flows_and_after_completed_stages() -> None:
    flows = (("m.login.sso",), ("m.login.recaptcha", "m.login.password"))
    server = ScriptedServer(challenge(flows, completed=["m.login.recaptcha"]), ok({}))

    await upload(server, password=PASSWORD)

    assert server.seen[1].json["auth"] == PASSWORD_AUTH


async def test_a_challenge_without_a_password_given_is_auth_required() -> None:
    server = ScriptedServer(challenge())

    with pytest.raises(AuthRequired, match=r"no password was given") as caught:
        await upload(server)

    assert len(server.seen) == 1
    assert caught.value.challenge is not None
    assert caught.value.challenge.session == SESSION


@pytest.mark.parametrize(
    "flows",
    [
        pytest.param((("m.login.sso",),), id="sso-only"),
        pytest.param((("m.oauth",), ("org.matrix.cross_signing_reset",)), id="oauth"),
        pytest.param((("m.login.recaptcha", "m.login.password"),), id="password-plus-captcha"),
        pytest.param((("m.login.password", "m.login.terms"),), id="password-then-terms"),
        pytest.param((("m.login.email.identity",),), id="email"),
    ],
)
async def test_flows_without_a_password_alone_are_unsupported_without_sending_it(
    flows: tuple[tuple[str, ...], ...],
) -> None:
    server = ScriptedServer(challenge(flows))

    error = await refused(server, AuthFlowUnsupported)

    assert len(server.seen) == 1  # the password never went out
    assert flows[0][0] in str(error)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"session": SESSION, "params": {}}, id="no-flows"),
        pytest.param({"session": SESSION, "flows": []}, id="empty-flows"),
        pytest.param({"session": SESSION, "flows": "m.login.password"}, id="flows-string"),
        pytest.param({"session": SESSION, "flows": {"stages": ["m.login.password"]}}, id="dict"),
        pytest.param(
            {"session": SESSION, "flows": [["m.login.password"], {"stages": "m.login.password"}]},
            id="malformed-flows",
        ),
        pytest.param(
            {"session": SESSION, "flows": [{"stages": []}, {"stages": [None]}]},
            id="empty-and-null-stages",
        ),
        pytest.param(
            {"session": 12345, "flows": [{"stages": ["m.login.password"]}]}, id="session-int"
        ),
        pytest.param(
            {"session": "", "flows": [{"stages": ["m.login.password"]}]}, id="session-empty"
        ),
        pytest.param(
            {"session": {"id": SESSION}, "flows": [{"stages": ["m.login.password"]}]},
            id="session-object",
        ),
    ],
)
async def test_a_hostile_challenge_is_a_bad_challenge_and_the_password_stays_home(
    body: dict[str, Any],
) -> None:
    server = ScriptedServer(httpx.Response(401, json=body))

    await refused(server, BadAuthChallenge)

    assert len(server.seen) == 1


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(raw(401, b"<html>401 Authorization Required</html>", "text/html"), id="html"),
        pytest.param(raw(401, b"[1, 2]"), id="list"),
        pytest.param(raw(401, b""), id="empty"),
        # An answer longer than the part of it http.py keeps (200 characters) is cut.
        pytest.param(challenge(params={"m.login.terms": {"policies": {"x": "y" * 300}}}), id="cut"),
    ],
)
async def test_an_unreadable_401_is_a_bad_challenge(answer: httpx.Response) -> None:
    server = ScriptedServer(answer)

    await refused(server, BadAuthChallenge)

    assert len(server.seen) == 1


async def test_a_401_that_is_not_a_challenge_keeps_its_own_error() -> None:
    # An expired token is for the caller (soft logout), not for a password.
    server = ScriptedServer(matrix_error(401, "M_UNKNOWN_TOKEN", "Unknown token", soft_logout=True))
    with pytest.raises(UnknownToken):
        await upload(server, password=PASSWORD)
    assert len(server.seen) == 1


async def test_a_plain_forbidden_keeps_its_own_error() -> None:
    server = ScriptedServer(matrix_error(403, "M_FORBIDDEN", "Key ID in use"))
    with pytest.raises(Forbidden):
        await upload(server, password=PASSWORD)


async def test_a_bad_signature_is_the_servers_error() -> None:
    server = ScriptedServer(challenge(), matrix_error(400, "M_INVALID_SIGNATURE", "Invalid"))
    with pytest.raises(MatrixError) as caught:
        await upload(server, password=PASSWORD)
    assert caught.value.code == "M_INVALID_SIGNATURE"
    assert_no_password(caught.value)


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(wrong_password(), id="forbidden"),
        pytest.param(
            wrong_password(flows=[{"stages": ["m.login.password"]}], session=SESSION, params={}),
            id="forbidden-with-flows",
        ),
    ],
)
async def test_a_wrong_password_is_refused_after_one_try(answer: httpx.Response) -> None:
    server = ScriptedServer(challenge(), answer)

    error = await refused(server, PasswordRefused)

    assert len(server.seen) == 2
    assert BOT in str(error)


@pytest.mark.parametrize(
    "again",
    [
        pytest.param(challenge(), id="same-challenge"),
        pytest.param(challenge(completed=["m.login.password"]), id="password-done-more-wanted"),
        pytest.param(challenge(session="another-session"), id="new-session"),
        pytest.param(matrix_error(401, "M_UNAUTHORIZED", flows=[{"stages": ["x"]}]), id="errcode"),
    ],
)
async def test_a_server_asking_again_gets_one_retry_only(again: httpx.Response) -> None:
    # Four more challenges are scripted: a client that loops would take them.
    server = ScriptedServer(challenge(), again, *[challenge() for _ in range(4)])

    await refused(server, AuthNotAccepted)

    assert len(server.seen) == 2


async def test_an_unreadable_answer_to_the_password_is_a_bad_challenge() -> None:
    server = ScriptedServer(challenge(), raw(401, b"<html>nope</html>", "text/html"))
    await refused(server, BadAuthChallenge)
    assert len(server.seen) == 2


async def test_rate_limits_are_waited_on_both_attempts_with_the_same_bodies(
    autojump_clock: trio.abc.Clock,
) -> None:
    server = ScriptedServer(
        matrix_error(429, "M_LIMIT_EXCEEDED", retry_after_ms=2000),
        challenge(),
        matrix_error(429, "M_LIMIT_EXCEEDED", retry_after_ms=3000),
        ok({}),
    )
    with capture_logs() as logs:
        async with server.client() as client:
            await client.upload_cross_signing_keys(**KEYS, password=PASSWORD)

    assert [seen.json for seen in server.seen] == [
        KEYS,
        KEYS,
        *[{**KEYS, "auth": PASSWORD_AUTH}] * 2,
    ]
    assert server.waits == [pytest.approx(2.0), 0.0, pytest.approx(3.0)]
    assert [log["event"] for log in logs] == ["matrix_request_retry"] * 2
    assert PASSWORD not in repr(logs)


async def test_a_lost_answer_to_the_password_is_sent_again(autojump_clock: trio.abc.Clock) -> None:
    # Idempotent: the keys are on the server now, and the same keys need no auth.
    server = ScriptedServer(challenge(), httpx.ReadError("connection reset"), ok({}))
    with capture_logs() as logs:
        async with server.client() as client:
            await client.upload_cross_signing_keys(**KEYS, password=PASSWORD)

    assert server.seen[1].request.content == server.seen[2].request.content
    assert server.seen[2].json["auth"] == PASSWORD_AUTH
    assert PASSWORD not in repr(logs)


async def test_a_network_failure_before_any_answer_is_the_callers() -> None:
    server = ScriptedServer(httpx.ConnectError("refused"))
    with pytest.raises(NetworkError):
        await upload(server, password=PASSWORD)


# --- the UIA pieces on their own ---------------------------------------------------------


def test_the_password_is_not_in_the_reprs_of_what_carries_it() -> None:
    auth = PasswordAuth(BOT, PASSWORD)
    body = AuthBody(KEYS)
    body["auth"] = auth.respond(
        AuthChallenge.from_body({"flows": [{"stages": ["m.login.password"]}]})
    )
    request = Request("POST", UPLOAD, body=body)

    for shown in (repr(auth), repr(body), str(body), repr(request), str(request)):
        assert PASSWORD not in shown
    assert "<hidden>" in repr(request)
    # ... and yet it is what goes on the wire.
    assert json.loads(request.encoded_body() or b"")["auth"]["password"] == PASSWORD


def test_password_auth_answers_one_challenge_only() -> None:
    auth = PasswordAuth(BOT, PASSWORD)
    offered = AuthChallenge.from_body({"flows": [{"stages": ["m.login.password"]}], "session": "s"})

    assert auth.respond(offered)["session"] == "s"
    with pytest.raises(AuthNotAccepted):
        auth.respond(offered)


def test_a_challenge_keeps_well_formed_flows_in_order_and_bounds_them() -> None:
    body = {
        "flows": [
            {"stages": ["m.login.sso"]},
            "junk",
            {"stages": ["x" * 1000]},
            {"stages": ["m.login.password"]},
            *[{"stages": [f"s{i}"]} for i in range(100)],
        ],
        "completed": "m.login.password",  # not a list: nothing completed
        "params": [],
        "errcode": 3,
    }

    parsed = AuthChallenge.from_body(body)

    assert parsed.flows[:2] == (("m.login.sso",), ("m.login.password",))
    assert len(parsed.flows) < 40
    assert (parsed.completed, parsed.params, parsed.errcode) == ((), {}, None)
    assert parsed.offers_password()


def test_the_flows_in_a_message_are_escaped_and_bounded() -> None:
    flows = [{"stages": ["m.login.sso\n2026-12-03 fake log line\x1b[31m"]}]
    flows += [{"stages": [f"s{i}" * 40] * 16} for i in range(32)]
    server_said = AuthChallenge.from_body({"flows": flows})

    with pytest.raises(AuthFlowUnsupported) as caught:
        raise PasswordAuth(BOT, PASSWORD).refusal(server_said)

    message = str(caught.value)
    assert "\n" not in message
    assert "\x1b" not in message
    assert len(message) < 500


def test_every_uia_error_is_an_interactive_auth_error() -> None:
    for error in (AuthRequired, AuthFlowUnsupported, PasswordRefused, AuthNotAccepted):
        assert issubclass(error, InteractiveAuthError)
    assert issubclass(BadAuthChallenge, InteractiveAuthError)


# --- /keys/signatures/upload -------------------------------------------------------------


async def test_signatures_go_up_as_given_and_an_empty_answer_is_ok() -> None:
    device = {
        "user_id": BOT,
        "device_id": "BOTDEVICE",
        "signatures": {BOT: {"ed25519:c2VsZg": "x"}},
    }
    signed = {BOT: {"BOTDEVICE": device}, ALICE: {"YWxpY2U": {"user_id": ALICE}}}
    server = ScriptedServer(ok({}))

    async with server.client(retry_policy=NO_RETRY) as client:
        answer = await client.upload_signatures(signed)

    seen = server.only
    assert (seen.method, seen.raw_path) == ("POST", f"{V3}/keys/signatures/upload")
    assert seen.json == signed
    assert (answer.failures, answer.skipped, answer.ok) == ({}, [], True)


async def test_signature_failures_are_kept_and_hostile_entries_recorded() -> None:
    invalid = {"errcode": "M_INVALID_SIGNATURE", "error": "Invalid signature"}
    body = {
        "failures": {
            BOT: {"BOTDEVICE": invalid, "OTHER": "bad", "NULL": None},
            ALICE: ["x"],
        }
    }
    server = ScriptedServer(ok(body))

    async with server.client(retry_policy=NO_RETRY) as client:
        answer = await client.upload_signatures({BOT: {"BOTDEVICE": {}}})

    assert answer.failures == {BOT: {"BOTDEVICE": invalid}}
    assert [s.where for s in answer.skipped] == [
        f"failures.{BOT}.OTHER",
        f"failures.{BOT}.NULL",
        f"failures.{ALICE}",
    ]
    assert not answer.ok


@pytest.mark.parametrize("body", [b'{"failures": []}', b"null", b"<html>", b'{"failures": {'])
async def test_signatures_with_an_unusable_answer_are_a_bad_response(body: bytes) -> None:
    # Whether the signatures were taken cannot be told: nothing is assumed.
    server = ScriptedServer(raw(200, body))
    async with server.client(retry_policy=NO_RETRY) as client:
        with pytest.raises(BadResponse):
            await client.upload_signatures({BOT: {"BOTDEVICE": {}}})


async def test_signatures_are_retried_after_a_lost_answer(autojump_clock: trio.abc.Clock) -> None:
    server = ScriptedServer(httpx.ReadError("reset"), ok({}))
    async with server.client() as client:
        await client.upload_signatures({BOT: {"BOTDEVICE": {}}})
    assert len(server.seen) == 2


# --- cross-signing keys in /keys/query ---------------------------------------------------


async def test_query_exposes_cross_signing_keys_raw() -> None:
    body = {
        "device_keys": {BOT: {}},
        "master_keys": {BOT: MASTER, ALICE: {**MASTER, "user_id": ALICE, "x.future": [1]}},
        "self_signing_keys": {BOT: SELF_SIGNING},
        "user_signing_keys": {BOT: USER_SIGNING},
    }
    server = ScriptedServer(ok(body))
    async with server.client(retry_policy=NO_RETRY) as client:
        answer = await client.query_keys({BOT: [], ALICE: []})

    assert answer.master_keys == body["master_keys"]
    assert answer.self_signing_keys == {BOT: SELF_SIGNING}
    assert answer.user_signing_keys == {BOT: USER_SIGNING}
    assert answer.skipped == []


async def test_query_without_cross_signing_keys_has_empty_maps() -> None:
    server = ScriptedServer(ok({"device_keys": {}}))
    async with server.client(retry_policy=NO_RETRY) as client:
        answer = await client.query_keys({ALICE: []})
    assert (answer.master_keys, answer.self_signing_keys, answer.user_signing_keys) == ({}, {}, {})


async def test_query_drops_hostile_cross_signing_entries_and_keeps_the_devices() -> None:
    device = {"user_id": ALICE, "device_id": "DEV"}
    body = {
        "device_keys": {ALICE: {"DEV": device}},
        "master_keys": {ALICE: MASTER, BOT: "junk", "@carol:example.org": None},
        "self_signing_keys": ["not", "a", "map"],
        "user_signing_keys": {BOT: [USER_SIGNING]},
    }
    server = ScriptedServer(ok(body))
    async with server.client(retry_policy=NO_RETRY) as client:
        answer = await client.query_keys({ALICE: []})

    assert answer.device_keys == {ALICE: {"DEV": device}}
    assert answer.master_keys == {ALICE: MASTER}
    assert (answer.self_signing_keys, answer.user_signing_keys) == ({}, {})
    assert [s.where for s in answer.skipped] == [
        f"master_keys.{BOT}",
        "master_keys.@carol:example.org",
        "self_signing_keys",
        f"user_signing_keys.{BOT}",
    ]
