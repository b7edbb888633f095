"""A local OpenAI-compatible ``/v1/chat/completions`` server that misbehaves on demand.

Speaks the real wire format: bearer auth with OpenAI's error bodies, a JSON completion,
or with ``"stream": true`` server-sent events over a chunked response (a ``:`` comment
first, a role chunk, one chunk per token, a ``finish_reason`` chunk, ``data: [DONE]``).

Each request takes the next queued `Script` (the default one when none is queued):

    server = FakeOpenAI(api_key="sk-test-...", token_delay=0.01)
    async with trio.open_nursery() as nursery:
        base_url = await nursery.start(server.serve)
        server.then(Script(status=429, retry_after="1"), Script())   # then the default
        ...
        nursery.cancel_scope.cancel()

The answer is ``answer`` when given, else ``"Echo: <the last user message>"``.
"""

from __future__ import annotations

import json
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import trio

from mini_http import HTTPRequest, Responder, serve_http

__all__ = ["API_KEY", "FakeOpenAI", "Script", "Seen", "split_tokens"]

API_KEY = "sk-test-Zq8vN3xY7wK2mP5rT9uB4cD6"
"""The key the tests' server wants (see the ``openai`` fixture)."""

_TOKEN = re.compile(r"\s*\S+|\s+")


def split_tokens(text: str) -> list[str]:
    """``text`` as word-sized tokens ("Hello", " world", ...); they join back to it."""
    return _TOKEN.findall(text)


@dataclass(frozen=True)
class Script:
    """How to answer one request. Defaults: a well-behaved answer."""

    status: int = 200
    """Answer with this status (and an OpenAI error body) instead of a completion."""
    retry_after: str | None = None
    error_message: str | None = None
    answer: str | None = None
    head_delay: float = 0.0
    """Seconds before the response head is sent (a server that thinks, or hangs)."""
    token_delay: float | None = None
    """Seconds between tokens (None: the server's default)."""
    disconnect_after: int | None = None
    """Close the connection after this many tokens, mid-stream."""
    malformed_after: int | None = None
    """Send a chunk that is not JSON after this many tokens."""
    error_after: int | None = None
    """Send an ``{"error": ...}`` event after this many tokens (and stop)."""
    omit_done: bool = False
    """End the stream cleanly but without ``finish_reason`` nor ``[DONE]``."""
    ignore_stream: bool = False
    """Answer with one JSON completion even when streaming was asked for."""


@dataclass(frozen=True)
class Seen:
    """A request as the server received it."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float


@dataclass
class FakeOpenAI:
    api_key: str | None = None
    models: frozenset[str] = frozenset({"test-model"})
    answer: str | None = None
    token_delay: float = 0.0
    requests: list[Seen] = field(default_factory=list)
    scripts: deque[Script] = field(default_factory=deque)
    default: Script = field(default_factory=Script)
    base_url: str = ""
    """Set by `serve`."""

    def then(self, *scripts: Script) -> FakeOpenAI:
        self.scripts.extend(scripts)
        return self

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve on loopback; ``task_status`` gets the base URL (``http://127.0.0.1:N/v1``)."""
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_http, self._handle)
            self.base_url = f"http://127.0.0.1:{port}/v1"
            task_status.started(self.base_url)

    # -- answering ---------------------------------------------------------------------

    async def _handle(self, request: HTTPRequest, out: Responder) -> None:
        if request.method != "POST" or request.path != "/v1/chat/completions":
            await self._error(out, 404, f"Unknown path {request.path}", "not_found")
            return
        try:
            body = json.loads(request.body)
        except ValueError:
            await self._error(out, 400, "We could not parse the JSON body", "invalid_json")
            return
        self.requests.append(Seen(request.path, request.headers, body, time.monotonic()))
        script = self.scripts.popleft() if self.scripts else self.default
        if script.head_delay:
            await trio.sleep(script.head_delay)
        if self.api_key is not None:
            given = request.headers.get("authorization", "")
            if given != f"Bearer {self.api_key}":
                shown = given.removeprefix("Bearer ")
                masked = f"{shown[:8]}{'*' * 20}{shown[-4:]}" if len(shown) > 12 else shown
                await self._error(
                    out,
                    401,
                    f"Incorrect API key provided: {masked}. You can find your API key at "
                    "https://platform.example/account/api-keys.",
                    "invalid_api_key",
                )
                return
        if body.get("model") not in self.models:
            await self._error(
                out,
                404,
                f"The model `{body.get('model')}` does not exist or you do not have access to it.",
                "model_not_found",
            )
            return
        if script.status != 200:
            headers = {"Retry-After": script.retry_after} if script.retry_after else {}
            await self._error(
                out,
                script.status,
                script.error_message or f"Simulated HTTP {script.status}",
                "server_error" if script.status >= 500 else "rate_limit_exceeded",
                headers,
            )
            return
        answer = script.answer or self.answer or f"Echo: {_last_user(body)}"
        if body.get("stream") and not script.ignore_stream:
            await self._stream(out, body, script, answer)
        else:
            delay = self.token_delay if script.token_delay is None else script.token_delay
            await trio.sleep(delay * len(split_tokens(answer)))  # the time to generate it
            await out.send(200, json.dumps(_completion(body, answer)).encode())

    async def _error(
        self,
        out: Responder,
        status: int,
        message: str,
        code: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        document = {
            "error": {
                "message": message,
                "type": "invalid_request_error" if status < 500 else "server_error",
                "param": None,
                "code": code,
            }
        }
        await out.send(status, json.dumps(document).encode(), headers=headers)

    async def _stream(
        self, out: Responder, body: dict[str, Any], script: Script, answer: str
    ) -> None:
        delay = self.token_delay if script.token_delay is None else script.token_delay
        await out.start(
            200,
            {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"},
            chunked=True,
        )
        await out.chunk(b": keep-alive\n\n")
        await out.chunk(_event(_chunk(body, {"role": "assistant", "content": ""}, None)))
        for index, token in enumerate(split_tokens(answer)):
            if index == script.disconnect_after:
                return  # the connection closes mid-body
            if index == script.malformed_after:
                await out.chunk(b'data: {"choices": [{"delta": {"content": "x"\n\n')
                await out.end()
                return
            if index == script.error_after:
                error = {"error": {"message": "Simulated overload mid-stream", "code": 503}}
                await out.chunk(_event(error))
                await out.end()
                return
            if delay:
                await trio.sleep(delay)
            await out.chunk(_event(_chunk(body, {"content": token}, None)))
        if script.omit_done:
            await out.end()
            return
        await out.chunk(_event(_chunk(body, {}, "stop")))
        await out.chunk(b"data: [DONE]\n\n")
        await out.end()


def _last_user(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages", [])):
        if message.get("role") == "user":
            return str(message.get("content", ""))
    return ""


def _event(document: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(document).encode() + b"\n\n"


def _chunk(body: dict[str, Any], delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": body.get("model"),
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def _completion(body: dict[str, Any], answer: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": body.get("model"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
    }
