"""The webhook backend against a tiny trio HTTP receiver that checks the signature.

The receiver verifies ``X-Surfaces-Signature`` over the raw bytes it received, as a
team's service would, and answers 401 when it does not match.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import time
from collections.abc import AsyncIterator, Callable, MutableMapping
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import pytest
import trio

from bot.backend_settings.reading import SettingsError
from bot.backends.backoff import Backoff
from bot.backends.context import Turn
from bot.backends.streaming import StreamingBackend
from bot.backends.webhook import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookBackend,
    WebhookError,
    WebhookSettings,
    sign,
    verify_signature,
    webhook_settings_from_env,
)
from bot.chats import Chat
from bot.messages import IncomingMessage
from matrix_api.h11_transport import ResponseTooLarge
from matrix_api.models import EventID, RoomID
from mini_http import HTTPRequest, Responder, serve_http

Logs = list[MutableMapping[str, Any]]
SECRET = "a-shared-secret-of-some-length"
CHAT = Chat("c_hook", RoomID("!room:example.org"), "@alice:example.org", "Hook", 0)
MESSAGE = IncomingMessage(EventID("$q1"), "@alice:example.org", "What's up? ünïcödé", 1)
FAST = Backoff(max_attempts=3, base_delay=0.01, max_delay=0.05, rng=random.Random(2))

# status, body, content type, and optionally more headers.
Reply = tuple[int, bytes, str] | tuple[int, bytes, str, dict[str, str]]
Answer = Callable[[dict[str, Any]], Reply]


@dataclass
class Receiver:
    """Verifies each delivery's signature, records it, and answers from ``answers``."""

    secret: str = SECRET
    answers: list[Answer | Reply] = field(default_factory=list)
    delay: float = 0.0
    received: list[HTTPRequest] = field(default_factory=list)
    verified: list[bool] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: HTTPRequest, out: Responder) -> None:
        self.received.append(request)
        good = verify_signature(
            self.secret,
            request.body,
            request.headers.get("x-surfaces-signature"),
            request.headers.get("x-surfaces-timestamp"),
        )
        self.verified.append(good)
        if not good:
            await out.send(401, b'{"error": "bad signature"}')
            return
        if self.delay:
            await trio.sleep(self.delay)
        document = json.loads(request.body)
        answer = (
            self.answers.pop(0)
            if self.answers
            else (
                200,
                json.dumps({"reply": f"got: {document['body']}"}).encode(),
                "application/json",
            )
        )
        status, body, content_type, *headers = answer(document) if callable(answer) else answer
        await out.send(status, body, content_type, headers[0] if headers else None)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hook = Receiver()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, hook.handle)
        hook.url = f"http://127.0.0.1:{port}/hook"
        yield hook
        nursery.cancel_scope.cancel()


class Sink:
    def __init__(self) -> None:
        self.typing_calls: list[bool] = []

    async def partial(self, text: str) -> None:
        raise AssertionError("the webhook does not stream")

    async def typing(self, on: bool) -> None:
        self.typing_calls.append(on)


def backend(receiver: Receiver, **changes: Any) -> WebhookBackend:
    values: dict[str, Any] = {"url": receiver.url, "secret": SECRET, "timeout_s": 2}
    values.update(changes)
    return WebhookBackend(WebhookSettings.from_mapping(values), backoff=FAST)


async def test_the_signed_document_is_delivered_and_verified(receiver: Receiver) -> None:
    context = [Turn("user", "earlier"), Turn("assistant", "reply earlier")]
    sink = Sink()
    async with backend(receiver) as hook:
        assert isinstance(hook, StreamingBackend)
        reply = await hook.reply_streaming(CHAT, MESSAGE, context, sink)
    assert reply == "got: What's up? ünïcödé"
    assert receiver.verified == [True]
    (request,) = receiver.received
    assert request.method == "POST"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-surfaces-event-id"] == "$q1"
    assert json.loads(request.body) == {
        "chat_id": "c_hook",
        "room_id": "!room:example.org",
        "sender": "@alice:example.org",
        "event_id": "$q1",
        "thread_id": None,
        "body": "What's up? ünïcödé",
        "context": [
            {"role": "user", "content": "earlier"},
            {"role": "assistant", "content": "reply earlier"},
        ],
    }
    assert sink.typing_calls == [True, False]


async def test_a_message_in_a_thread_names_its_thread(receiver: Receiver) -> None:
    in_thread = replace(MESSAGE, thread_root=EventID("$root"))
    async with backend(receiver) as hook:
        await hook.reply_streaming(CHAT, in_thread, [], Sink())
    (request,) = receiver.received
    document = json.loads(request.body)
    assert document["thread_id"] == "$root"
    assert document["event_id"] == "$q1"


async def test_a_wrong_secret_fails_verification_and_is_not_retried(receiver: Receiver) -> None:
    receiver.secret = "the-receiver-expects-another-one"
    async with backend(receiver) as hook:
        with pytest.raises(WebhookError) as caught:
            await hook.reply(CHAT, MESSAGE)
    assert receiver.verified == [False]
    assert caught.value.status == 401
    assert "HTTP 401" in caught.value.user_message
    assert "bad signature" in caught.value.user_message
    assert SECRET not in str(caught.value)


async def test_a_plain_text_answer_is_the_reply(receiver: Receiver) -> None:
    receiver.answers.append((200, b"  Plain *markdown* reply\n", "text/plain; charset=utf-8"))
    async with backend(receiver) as hook:
        assert await hook.reply(CHAT, MESSAGE) == "Plain *markdown* reply"


async def test_5xx_is_retried_then_answers(receiver: Receiver, logs: Logs) -> None:
    receiver.answers += [(500, b"oops", "text/plain"), (503, b"", "text/plain")]
    async with backend(receiver) as hook:
        assert await hook.reply(CHAT, MESSAGE) == "got: What's up? ünïcödé"
    assert len(receiver.received) == 3
    bodies = {request.body for request in receiver.received}
    assert len(bodies) == 1  # the same signed bytes every time
    assert [e["status"] for e in logs if e["event"] == "webhook_retry"] == [500, 503]


async def test_5xx_retries_are_bounded(receiver: Receiver) -> None:
    receiver.answers += [(502, b"bad gateway", "text/plain")] * 5
    async with backend(receiver) as hook:
        with pytest.raises(WebhookError) as caught:
            await hook.reply(CHAT, MESSAGE)
    assert len(receiver.received) == FAST.max_attempts
    assert "HTTP 502" in caught.value.user_message


async def test_a_429_is_retried_no_sooner_than_it_asked(receiver: Receiver, logs: Logs) -> None:
    busy = {"Retry-After": "7", "retry-after-ms": "120"}  # the finer one wins
    receiver.answers.append((429, b'{"error": "busy"}', "application/json", busy))
    async with backend(receiver) as hook:
        assert await hook.reply(CHAT, MESSAGE) == "got: What's up? ünïcödé"
    assert len(receiver.received) == 2
    [retry] = [entry for entry in logs if entry["event"] == "webhook_retry"]
    assert (retry["status"], retry["delay_s"]) == (429, 0.12)


async def test_a_429_asking_too_long_a_wait_is_reported_at_once(receiver: Receiver) -> None:
    receiver.answers.append((429, b"", "text/plain", {"Retry-After": "3600"}))
    async with backend(receiver) as hook:
        with pytest.raises(WebhookError) as caught:
            await hook.reply(CHAT, MESSAGE)
    assert len(receiver.received) == 1
    assert caught.value.status == 429
    assert "busy" in caught.value.user_message


async def test_a_4xx_is_reported_with_what_the_service_said(receiver: Receiver) -> None:
    receiver.answers.append(
        (422, b'{"error": "Messages over 100 words are refused."}', "application/json")
    )
    async with backend(receiver) as hook:
        with pytest.raises(WebhookError) as caught:
            await hook.reply(CHAT, MESSAGE)
    assert len(receiver.received) == 1
    assert caught.value.user_message == (
        "The assistant service refused this message (HTTP 422). "
        "It said: Messages over 100 words are refused."
    )


async def test_an_html_4xx_page_is_not_shown(receiver: Receiver) -> None:
    receiver.answers.append((404, b"<html><body>Not Found</body></html>", "text/html"))
    async with backend(receiver) as hook:
        with pytest.raises(WebhookError) as caught:
            await hook.reply(CHAT, MESSAGE)
    assert caught.value.user_message == "The assistant service refused this message (HTTP 404)."


async def test_timeouts_are_retried_and_bounded(receiver: Receiver) -> None:
    receiver.delay = 1.0
    async with backend(receiver, timeout_s=0.1) as hook:
        with trio.fail_after(5), pytest.raises(WebhookError) as caught:
            await hook.reply(CHAT, MESSAGE)
    assert len(receiver.received) == FAST.max_attempts
    assert "too long" in caught.value.user_message


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ((200, b'{"text": "wrong key"}', "application/json"), "cannot read"),
        ((200, b"{not json", "application/json"), "cannot read"),
        ((200, b'{"reply": "   "}', "application/json"), "empty reply"),
        ((204, b"", "text/plain"), "gave no reply"),
    ],
)
async def test_unusable_answers_are_errors(
    receiver: Receiver, answer: tuple[int, bytes, str], expected: str
) -> None:
    receiver.answers.append(answer)
    async with backend(receiver) as hook:
        with pytest.raises(WebhookError) as caught:
            await hook.reply(CHAT, MESSAGE)
    assert expected in caught.value.user_message
    assert len(receiver.received) == 1


async def test_only_recent_context_is_sent(receiver: Receiver) -> None:
    context = [Turn("user", f"m{i}") for i in range(10)]
    async with backend(receiver, context_turns=3) as hook:
        await hook.reply_streaming(CHAT, MESSAGE, context, Sink())
    sent = json.loads(receiver.received[0].body)["context"]
    assert [turn["content"] for turn in sent] == ["m7", "m8", "m9"]


async def test_nothing_listening_is_retried_then_reported() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = WebhookSettings(url=f"http://127.0.0.1:{port}/", secret=SECRET)
    async with WebhookBackend(settings, backoff=FAST) as hook:
        with pytest.raises(WebhookError) as caught:
            await hook.reply(CHAT, MESSAGE)
    assert "cannot be reached" in caught.value.user_message


async def test_signature_is_over_the_timestamp_and_the_raw_body() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"reply": "ok"})

    settings = WebhookSettings(url="http://hook.test/", secret=SECRET)
    transport = httpx.MockTransport(handler)
    async with WebhookBackend(
        settings, transport=transport, wall_clock=lambda: 1.8e9 + 0.9
    ) as hook:
        await hook.reply(CHAT, MESSAGE)
    body, headers = seen[0].content, seen[0].headers
    assert headers[TIMESTAMP_HEADER] == "1800000000"  # whole seconds
    signed = b"1800000000." + body
    expected = hmac.new(SECRET.encode(), signed, hashlib.sha256).hexdigest()
    assert headers[SIGNATURE_HEADER] == f"sha256={expected}" == sign(SECRET, body, "1800000000")
    signature = headers[SIGNATURE_HEADER]
    assert verify_signature(SECRET, body, signature, "1800000000", now=1.8e9 + 300)
    assert not verify_signature(SECRET, body + b" ", signature, "1800000000", now=1.8e9)
    assert not verify_signature(SECRET, body, signature, "1800000001", now=1.8e9)
    assert not verify_signature(SECRET, body, signature, "1800000000", now=1.8e9 + 301)
    assert not verify_signature(SECRET, body, signature, "1800000000", now=1.8e9 - 301)
    assert not verify_signature(SECRET, body, None, "1800000000", now=1.8e9)
    assert not verify_signature(SECRET, body, signature, None, now=1.8e9)
    # The old form (the body alone) no longer verifies.
    old = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert not verify_signature(SECRET, body, old, "1800000000", now=1.8e9)


async def test_each_attempt_is_signed_with_its_own_time(receiver: Receiver) -> None:
    receiver.answers += [(503, b"", "text/plain", {"Retry-After": "0"}), (500, b"", "text/plain")]
    # Within the receiver's window of its (real) clock, each a few minutes apart.
    now = int(time.time())
    times = iter([now - 200.0, now + 0.5, now + 200.0])
    settings = WebhookSettings.from_mapping({"url": receiver.url, "secret": SECRET})
    with trio.fail_after(30):
        async with WebhookBackend(settings, backoff=FAST, wall_clock=lambda: next(times)) as hook:
            await hook.reply(CHAT, MESSAGE)
    stamps = [request.headers["x-surfaces-timestamp"] for request in receiver.received]
    assert stamps == [str(now - 200), str(now), str(now + 200)]
    assert receiver.verified == [True, True, True]
    assert len({request.headers["x-surfaces-signature"] for request in receiver.received}) == 3
    assert {request.headers["x-surfaces-event-id"] for request in receiver.received} == {"$q1"}


def test_settings_errors_name_each_bad_key() -> None:
    with pytest.raises(SettingsError) as caught:
        WebhookSettings.from_mapping({"url": "not a url", "secret": "short", "timeout_s": "x"})
    problems = "\n".join(caught.value.problems)
    assert "webhook.url (WEBHOOK_URL)" in problems
    assert "webhook.secret (WEBHOOK_SECRET): at least 16 characters" in problems
    assert "webhook.timeout_s (WEBHOOK_TIMEOUT_S)" in problems
    assert "short" not in problems


def test_settings_from_env() -> None:
    settings = webhook_settings_from_env(
        {
            "WEBHOOK_URL": "https://hook.example/in",
            "WEBHOOK_SECRET": SECRET,
            "WEBHOOK_TIMEOUT_S": "5",
        }
    )
    assert settings == WebhookSettings(url="https://hook.example/in", secret=SECRET, timeout_s=5.0)
    assert SECRET not in repr(settings)
    with pytest.raises(SettingsError, match=r"webhook\.secret .*: required"):
        webhook_settings_from_env({"WEBHOOK_URL": "https://hook.example/in"})


REFUSED_ANSWERS = [
    pytest.param(
        ResponseTooLarge("head over 65536 bytes", limit="max_head_bytes"),
        "too large for the bot to read (its headers are too large)",
        id="head",
    ),
    pytest.param(
        ResponseTooLarge("Content-Length 10000000000", limit="max_body_bytes"),
        "too large for the bot to read (over 4194304 bytes)",
        id="content-length",
    ),
    pytest.param(
        httpx.DecodingError("unsupported Content-Encoding b'br'"),
        "a reply the bot cannot read",
        id="coding",
    ),
]


@pytest.mark.parametrize(("refusal", "words"), REFUSED_ANSWERS)
async def test_an_answer_the_transport_refuses_is_reported_and_not_retried(
    refusal: Exception, words: str
) -> None:
    # The service answered (with something over a limit, or in a coding the bot does
    # not read): asking again would get the same, so it is not retried.
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise refusal

    settings = WebhookSettings(url="http://hook.test/", secret=SECRET)
    async with WebhookBackend(settings, transport=httpx.MockTransport(handler)) as hook:
        with pytest.raises(WebhookError) as caught:
            await hook.reply(CHAT, MESSAGE)
    assert len(calls) == 1
    assert words in caught.value.user_message
    assert caught.value.__cause__ is refusal
