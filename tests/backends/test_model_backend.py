"""The model backend against the fake OpenAI-compatible server (real loopback sockets).

The real clock runs here (never autojump against a real socket); delays are kept to
tens of milliseconds, except the one test that waits out a 1 s ``Retry-After``. Exact
virtual timings are checked with `httpx.MockTransport` on the mock clock at the end.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import MutableMapping
from itertools import pairwise
from typing import Any

import httpx
import pytest
import trio

from bot.backend_settings.reading import SettingsError
from bot.backends.backoff import BACKEND_BACKOFF, Backoff
from bot.backends.base import BackendError
from bot.backends.context import Turn
from bot.backends.model import (
    ModelBackend,
    ModelError,
    ModelSettings,
    SSEParser,
    model_settings_from_env,
)
from bot.backends.streaming import ReplyOverrides, StreamingBackend
from bot.chats import Chat
from bot.messages import IncomingMessage
from fake_openai import API_KEY, FakeOpenAI, Script, split_tokens
from matrix_api.h11_transport import ResponseTooLarge
from matrix_api.models import EventID, RoomID

CHAT = Chat("c_test", RoomID("!room:example.org"), "@alice:example.org", "Test", 0)
Logs = list[MutableMapping[str, Any]]
FAST = Backoff(max_attempts=3, base_delay=0.01, max_delay=0.05, rng=random.Random(1))


def message(body: str = "hello there") -> IncomingMessage:
    return IncomingMessage(EventID("$question"), "@alice:example.org", body, 1)


def settings(server: FakeOpenAI, **changes: Any) -> ModelSettings:
    values: dict[str, Any] = {
        "base_url": server.base_url,
        "api_key": API_KEY,
        "model": "test-model",
        "system_prompt": "Be brief.",
        "request_timeout_s": 2.0,
        "stream": True,
    }
    values.update(changes)
    return ModelSettings.from_mapping(values)


class RecordingSink:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    @property
    def partials(self) -> list[str]:
        return [value for kind, value in self.events if kind == "partial"]

    async def partial(self, text: str) -> None:
        self.events.append(("partial", text))

    async def typing(self, on: bool) -> None:
        self.events.append(("typing", on))


async def ask(
    server: FakeOpenAI,
    *,
    context: list[Turn] | None = None,
    body: str = "hello there",
    backoff: Backoff = FAST,
    overrides: ReplyOverrides | None = None,
    **changes: Any,
) -> tuple[str, RecordingSink]:
    sink = RecordingSink()
    async with ModelBackend(settings(server, **changes), backoff=backoff) as backend:
        answer = await backend.reply_streaming(
            CHAT, message(body), context or [], sink, overrides=overrides
        )
    return answer, sink


async def fails(server: FakeOpenAI, **changes: Any) -> tuple[ModelError, RecordingSink]:
    sink = RecordingSink()
    async with ModelBackend(settings(server, **changes), backoff=FAST) as backend:
        with pytest.raises(ModelError) as caught:
            await backend.reply_streaming(CHAT, message(), [], sink)
    return caught.value, sink


# -- answers ------------------------------------------------------------------------------


async def test_a_streamed_answer_grows_and_is_returned_whole(openai: FakeOpenAI) -> None:
    openai.answer = "The **quick** brown fox jumps over the lazy dog."
    answer, sink = await ask(openai)
    assert answer == openai.answer
    assert sink.partials[-1] == openai.answer
    assert len(sink.partials) == len(split_tokens(openai.answer))
    assert all(b.startswith(a) for a, b in pairwise(sink.partials))
    # typing while waiting, off at the first token, never again
    assert sink.events[0] == ("typing", True)
    assert sink.events[1] == ("typing", False)
    assert [e for e in sink.events if e[0] == "typing"] == [("typing", True), ("typing", False)]


async def test_the_request_is_the_chat_completions_wire_format(openai: FakeOpenAI) -> None:
    context = [Turn("user", "What is 2+2?"), Turn("assistant", "4.")]
    await ask(openai, context=context, temperature=0.2, max_tokens=50, body="And 3+3?")
    (seen,) = openai.requests
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["authorization"] == f"Bearer {API_KEY}"
    assert seen.headers["accept"] == "text/event-stream"
    assert seen.body == {
        "model": "test-model",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4."},
            {"role": "user", "content": "And 3+3?"},
        ],
        "stream": True,
        "temperature": 0.2,
        "max_tokens": 50,
    }


async def test_a_non_streamed_answer_is_one_piece(openai: FakeOpenAI) -> None:
    answer, sink = await ask(openai, stream=False)
    assert answer == "Echo: hello there"
    assert sink.partials == []
    assert sink.events == [("typing", True), ("typing", False)]
    assert openai.requests[0].body["stream"] is False


async def test_a_server_that_ignores_stream_still_answers(openai: FakeOpenAI) -> None:
    openai.then(Script(ignore_stream=True))
    answer, sink = await ask(openai)
    assert answer == "Echo: hello there"
    assert sink.partials == [answer]


async def test_per_chat_overrides_change_model_and_system_prompt(openai: FakeOpenAI) -> None:
    openai.models = frozenset({"test-model", "other-model"})
    await ask(openai, overrides=ReplyOverrides(model="other-model", system_prompt="Be a pirate."))
    body = openai.requests[0].body
    assert body["model"] == "other-model"
    assert body["messages"][0] == {"role": "system", "content": "Be a pirate."}


async def test_context_is_trimmed_to_the_budget_oldest_first(openai: FakeOpenAI) -> None:
    context = [Turn("user", f"q{i} " + "x" * 60) for i in range(10)]
    await ask(openai, context=context, context_budget_chars=200)
    messages = openai.requests[0].body["messages"]
    assert messages[0]["role"] == "system"
    assert messages[-1] == {"role": "user", "content": "hello there"}
    assert [m["content"][:2] for m in messages[1:-1]] == ["q8", "q9"]
    assert sum(len(m["content"]) for m in messages) <= 200


async def test_slow_tokens_within_the_timeout_are_fine(openai: FakeOpenAI) -> None:
    openai.then(Script(token_delay=0.05, answer="one two three"))
    answer, _ = await ask(openai, request_timeout_s=0.5)
    assert answer == "one two three"


async def test_no_api_key_sends_no_authorization(openai: FakeOpenAI) -> None:
    openai.api_key = None
    async with ModelBackend(settings(openai, api_key=None)) as backend:
        await backend.reply(CHAT, message())
    assert "authorization" not in openai.requests[0].headers


async def test_the_backend_satisfies_the_streaming_protocol(openai: FakeOpenAI) -> None:
    async with ModelBackend(settings(openai)) as backend:
        assert isinstance(backend, StreamingBackend)


# -- errors -------------------------------------------------------------------------------


async def test_a_bad_key_is_reported_and_never_logged(openai: FakeOpenAI, logs: Logs) -> None:
    openai.api_key = "sk-the-server-wants-another-key-000"
    error, sink = await fails(openai)
    assert error.kind == "auth"
    assert error.status == 401
    assert "API key" in error.user_message
    assert len(openai.requests) == 1  # not retried
    assert sink.events == [("typing", True), ("typing", False)]
    everything = repr(logs) + str(error) + repr(error.args)
    assert API_KEY not in everything
    assert API_KEY[:10] not in everything
    assert API_KEY[-4:] not in everything
    assert "[masked key]" in str(error)
    failed = [entry for entry in logs if entry["event"] == "model_request_failed"]
    assert failed[0]["kind"] == "auth"


async def test_the_key_stays_out_of_reprs() -> None:
    values = {"base_url": "http://127.0.0.1:1/v1", "model": "m", "api_key": API_KEY}
    model_settings = ModelSettings.from_mapping(values)
    assert API_KEY not in repr(model_settings)
    async with ModelBackend(model_settings) as backend:
        assert API_KEY not in repr(backend)


async def test_an_unknown_model_is_named(openai: FakeOpenAI) -> None:
    error, _ = await fails(openai, model="no-such-model")
    assert error.kind == "not_found"
    assert "no-such-model" in error.user_message
    assert len(openai.requests) == 1


async def test_429_waits_its_retry_after_then_answers(openai: FakeOpenAI, logs: Logs) -> None:
    openai.then(Script(status=429, retry_after="1"))
    started = time.monotonic()
    answer, _ = await ask(openai)
    assert answer == "Echo: hello there"
    assert time.monotonic() - started >= 0.95
    assert len(openai.requests) == 2
    (retry,) = [entry for entry in logs if entry["event"] == "model_request_retry"]
    assert retry["delay_s"] == 1.0
    assert retry["kind"] == "rate_limited"


async def test_429_asking_too_long_is_not_waited_for(openai: FakeOpenAI) -> None:
    openai.then(Script(status=429, retry_after="120"))
    error, _ = await fails(openai)
    assert error.kind == "rate_limited"
    assert error.retry_after == 120
    assert "120 s" in error.user_message
    assert len(openai.requests) == 1


async def test_5xx_is_retried_with_backoff(openai: FakeOpenAI, logs: Logs) -> None:
    openai.then(Script(status=500), Script(status=503))
    answer, _ = await ask(openai)
    assert answer == "Echo: hello there"
    assert len(openai.requests) == 3
    assert [e["status"] for e in logs if e["event"] == "model_request_retry"] == [500, 503]


async def test_5xx_retries_are_bounded(openai: FakeOpenAI) -> None:
    openai.then(*[Script(status=502)] * 5)
    error, _ = await fails(openai)
    assert error.kind == "server"
    assert "HTTP 502" in error.user_message
    assert len(openai.requests) == FAST.max_attempts


async def test_a_400_is_not_retried(openai: FakeOpenAI) -> None:
    openai.then(Script(status=400, error_message="This model's maximum context length is 8192"))
    error, _ = await fails(openai)
    assert error.kind == "bad_request"
    assert "maximum context length" in str(error)
    assert len(openai.requests) == 1


async def test_a_server_that_never_answers_times_out(openai: FakeOpenAI) -> None:
    openai.then(Script(head_delay=1.0))
    with trio.fail_after(5):
        error, sink = await fails(openai, request_timeout_s=0.2)
    assert error.kind == "timeout"
    assert "too long" in error.user_message
    assert sink.events == [("typing", True), ("typing", False)]


async def test_a_stream_that_stalls_is_cut_with_its_partial_text(openai: FakeOpenAI) -> None:
    openai.then(Script(token_delay=0.5, answer="one two three"))
    error, sink = await fails(openai, request_timeout_s=0.2)
    assert error.kind in ("cut", "timeout")
    assert error.partial == "".join(sink.partials[-1:])


async def test_a_disconnect_mid_stream_is_a_cut_answer(openai: FakeOpenAI, logs: Logs) -> None:
    openai.then(Script(answer="alpha beta gamma delta epsilon", disconnect_after=3))
    error, sink = await fails(openai)
    assert error.kind == "cut"
    assert error.partial == "alpha beta gamma"
    assert sink.partials[-1] == "alpha beta gamma"
    assert "cut off" in error.user_message
    assert len(openai.requests) == 1  # text was shown: not retried
    failed = next(e for e in logs if e["event"] == "model_request_failed")
    assert failed["partial_chars"] == len("alpha beta gamma")


async def test_a_malformed_chunk_is_reported(openai: FakeOpenAI) -> None:
    openai.then(Script(answer="alpha beta gamma", malformed_after=2))
    error, _ = await fails(openai)
    assert error.kind == "malformed"
    assert error.partial == "alpha beta"
    assert "cannot read" in error.user_message


async def test_a_stream_without_done_is_a_cut_answer(openai: FakeOpenAI) -> None:
    openai.then(Script(answer="alpha beta", omit_done=True))
    error, _ = await fails(openai)
    assert error.kind == "cut"
    assert error.partial == "alpha beta"


async def test_an_error_event_mid_stream_is_reported(openai: FakeOpenAI) -> None:
    openai.then(Script(answer="alpha beta gamma", error_after=1))
    error, _ = await fails(openai)
    assert error.kind == "cut"
    assert error.partial == "alpha"
    assert "Simulated overload" in str(error)


async def test_nothing_listening_is_a_network_error() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    values = {"base_url": f"http://127.0.0.1:{port}/v1", "model": "m", "api_key": API_KEY}
    async with ModelBackend(ModelSettings.from_mapping(values), backoff=FAST) as backend:
        with pytest.raises(ModelError) as caught:
            await backend.reply(CHAT, message())
    assert caught.value.kind == "network"
    assert isinstance(caught.value, BackendError)


# -- exact waits on the mock clock --------------------------------------------------------


def completion(text: str) -> httpx.Response:
    return httpx.Response(
        200, json={"choices": [{"message": {"role": "assistant", "content": text}}]}
    )


async def test_retry_after_is_honoured_exactly(autojump_clock: trio.testing.MockClock) -> None:
    answers = [
        httpx.Response(429, headers={"Retry-After": "7"}, json={"error": {"message": "slow"}}),
        httpx.Response(429, headers={"retry-after-ms": "2500"}, json={"error": "slow"}),
        completion("finally"),
    ]
    times: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        times.append(trio.current_time())
        return answers.pop(0)

    values = {"base_url": "http://model.test/v1", "model": "m", "stream": "false"}
    backend = ModelBackend(
        ModelSettings.from_mapping(values),
        transport=httpx.MockTransport(handler),
        backoff=dataclasses.replace(BACKEND_BACKOFF, max_attempts=5),
    )
    async with backend:
        assert await backend.reply(CHAT, message()) == "finally"
    assert [round(b - a, 6) for a, b in pairwise(times)] == [7.0, 2.5]


async def test_backoff_after_5xx_grows(autojump_clock: trio.testing.MockClock) -> None:
    times: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        times.append(trio.current_time())
        return httpx.Response(500, text="<html>oops</html>")

    values = {"base_url": "http://model.test", "model": "m", "stream": False}
    policy = Backoff(max_attempts=4, base_delay=1.0, max_delay=10.0)
    async with ModelBackend(
        ModelSettings.from_mapping(values), transport=httpx.MockTransport(handler), backoff=policy
    ) as backend:
        with pytest.raises(ModelError):
            await backend.reply(CHAT, message())
    waits = [b - a for a, b in pairwise(times)]
    assert len(waits) == 3
    for attempt, wait in enumerate(waits):
        assert 0.5 * 2**attempt <= wait <= 2**attempt


async def test_a_bare_base_url_gets_v1() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return completion("ok")

    for base in ("http://model.test", "http://model.test/", "http://model.test/api/v1"):
        values = {"base_url": base, "model": "m", "stream": False}
        async with ModelBackend(
            ModelSettings.from_mapping(values), transport=httpx.MockTransport(handler)
        ) as backend:
            await backend.reply(CHAT, message())
    assert seen == [
        "http://model.test/v1/chat/completions",
        "http://model.test/v1/chat/completions",
        "http://model.test/api/v1/chat/completions",
    ]


async def test_an_empty_answer_is_an_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return completion("")

    values = {"base_url": "http://model.test", "model": "m", "stream": False}
    async with ModelBackend(
        ModelSettings.from_mapping(values), transport=httpx.MockTransport(handler)
    ) as backend:
        with pytest.raises(ModelError) as caught:
            await backend.reply(CHAT, message())
    assert caught.value.kind == "empty"


@pytest.mark.parametrize(
    ("refusal", "kind", "words"),
    [
        pytest.param(
            ResponseTooLarge("head over 65536 bytes", limit="max_head_bytes"),
            "too_large",
            "too large for the bot to read (its headers are too large)",
            id="head",
        ),
        pytest.param(
            ResponseTooLarge("9 interim heads", limit="max_interim_responses"),
            "too_large",
            "too large for the bot to read (too many interim answers)",
            id="interim",
        ),
        pytest.param(
            ResponseTooLarge("Content-Length 10000000000", limit="max_body_bytes"),
            "too_large",
            "too large for the bot to read (more than 16777216 bytes)",
            id="content-length",
        ),
        pytest.param(
            httpx.DecodingError("two content codings"),
            "malformed",
            "an answer the bot cannot read",
            id="coding",
        ),
    ],
)
async def test_an_answer_the_transport_refuses_is_reported_and_not_retried(
    refusal: Exception, kind: str, words: str
) -> None:
    # The server answered, with something the bot refuses: asking again gets the same.
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise refusal

    values = {"base_url": "http://model.test", "model": "m", "stream": True}
    async with ModelBackend(
        ModelSettings.from_mapping(values), transport=httpx.MockTransport(handler), backoff=FAST
    ) as backend:
        with pytest.raises(ModelError) as caught:
            await backend.reply(CHAT, message())
    assert len(calls) == 1
    assert caught.value.kind == kind
    assert words in caught.value.user_message
    assert caught.value.__cause__ is refusal


async def test_a_broken_connection_before_any_token_is_still_retried() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            raise httpx.RemoteProtocolError("peer closed connection without a response")
        return completion("after all")

    values = {"base_url": "http://model.test", "model": "m", "stream": False}
    async with ModelBackend(
        ModelSettings.from_mapping(values), transport=httpx.MockTransport(handler), backoff=FAST
    ) as backend:
        assert await backend.reply(CHAT, message()) == "after all"
    assert len(calls) == 2


# -- SSE and settings ----------------------------------------------------------------------


def test_sse_parser_follows_the_spec() -> None:
    parser = SSEParser()
    lines = [": comment", "event: x", 'data: {"a":', "data:1}", "", "id: 3", "", "data: [DONE]"]
    out = [data for line in lines if (data := parser.feed(line)) is not None]
    assert out == ['{"a":\n1}']
    assert parser.flush() == "[DONE]"
    assert parser.flush() is None
    assert json.loads(out[0].replace("\n", "")) == {"a": 1}


def test_settings_errors_name_each_bad_key() -> None:
    with pytest.raises(SettingsError) as caught:
        ModelSettings.from_mapping(
            {
                "base_url": "ftp://x",
                "api_key": "has space",
                "temperature": "hot",
                "max_tokens": 0,
                "request_timeout_s": True,
                "stream": "maybe",
                "edit_interval_s": 0,
                "context_budget_chars": "lots",
                "colour": "blue",
            }
        )
    problems = "\n".join(caught.value.problems)
    for name in (
        "model.base_url (MODEL_BASE_URL)",
        "model.model (MODEL_NAME): required",
        "model.api_key (MODEL_API_KEY)",
        "model.temperature (MODEL_TEMPERATURE)",
        "model.max_tokens (MODEL_MAX_TOKENS)",
        "model.request_timeout_s (MODEL_TIMEOUT_S)",
        "model.stream (MODEL_STREAM)",
        "model.edit_interval_s (MODEL_EDIT_INTERVAL_S)",
        "model.context_budget_chars (MODEL_CONTEXT_BUDGET_CHARS)",
        "model.colour: unknown setting",
    ):
        assert name in problems
    assert len(caught.value.problems) == 10
    assert "has space" not in problems  # a secret is never echoed


def test_settings_refuse_credentials_in_the_url() -> None:
    with pytest.raises(SettingsError, match="must not contain credentials"):
        ModelSettings.from_mapping({"base_url": "https://u:p@api.example/v1", "model": "m"})


def test_settings_from_env_overlay_the_file() -> None:
    environ = {
        "MODEL_BASE_URL": "http://127.0.0.1:8080/v1/",
        "MODEL_API_KEY": API_KEY,
        "MODEL_NAME": "llama",
        "MODEL_TEMPERATURE": "0.3",
        "MODEL_MAX_TOKENS": "256",
        "MODEL_TIMEOUT_S": "45",
        "MODEL_STREAM": "off",
        "MODEL_EDIT_INTERVAL_S": "2",
        "MODEL_CONTEXT_BUDGET_CHARS": "5000",
        "MODEL_SYSTEM_PROMPT": "",
        "UNRELATED": "x",
    }
    file_values = {"model": "from-file", "system_prompt": "Be kind.", "base_url": "http://x"}
    model_settings = model_settings_from_env(environ, file_values)
    assert model_settings == ModelSettings(
        base_url="http://127.0.0.1:8080/v1",
        model="llama",
        api_key=API_KEY,
        system_prompt="Be kind.",
        temperature=0.3,
        max_tokens=256,
        request_timeout_s=45.0,
        stream=False,
        edit_interval_s=2.0,
        context_budget_chars=5000,
    )
    assert model_settings.completions_url == "http://127.0.0.1:8080/v1/chat/completions"


def test_defaults() -> None:
    model_settings = model_settings_from_env({"MODEL_BASE_URL": "http://h", "MODEL_NAME": "m"})
    assert model_settings.stream is True
    assert model_settings.temperature is None
    assert model_settings.max_tokens is None
    assert model_settings.api_key is None
    assert model_settings.system_prompt
