"""Model servers and webhooks that answer as an attacker would: the bot stays bounded.

Each server here is a real loopback HTTP server (`mini_http`) that sends an endless
body, an endless line, a lying ``Content-Length``, a compression bomb, a huge answer or
broken UTF-8. Every test checks two things: what the user gets (the answer cut with a
note, or a clear `BackendError`), and that the bot read no more than its limit plus one
piece (`PIECE_BYTES`), counted between httpx and the backends' own transport
(`H11Transport` with the backend's limits), and held no more memory than a few times
the limit (tracemalloc's peak). Compression bombs, lying lengths and the other cases the
transport refuses before the body: `test_backends_default_transport.py`.
"""

from __future__ import annotations

import gc
import json
import random
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio

from bot.backends.backoff import Backoff
from bot.backends.bounded_read import PIECE_BYTES, LineSplitter, LineTooLong
from bot.backends.http_backend import model_limits, webhook_limits
from bot.backends.model import ModelBackend, ModelError, ModelSettings
from bot.backends.webhook import WebhookBackend, WebhookError, WebhookSettings
from bot.chats import Chat
from bot.messages import IncomingMessage
from bot.replies.markdown import render_markdown
from matrix_api.h11_transport import H11Transport, ResponseLimits
from matrix_api.models import EventID, RoomID
from mini_http import HTTPRequest, Responder, serve_http

CHAT = Chat("c_hostile", RoomID("!room:example.org"), "@alice:example.org", "Hostile", 0)
MESSAGE = IncomingMessage(EventID("$q"), "@alice:example.org", "hello", 1)
FAST = Backoff(max_attempts=2, base_delay=0.01, max_delay=0.02, rng=random.Random(3))

MAX_BYTES = 256 * 1024
MAX_LINE = 16 * 1024
MAX_CHARS = 2_000
MEMORY_CEILING = 4 * 1024 * 1024
"""What one call may hold at its peak with the limits above (an unbounded read of the
same answers reaches hundreds of megabytes before the test's deadline)."""
FILLER = b"x" * PIECE_BYTES

Handler = Callable[[HTTPRequest, Responder], Awaitable[None]]


@pytest.fixture(autouse=True)
def no_generator_left_to_the_collector() -> Iterator[None]:
    """A body abandoned half-read must leave no async generator for the garbage
    collector: trio warns then, and warnings are errors in this suite."""
    yield
    gc.collect()


class CountingTransport(httpx.AsyncBaseTransport):
    """The backends' transport (`H11Transport` within ``limits``), counting the body
    bytes the bot took from it."""

    def __init__(self, limits: ResponseLimits) -> None:
        self.inner = H11Transport(limits=limits)
        self.received = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_Counted(response.stream, self),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self.inner.aclose()


class _Counted(httpx.AsyncByteStream):
    def __init__(self, inner: Any, owner: CountingTransport) -> None:
        self.inner = inner
        self.owner = owner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.inner:
            self.owner.received += len(chunk)
            yield chunk

    async def aclose(self) -> None:
        await self.inner.aclose()


@asynccontextmanager
async def hostile(handler: Handler) -> AsyncIterator[str]:
    """A server answering every request with ``handler``; yields its base URL."""
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, handler)
        yield f"http://127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


class Measured:
    def __init__(self) -> None:
        self.peak = 0
        self.received = 0


@asynccontextmanager
async def measured(transport: CountingTransport) -> AsyncIterator[Measured]:
    result = Measured()
    tracemalloc.start()
    try:
        yield result
    finally:
        result.peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        result.received = transport.received


def model_settings(base_url: str, **changes: Any) -> ModelSettings:
    values: dict[str, Any] = {
        "base_url": f"{base_url}/v1",
        "model": "m",
        "request_timeout_s": 2,
        "stream": True,
        "max_response_bytes": MAX_BYTES,
        "max_line_bytes": MAX_LINE,
        "max_answer_chars": MAX_CHARS,
    }
    values.update(changes)
    return ModelSettings.from_mapping(values)


class Partials:
    def __init__(self) -> None:
        self.shown: list[str] = []

    async def partial(self, text: str) -> None:
        self.shown.append(text)

    async def typing(self, on: bool) -> None:
        return None


async def ask_model(
    handler: Handler, **changes: Any
) -> tuple[str | ModelError, Measured, Partials]:
    """The model backend's answer (or its error) from a server answering with ``handler``."""
    sink = Partials()
    outcome: str | ModelError
    with trio.fail_after(10):
        async with hostile(handler) as base_url:
            settings = model_settings(base_url, **changes)
            transport = CountingTransport(model_limits(settings))
            async with (
                ModelBackend(settings, transport=transport, backoff=FAST) as backend,
                measured(transport) as figures,
            ):
                try:
                    outcome = await backend.reply_streaming(CHAT, MESSAGE, [], sink)
                except ModelError as exc:
                    outcome = exc
    return outcome, figures, sink


def token(text: str) -> bytes:
    chunk = {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def completion(text: str) -> bytes:
    return json.dumps(
        {"choices": [{"message": {"content": text}, "finish_reason": "stop"}]}
    ).encode()


async def sse_head(out: Responder) -> None:
    await out.start(200, {"Content-Type": "text/event-stream"}, chunked=True)


async def forever(out: Responder, data: bytes) -> None:
    while True:
        await out.chunk(data)


def within_limit(figures: Measured, limit: int, pieces: int = 1) -> None:
    assert figures.received <= limit + pieces * PIECE_BYTES, figures.received
    assert figures.peak <= MEMORY_CEILING, figures.peak


# -- the model backend ----------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_an_endless_body_is_read_no_further_than_the_limit(stream: bool) -> None:
    async def endless_json(request: HTTPRequest, out: Responder) -> None:
        await out.start(200, {"Content-Type": "application/json"}, chunked=True)
        await out.chunk(b'{"choices": [{"message": {"content": "')
        await forever(out, FILLER)

    error, figures, _ = await ask_model(endless_json, stream=stream)
    assert isinstance(error, ModelError)
    assert error.kind == "too_large"
    assert error.user_message == (
        f"The assistant's server sent an answer too large for the bot to read "
        f"(more than {MAX_BYTES} bytes)."
    )
    within_limit(figures, MAX_BYTES)


async def test_an_endless_sse_line_is_refused_without_buffering_it() -> None:
    async def endless_line(request: HTTPRequest, out: Responder) -> None:
        await sse_head(out)
        await out.chunk(b"data: ")
        await forever(out, FILLER)

    error, figures, _ = await ask_model(endless_line)
    assert isinstance(error, ModelError)
    assert error.kind == "too_large"
    assert f"a line longer than {MAX_LINE} bytes" in error.user_message
    within_limit(figures, MAX_LINE, pieces=2)


async def test_an_endless_line_after_some_text_keeps_the_text_and_says_so() -> None:
    async def text_then_endless_line(request: HTTPRequest, out: Responder) -> None:
        await sse_head(out)
        for word in ("Hello", " there", "."):
            await out.chunk(token(word))
        await out.chunk(b"data: ")
        await forever(out, FILLER)

    answer, figures, sink = await ask_model(text_then_endless_line)
    assert answer == (
        "Hello there.\n\n"
        f"[answer cut: a line of the server's answer was longer than {MAX_LINE} bytes]"
    )
    assert sink.shown[-1] == "Hello there."
    within_limit(figures, MAX_LINE, pieces=2)


async def test_tokens_without_end_are_cut_at_max_answer_chars() -> None:
    async def endless_tokens(request: HTTPRequest, out: Responder) -> None:
        await sse_head(out)
        await forever(out, token("ab "))  # and never [DONE]

    answer, figures, sink = await ask_model(endless_tokens)
    assert isinstance(answer, str)
    text, note = answer.rsplit("\n\n", 1)
    assert note == f"[answer cut: longer than {MAX_CHARS} characters]"
    assert len(text) <= MAX_CHARS
    assert text == ("ab " * MAX_CHARS)[:MAX_CHARS].rstrip()
    assert len(sink.shown[-1]) == MAX_CHARS
    # reading stopped at the limit: a few hundred bytes of JSON per token, no more
    within_limit(figures, MAX_CHARS // 3 * len(token("ab ")))


async def test_keep_alives_without_end_stop_at_the_byte_limit() -> None:
    async def endless_keep_alives(request: HTTPRequest, out: Responder) -> None:
        await sse_head(out)
        await forever(out, b": keep-alive\n\n" * 1000)

    error, figures, _ = await ask_model(endless_keep_alives)
    assert isinstance(error, ModelError)
    assert error.kind == "too_large"
    within_limit(figures, MAX_BYTES)


async def test_text_then_an_endless_stream_is_cut_at_the_byte_limit() -> None:
    async def text_then_keep_alives(request: HTTPRequest, out: Responder) -> None:
        await sse_head(out)
        await out.chunk(token("Partly answered"))
        await forever(out, b": keep-alive\n\n" * 1000)

    answer, figures, _ = await ask_model(text_then_keep_alives)
    assert answer == (
        f"Partly answered\n\n[answer cut: the server sent more than {MAX_BYTES} bytes]"
    )
    within_limit(figures, MAX_BYTES)


async def test_data_lines_without_a_blank_line_do_not_make_an_endless_event() -> None:
    async def endless_event(request: HTTPRequest, out: Responder) -> None:
        await sse_head(out)
        await forever(out, b"data: " + b"y" * 1000 + b"\n")

    error, figures, _ = await ask_model(endless_event)
    assert isinstance(error, ModelError)
    assert error.kind == "too_large"
    within_limit(figures, MAX_LINE, pieces=2)


async def test_a_content_length_larger_than_what_comes_is_a_broken_answer() -> None:
    async def short_body(request: HTTPRequest, out: Responder) -> None:
        await out.start(200, {"Content-Type": "application/json", "Content-Length": "5000"})
        await out.raw(completion("only part")[:40])  # then the connection closes

    error, _, _ = await ask_model(short_body, stream=False)
    assert isinstance(error, ModelError)
    assert error.kind == "network"
    assert error.user_message.startswith("The assistant cannot be reached")


async def test_a_huge_non_streamed_answer_is_cut_at_max_answer_chars() -> None:
    body = completion("word " * 100_000)

    async def huge(request: HTTPRequest, out: Responder) -> None:
        await out.send(200, body)

    answer, _, _ = await ask_model(huge, stream=False, max_response_bytes=len(body))
    assert answer == (
        ("word " * MAX_CHARS)[:MAX_CHARS].rstrip()
        + f"\n\n[answer cut: longer than {MAX_CHARS} characters]"
    )


async def test_a_code_block_cut_open_is_closed_before_the_note() -> None:
    async def code_forever(request: HTTPRequest, out: Responder) -> None:
        await sse_head(out)
        await out.chunk(token("Here:\n\n```python\n"))
        await forever(out, token("x = 1\n"))

    answer, _, _ = await ask_model(code_forever)
    assert isinstance(answer, str)
    note = f"[answer cut: longer than {MAX_CHARS} characters]"
    assert answer.endswith(f"\n```\n\n{note}")
    assert render_markdown(answer).endswith(f"</code></pre>\n<p>{note}</p>")


async def test_invalid_utf8_in_a_stream_is_replaced_not_fatal() -> None:
    async def broken_utf8(request: HTTPRequest, out: Responder) -> None:
        await sse_head(out)
        await out.chunk(b'data: {"choices": [{"delta": {"content": "ok \xff\xfe end"}}]}\n\n')
        await out.chunk(b"data: [DONE]\n\n")
        await out.end()

    answer, _, _ = await ask_model(broken_utf8)
    assert answer == "ok \ufffd\ufffd end"


async def test_invalid_utf8_in_a_json_answer_is_an_answer_the_bot_cannot_read() -> None:
    async def broken_utf8(request: HTTPRequest, out: Responder) -> None:
        await out.send(200, completion("fine").replace(b"fine", b"fi\xffne"))

    error, _, _ = await ask_model(broken_utf8, stream=False)
    assert isinstance(error, ModelError)
    assert error.kind == "malformed"
    assert error.user_message == "The assistant's server sent an answer the bot cannot read."


async def test_an_endless_tail_after_done_does_not_spoil_the_answer() -> None:
    async def done_then_more(request: HTTPRequest, out: Responder) -> None:
        await sse_head(out)
        await out.chunk(token("All"))
        await out.chunk(token(" done."))
        await out.chunk(b"data: [DONE]\n\n")
        await forever(out, b": still here\n\n" * 1000)

    answer, figures, _ = await ask_model(done_then_more)
    assert answer == "All done."
    # what came after [DONE] is dropped as it comes, for a second at most
    within_limit(figures, 2 * MAX_BYTES)


async def test_an_error_answer_with_an_endless_body_is_read_only_for_an_excerpt() -> None:
    async def failing_forever(request: HTTPRequest, out: Responder) -> None:
        await out.start(500, {"Content-Type": "text/html"}, chunked=True)
        await forever(out, b"<p>oops</p>" * 5000)

    error, figures, _ = await ask_model(failing_forever)
    assert isinstance(error, ModelError)
    assert error.kind == "server"
    assert error.status == 500
    # two attempts (FAST), each read for an excerpt only
    assert figures.received <= 2 * (16 * 1024 + 2 * PIECE_BYTES), figures.received
    assert figures.peak <= MEMORY_CEILING


# -- the webhook backend --------------------------------------------------------------

SECRET = "a-shared-secret-of-some-length"


async def ask_webhook(handler: Handler, **changes: Any) -> tuple[str | WebhookError, Measured]:
    outcome: str | WebhookError
    with trio.fail_after(10):
        async with hostile(handler) as base_url:
            values: dict[str, Any] = {
                "url": f"{base_url}/hook",
                "secret": SECRET,
                "timeout_s": 3,
                "max_response_bytes": MAX_BYTES,
                "max_answer_chars": MAX_CHARS,
            }
            values.update(changes)
            settings = WebhookSettings.from_mapping(values)
            transport = CountingTransport(webhook_limits(settings))
            async with (
                WebhookBackend(settings, transport=transport, backoff=FAST) as backend,
                measured(transport) as figures,
            ):
                try:
                    outcome = await backend.reply(CHAT, MESSAGE)
                except WebhookError as exc:
                    outcome = exc
    return outcome, figures


async def test_an_endless_json_reply_from_a_webhook_is_refused() -> None:
    async def endless_json(request: HTTPRequest, out: Responder) -> None:
        await out.start(200, {"Content-Type": "application/json"}, chunked=True)
        await out.chunk(b'{"reply": "')
        await forever(out, FILLER)

    error, figures = await ask_webhook(endless_json)
    assert isinstance(error, WebhookError)
    assert error.user_message == (
        f"The assistant service sent a reply too large for the bot to read "
        f"(over {MAX_BYTES} bytes)."
    )
    within_limit(figures, MAX_BYTES)


async def test_an_endless_plain_text_reply_keeps_what_fits_and_says_so() -> None:
    async def endless_text(request: HTTPRequest, out: Responder) -> None:
        await out.start(200, {"Content-Type": "text/plain; charset=utf-8"}, chunked=True)
        await forever(out, "ü".encode() * (PIECE_BYTES // 2) + b"!")  # odd: cuts a character

    reply, figures = await ask_webhook(endless_text, max_answer_chars=10_000_000)
    assert isinstance(reply, str)
    text, note = reply.rsplit("\n\n", 1)
    assert note == f"[answer cut: the service sent more than {MAX_BYTES} bytes]"
    assert set(text) <= {"ü", "!"}
    assert len(text.encode()) <= MAX_BYTES
    within_limit(figures, MAX_BYTES)


async def test_a_huge_webhook_reply_is_cut_at_max_answer_chars() -> None:
    async def huge(request: HTTPRequest, out: Responder) -> None:
        await out.send(200, json.dumps({"reply": "z" * 100_000}).encode())

    reply, _ = await ask_webhook(huge)
    assert reply == "z" * MAX_CHARS + f"\n\n[answer cut: longer than {MAX_CHARS} characters]"


async def test_a_webhook_error_with_an_endless_body_is_read_only_for_an_excerpt() -> None:
    async def failing_forever(request: HTTPRequest, out: Responder) -> None:
        await out.start(502, {"Content-Type": "text/html"}, chunked=True)
        await forever(out, b"<p>bad gateway</p>" * 3000)

    error, figures = await ask_webhook(failing_forever)
    assert isinstance(error, WebhookError)
    assert error.status == 502
    assert figures.received <= 2 * (16 * 1024 + 2 * PIECE_BYTES), figures.received


async def test_invalid_utf8_in_a_plain_text_webhook_reply_is_replaced() -> None:
    async def broken_utf8(request: HTTPRequest, out: Responder) -> None:
        await out.send(200, b"fine \xff\xfe reply", "text/plain; charset=utf-8")

    reply, _ = await ask_webhook(broken_utf8)
    assert reply == "fine \ufffd\ufffd reply"


# -- the line splitter ----------------------------------------------------------------


@pytest.mark.parametrize("cut", range(1, 12))
def test_lines_end_at_crlf_lf_or_cr_wherever_the_bytes_are_split(cut: int) -> None:
    data = b"one\r\ntwo\nthree\rfour\r\n\r\nfive"
    lines = LineSplitter(100)
    found = lines.feed(data[:cut]) + lines.feed(data[cut:])
    assert [*found, lines.flush()] == [b"one", b"two", b"three", b"four", b"", b"five"]


def test_a_line_too_long_is_refused_before_it_ends() -> None:
    lines = LineSplitter(10)
    assert lines.feed(b"short\n12345") == [b"short"]
    with pytest.raises(LineTooLong):
        lines.feed(b"678901")  # 11 bytes held, and no end in sight
