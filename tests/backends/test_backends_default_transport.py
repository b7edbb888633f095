"""The model and webhook backends over their default transport, against hostile servers.

No transport is passed here: each backend builds its own `H11Transport` with its limits
(`bot.backends.http_backend`), exactly as the bot runs. The servers are real loopback
HTTP servers (`mini_http`) sending an endless stream, a compression bomb, a huge
``Content-Length``, endless ``100 Continue`` heads, a head without end, two content
codings, or a slow drip. Each test checks that the call ends within its deadline in a
typed failure (the transport's `ResponseLimitError` is in the error's chain), what the
user is told, and, for the bombs, the memory it took (tracemalloc's peak).

Cases refused before the body are raised by ``client.stream(...)`` itself and mapped
by the backend (bot/backends/model.py, webhook.py): reported, and not retried.
"""

from __future__ import annotations

import gc
import json
import random
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio

from bot.backends import http_backend
from bot.backends.backoff import Backoff
from bot.backends.bounded_read import BodyTooLarge, UnreadableEncoding
from bot.backends.model import ModelBackend, ModelError, ModelSettings
from bot.backends.webhook import WebhookBackend, WebhookError, WebhookSettings
from bot.chats import Chat
from bot.messages import IncomingMessage
from matrix_api.h11_transport import (
    DecodedTooLarge,
    H11Transport,
    ResponseLimitError,
    ResponseTooLarge,
    ResponseTooSlow,
)
from matrix_api.models import EventID, RoomID
from mini_http import HTTPRequest, Responder, serve_http

CHAT = Chat("c_default", RoomID("!room:example.org"), "@alice:example.org", "Default", 0)
MESSAGE = IncomingMessage(EventID("$q"), "@alice:example.org", "hello", 1)
FAST = Backoff(max_attempts=2, base_delay=0.01, max_delay=0.02, rng=random.Random(5))
SECRET = "a-shared-secret-of-some-length"

MAX_BYTES = 256 * 1024
MEMORY_CEILING = 4 * 1024 * 1024
"""A call's peak of Python allocations with the limits above (an unbounded read of the
same answers reaches hundreds of megabytes)."""
DEADLINE_S = 10

Handler = Callable[[HTTPRequest, Responder], Awaitable[None]]


@pytest.fixture(autouse=True)
def no_generator_left_to_the_collector() -> Iterator[None]:
    yield
    gc.collect()


class Server:
    """A loopback server answering every request with ``handler``; counts requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests = 0
        self.url = ""

    async def handle(self, request: HTTPRequest, out: Responder) -> None:
        self.requests += 1
        await self.handler(request, out)


@asynccontextmanager
async def hostile(handler: Handler) -> AsyncIterator[Server]:
    server = Server(handler)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, server.handle)
        server.url = f"http://127.0.0.1:{port}"
        yield server
        nursery.cancel_scope.cancel()


def chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes, outermost first."""
    found: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in found:
        found.append(current)
        current = current.__cause__ or current.__context__
    return found


def limit_hit(exc: BaseException) -> ResponseLimitError:
    """The transport's limit error behind ``exc`` (the test fails if there is none)."""
    hits = [e for e in chain(exc) if isinstance(e, ResponseLimitError)]
    assert hits, f"no transport limit behind {chain(exc)!r}"
    return hits[0]


class Outcome:
    def __init__(self) -> None:
        self.answer: str | None = None
        self.error: BaseException | None = None
        self.peak = 0
        self.requests = 0


async def _measured_reply(
    backend: ModelBackend | WebhookBackend,
    outcome: Outcome,
    error_type: type[ModelError] | type[WebhookError],
) -> None:
    """The answer or the backend's error into ``outcome``, with the peak of Python
    allocations while it was asked."""
    tracemalloc.start()
    try:
        outcome.answer = await backend.reply(CHAT, MESSAGE)
    except error_type as exc:
        outcome.error = exc
    finally:
        outcome.peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


async def ask_model(handler: Handler, **changes: Any) -> Outcome:
    values: dict[str, Any] = {
        "model": "m",
        "request_timeout_s": 2,
        "stream": True,
        "max_response_bytes": MAX_BYTES,
        "max_line_bytes": 16 * 1024,
        "max_answer_chars": 2_000,
    }
    values.update(changes)
    outcome = Outcome()
    with trio.fail_after(DEADLINE_S):
        async with hostile(handler) as server:
            settings = ModelSettings.from_mapping({"base_url": f"{server.url}/v1", **values})
            async with ModelBackend(settings, backoff=FAST) as backend:
                await _measured_reply(backend, outcome, ModelError)
            outcome.requests = server.requests
    return outcome


async def ask_webhook(handler: Handler, **changes: Any) -> Outcome:
    values: dict[str, Any] = {
        "secret": SECRET,
        "timeout_s": 3,
        "max_response_bytes": MAX_BYTES,
        "max_answer_chars": 2_000,
    }
    values.update(changes)
    outcome = Outcome()
    with trio.fail_after(DEADLINE_S):
        async with hostile(handler) as server:
            settings = WebhookSettings.from_mapping({"url": f"{server.url}/hook", **values})
            async with WebhookBackend(settings, backoff=FAST) as backend:
                await _measured_reply(backend, outcome, WebhookError)
            outcome.requests = server.requests
    return outcome


def model_error(outcome: Outcome) -> ModelError:
    assert isinstance(outcome.error, ModelError), outcome.answer
    return outcome.error


def webhook_error(outcome: Outcome) -> WebhookError:
    assert isinstance(outcome.error, WebhookError), outcome.answer
    return outcome.error


# -- hostile answers ------------------------------------------------------------------

FILLER = b"x" * 65536


def token(text: str) -> bytes:
    chunk = {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def completion(text: str) -> bytes:
    return json.dumps(
        {"choices": [{"message": {"content": text}, "finish_reason": "stop"}]}
    ).encode()


def gzip_of_zeros(size: int) -> bytes:
    """A gzip member of ``size`` zero bytes (about size/1000 bytes), built piece by piece."""
    packer = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    zeros = bytes(1 << 20)
    packed = [packer.compress(zeros) for _ in range(size >> 20)]
    return b"".join(packed) + packer.flush()


def gzip(data: bytes, *, wbits: int = zlib.MAX_WBITS | 16) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, wbits)
    return packer.compress(data) + packer.flush()


async def endless_sse(request: HTTPRequest, out: Responder) -> None:
    await out.start(200, {"Content-Type": "text/event-stream"}, chunked=True)
    while True:
        await out.chunk(b": keep-alive\n\n" * 1000)


async def huge_length(request: HTTPRequest, out: Responder) -> None:
    await out.start(200, {"Content-Type": "application/json", "Content-Length": "10000000000"})
    while True:
        await out.raw(FILLER)


async def endless_continue(request: HTTPRequest, out: Responder) -> None:
    while True:
        await out.raw(b"HTTP/1.1 100 Continue\r\n\r\n")


async def endless_head(request: HTTPRequest, out: Responder) -> None:
    await out.raw(b"HTTP/1.1 200 OK\r\n")
    while True:
        await out.raw(b"X-Filler: " + b"y" * 1000 + b"\r\n")


async def gzip_gzip(request: HTTPRequest, out: Responder) -> None:
    body = gzip(gzip(completion("twice")))
    await out.send(200, body, headers={"Content-Encoding": "gzip, gzip"})


async def brotli(request: HTTPRequest, out: Responder) -> None:
    await out.send(200, b"\x8b\x02\x80", headers={"Content-Encoding": "br"})


# -- the model backend ----------------------------------------------------------------


async def test_an_endless_sse_stream_stops_at_the_byte_limit() -> None:
    error = model_error(await ask_model(endless_sse))
    assert error.kind == "too_large"
    assert error.user_message == (
        "The assistant's server sent an answer too large for the bot to read "
        f"(more than {MAX_BYTES} bytes)."
    )
    # the transport's limit is the backend's: it stopped the body, not a later count
    assert isinstance(error.__cause__, BodyTooLarge)
    assert limit_hit(error).limit == "max_body_bytes"


async def test_an_endless_sse_stream_after_some_text_is_cut_with_a_note() -> None:
    async def text_then_endless(request: HTTPRequest, out: Responder) -> None:
        await out.start(200, {"Content-Type": "text/event-stream"}, chunked=True)
        await out.chunk(token("Partly answered"))
        while True:
            await out.chunk(b": keep-alive\n\n" * 1000)

    outcome = await ask_model(text_then_endless)
    assert outcome.answer == (
        f"Partly answered\n\n[answer cut: the server sent more than {MAX_BYTES} bytes]"
    )


@pytest.mark.parametrize("stream", [False, True])
async def test_a_gzip_bomb_inflates_no_further_than_the_limit(stream: bool) -> None:
    bomb = gzip_of_zeros(64 << 20)  # 64 MiB in about 64 KiB
    content_type = "text/event-stream" if stream else "application/json"

    async def bombing(request: HTTPRequest, out: Responder) -> None:
        assert request.headers["accept-encoding"] == "gzip, deflate"
        await out.send(200, bomb, content_type, headers={"Content-Encoding": "gzip"})

    outcome = await ask_model(bombing, stream=stream)
    error = model_error(outcome)
    # zeros are one endless line to the stream reader, which may notice that first
    assert error.kind == "too_large"
    assert "too large for the bot to read" in error.user_message
    if not stream:
        assert isinstance(limit_hit(error), DecodedTooLarge)
    assert outcome.peak <= MEMORY_CEILING, outcome.peak
    assert outcome.requests == 1


async def test_a_compressed_answer_within_the_limits_is_read() -> None:
    body = gzip(completion("squeezed " * 100))

    async def compressed(request: HTTPRequest, out: Responder) -> None:
        await out.send(200, body, headers={"Content-Encoding": "gzip"})

    outcome = await ask_model(compressed, stream=False)
    assert outcome.answer == "squeezed " * 100


@pytest.mark.parametrize("raw_deflate", [False, True])
async def test_a_deflated_answer_is_read_whether_zlib_wrapped_or_raw(raw_deflate: bool) -> None:
    text = "deflated, " * 20_000  # inflates to more than one piece
    body = gzip(completion(text), wbits=-zlib.MAX_WBITS if raw_deflate else zlib.MAX_WBITS)

    async def deflated(request: HTTPRequest, out: Responder) -> None:
        await out.send(200, body, headers={"Content-Encoding": "deflate"})

    outcome = await ask_model(
        deflated, stream=False, max_answer_chars=len(text), max_response_bytes=len(text) + 1000
    )
    assert outcome.answer == text


async def test_a_compressed_sse_stream_is_read() -> None:
    body = gzip(token("Hello") + token(" world") + b"data: [DONE]\n\n")

    async def compressed(request: HTTPRequest, out: Responder) -> None:
        await out.send(200, body, "text/event-stream", headers={"Content-Encoding": "gzip"})

    assert (await ask_model(compressed)).answer == "Hello world"


async def test_a_slow_drip_ends_at_the_whole_answer_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each byte comes well within request_timeout_s (the wait between pieces), so only
    # the deadline for the whole answer ends it; made short here.
    monkeypatch.setattr(http_backend, "MODEL_ANSWER_CEILING_S", 1.5)

    async def drip(request: HTTPRequest, out: Responder) -> None:
        await out.start(200, {"Content-Type": "text/event-stream"}, chunked=True)
        while True:
            await out.chunk(b":\n")
            await trio.sleep(0.05)

    error = model_error(await ask_model(drip, request_timeout_s=1))
    assert error.kind == "timeout"
    assert error.user_message == "The assistant took too long to answer. Please try again."
    hit = limit_hit(error)
    assert isinstance(hit, ResponseTooSlow)
    assert hit.limit == "total_timeout_s"


async def test_silence_longer_than_request_timeout_is_a_timeout() -> None:
    async def silent_after_head(request: HTTPRequest, out: Responder) -> None:
        await out.start(200, {"Content-Type": "text/event-stream"}, chunked=True)
        await trio.sleep_forever()

    error = model_error(await ask_model(silent_after_head, request_timeout_s=0.5))
    assert error.kind == "timeout"
    assert limit_hit(error).limit == "read_timeout_s"


HEAD_CASES = {
    "huge Content-Length": (huge_length, ResponseTooLarge, "max_body_bytes"),
    "endless 100 Continue": (endless_continue, ResponseTooLarge, "max_interim_responses"),
    "endless head": (endless_head, ResponseTooLarge, "max_head_bytes"),
}


@pytest.mark.parametrize("case", list(HEAD_CASES))
async def test_a_hostile_head_is_refused_before_any_body_typed(case: str) -> None:
    handler, error_type, limit = HEAD_CASES[case]
    outcome = await ask_model(handler, stream=False)
    hit = limit_hit(model_error(outcome))
    assert isinstance(hit, error_type)
    assert hit.limit == limit
    assert outcome.peak <= MEMORY_CEILING, outcome.peak


@pytest.mark.parametrize("handler", [gzip_gzip, brotli], ids=["gzip, gzip", "br"])
async def test_a_coding_the_bot_does_not_read_is_refused_before_the_body(
    handler: Handler,
) -> None:
    error = model_error(await ask_model(handler, stream=False))
    assert any(isinstance(e, httpx.DecodingError) for e in chain(error)), chain(error)


@pytest.mark.parametrize("case", list(HEAD_CASES))
async def test_a_hostile_head_is_reported_as_too_large_and_not_retried(case: str) -> None:
    handler, _, _ = HEAD_CASES[case]
    outcome = await ask_model(handler, stream=False)
    error = model_error(outcome)
    assert error.kind == "too_large"
    assert "too large for the bot to read" in error.user_message
    assert outcome.requests == 1


@pytest.mark.parametrize("handler", [gzip_gzip, brotli], ids=["gzip, gzip", "br"])
async def test_a_coding_the_bot_does_not_read_is_reported_as_unreadable(
    handler: Handler,
) -> None:
    outcome = await ask_model(handler, stream=False)
    error = model_error(outcome)
    assert error.kind == "malformed"
    assert error.user_message == "The assistant's server sent an answer the bot cannot read."
    assert outcome.requests == 1


# -- the webhook backend --------------------------------------------------------------


async def test_an_endless_json_reply_is_too_large() -> None:
    async def endless_json(request: HTTPRequest, out: Responder) -> None:
        await out.start(200, {"Content-Type": "application/json"}, chunked=True)
        await out.chunk(b'{"reply": "')
        while True:
            await out.chunk(FILLER)

    outcome = await ask_webhook(endless_json)
    error = webhook_error(outcome)
    assert error.user_message == (
        f"The assistant service sent a reply too large for the bot to read "
        f"(over {MAX_BYTES} bytes)."
    )
    assert isinstance(error.__cause__, BodyTooLarge)
    assert limit_hit(error).limit == "max_body_bytes"
    assert outcome.requests == 1


async def test_a_webhook_gzip_bomb_is_too_large() -> None:
    bomb = gzip_of_zeros(64 << 20)

    async def bombing(request: HTTPRequest, out: Responder) -> None:
        await out.send(200, bomb, headers={"Content-Encoding": "gzip"})

    outcome = await ask_webhook(bombing)
    error = webhook_error(outcome)
    assert "too large for the bot to read" in error.user_message
    assert isinstance(limit_hit(error), DecodedTooLarge)
    assert outcome.peak <= MEMORY_CEILING, outcome.peak


async def test_a_webhook_plain_text_bomb_keeps_what_fits_and_says_so() -> None:
    packer = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    bomb = b"".join(packer.compress(b"a" * (1 << 20)) for _ in range(16)) + packer.flush()

    async def bombing(request: HTTPRequest, out: Responder) -> None:
        await out.send(200, bomb, "text/plain", headers={"Content-Encoding": "gzip"})

    outcome = await ask_webhook(bombing, max_answer_chars=10_000_000)
    assert outcome.answer is not None
    text, note = outcome.answer.rsplit("\n\n", 1)
    assert note == f"[answer cut: the service sent more than {MAX_BYTES} bytes]"
    assert set(text) == {"a"}
    assert len(text) <= MAX_BYTES


async def test_a_webhook_drip_ends_at_its_timeout() -> None:
    async def drip(request: HTTPRequest, out: Responder) -> None:
        await out.start(200, {"Content-Type": "application/json"}, chunked=True)
        while True:
            await out.chunk(b" ")
            await trio.sleep(0.05)

    outcome = await ask_webhook(drip, timeout_s=0.5)
    error = webhook_error(outcome)
    assert error.user_message == "The assistant took too long to answer. Please try again."
    assert outcome.requests == 2  # a timeout is worth one more try (FAST: two in all)


async def test_a_webhooks_huge_content_length_is_too_large_and_not_retried() -> None:
    outcome = await ask_webhook(huge_length)
    error = webhook_error(outcome)
    assert "too large" in error.user_message
    assert outcome.requests == 1


async def test_a_webhooks_plain_text_with_a_huge_length_is_refused_before_the_body() -> None:
    """Unlike a chunked one (cut with a note), a reply that declares a length over the
    limit is not read at all: the transport refuses its head."""

    async def huge_text(request: HTTPRequest, out: Responder) -> None:
        await out.start(200, {"Content-Type": "text/plain", "Content-Length": "10000000000"})
        while True:
            await out.raw(b"z" * 65536)

    outcome = await ask_webhook(huge_text)
    error = webhook_error(outcome)
    assert error.user_message == (
        f"The assistant service sent a reply too large for the bot to read "
        f"(over {MAX_BYTES} bytes)."
    )
    hit = limit_hit(error)
    assert isinstance(hit, ResponseTooLarge)
    assert hit.limit == "max_body_bytes"
    assert outcome.requests == 1


# -- what the backends build ----------------------------------------------------------


def test_each_backend_gets_its_own_limits() -> None:
    model = ModelSettings.from_mapping(
        {
            "base_url": "http://m",
            "model": "m",
            "request_timeout_s": 45,
            "max_response_bytes": 5000,
            "max_line_bytes": 5000,
        }
    )
    limits = http_backend.model_limits(model)
    assert (limits.max_body_bytes, limits.max_decoded_bytes) == (5000, 5000)
    assert limits.read_timeout_s == 45
    assert limits.total_timeout_s == http_backend.MODEL_ANSWER_CEILING_S
    hook = WebhookSettings.from_mapping(
        {"url": "http://w", "secret": SECRET, "timeout_s": 7, "max_response_bytes": 3000}
    )
    limits = http_backend.webhook_limits(hook)
    assert (limits.max_body_bytes, limits.max_decoded_bytes) == (3000, 3000)
    assert (limits.total_timeout_s, limits.read_timeout_s) == (7, 7)


async def test_a_body_still_compressed_is_not_read() -> None:
    """A transport that passes a Content-Encoding through (httpx's own does) would hand
    over compressed bytes: they are refused, never inflated without a cap."""

    class Undecoded(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield gzip(b"{}")

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Encoding": "gzip"}, stream=Undecoded())

    settings = ModelSettings.from_mapping({"base_url": "http://m", "model": "m", "stream": False})
    async with ModelBackend(settings, transport=httpx.MockTransport(handler)) as backend:
        with pytest.raises(ModelError) as caught:
            await backend.reply(CHAT, MESSAGE)
    assert caught.value.kind == "malformed"
    assert isinstance(caught.value.__cause__, UnreadableEncoding)


async def test_the_default_transport_is_an_h11_transport_with_the_backends_limits() -> None:
    settings = ModelSettings.from_mapping({"base_url": "http://m", "model": "m"})
    async with ModelBackend(settings) as backend:
        transport = backend._http._transport
        assert isinstance(transport, H11Transport)
        assert transport.limits == http_backend.model_limits(settings)
