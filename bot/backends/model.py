"""The ``model`` backend: any OpenAI-compatible ``/v1/chat/completions`` server.

Hosted APIs and local servers (llama.cpp, vLLM, Ollama, ...) all speak it. One
`httpx.AsyncClient` per backend; no vendor SDK. With ``stream`` on, the answer is read
as server-sent events (``data: {...}`` lines ending with ``data: [DONE]``) and reported
to a `ReplySink` as it grows.

Failures become a `ModelError` (a `BackendError`) whose ``user_message`` is short and
says what went wrong; the operator's log says the rest. Retried, with bounded backoff,
only before any token arrived: 429 (waiting its ``Retry-After``), 5xx, and connections
that failed; an answer over a limit, or in a coding the bot does not read, is not (the
server would send the same again); docs/retries.md says what every layer retries. The
API key lives only in the ``Authorization`` header: never in a log line, a repr or an
exception message (server messages are scrubbed of it too).

    [model]                                     # or the environment variables
    base_url = "http://127.0.0.1:11434/v1"      # MODEL_BASE_URL (…/v1 added when no path)
    model = "llama3.2"                          # MODEL_NAME
    api_key = "..."                             # MODEL_API_KEY (better from the environment)
    system_prompt = "You are ..."               # MODEL_SYSTEM_PROMPT
    temperature = 0.7                           # MODEL_TEMPERATURE (unset: the server's)
    max_tokens = 1024                           # MODEL_MAX_TOKENS (unset: the server's)
    request_timeout_s = 120                     # MODEL_TIMEOUT_S
    stream = true                               # MODEL_STREAM
    edit_interval_s = 1.5                       # MODEL_EDIT_INTERVAL_S
    context_budget_chars = 24000                # MODEL_CONTEXT_BUDGET_CHARS
    max_response_bytes = 16777216               # MODEL_MAX_RESPONSE_BYTES
    max_line_bytes = 1048576                    # MODEL_MAX_LINE_BYTES
    max_answer_chars = 100000                   # MODEL_MAX_ANSWER_CHARS

Limits: the bot reads at most ``max_response_bytes`` of one answer (a non-streamed
body, or the whole stream), at most ``max_line_bytes`` of one stream line or event, and
keeps at most ``max_answer_chars`` of the answer. An answer that outgrows a limit after
some text came is cut there and ends with a note saying so (``[answer cut: ...]``); one
that cannot be read within them at all is a `ModelError` (kind ``too_large``).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import structlog
import trio

from matrix_api.h11_transport import ResponseTooLarge

from ..attachments import LoadedImage, LoadedText
from ..backend_settings.model import (
    DEFAULT_SYSTEM_PROMPT,
    MODEL_ENV,
    ModelSettings,
    model_settings_from_env,
)
from ..chats import Chat
from ..messages import IncomingMessage
from .backoff import BACKEND_BACKOFF, Backoff, retry_after_from
from .base import BackendError
from .bounded_read import (
    BodyTooLarge,
    LineSplitter,
    LineTooLong,
    ReadLimitError,
    UnreadableEncoding,
    cut_note,
    open_body,
    read_prefix,
    with_note,
)
from .context import Turn, trim_context
from .http_backend import HTTPBackend, model_limits
from .streaming import ReplyOverrides, ReplySink

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "MODEL_ENV",
    "ModelBackend",
    "ModelError",
    "ModelSettings",
    "SSEParser",
    "model_settings_from_env",
]

log = structlog.get_logger("bot.backends.model")


_EXCERPT = 300
_ERROR_BODY_BYTES = 16 * 1024
"""Of an error answer only an excerpt is shown: no more is read."""
# The transport's limits on an answer's head, in words (`ResponseLimits` fields).
_HEAD_LIMIT_WORDS = {
    "max_head_bytes": "its headers are too large",
    "max_header_count": "too many headers",
    "max_interim_responses": "too many interim answers",
}
_DRAIN_S = 1.0
_MASKED = re.compile(r"\S*\*{3,}\S*")


ErrorKind = Literal[
    "auth",
    "not_found",
    "rate_limited",
    "server",
    "bad_request",
    "timeout",
    "network",
    "cut",
    "malformed",
    "empty",
    "too_large",
]


class ModelError(BackendError):
    """The model gave no usable answer.

    ``kind`` says which failure it was; ``partial`` is the text that had arrived before
    a stream broke (the caller may keep it on screen, marked as cut off).
    """

    def __init__(
        self,
        message: str,
        *,
        kind: ErrorKind,
        user_message: str,
        status: int | None = None,
        retry_after: float | None = None,
        partial: str = "",
    ) -> None:
        super().__init__(message, user_message=user_message)
        self.kind: ErrorKind = kind
        self.status = status
        self.retry_after = retry_after
        self.partial = partial

    @property
    def retryable(self) -> bool:
        """Worth asking again: nothing was shown yet and the failure may pass."""
        return not self.partial and (
            self.kind in ("rate_limited", "network")
            or (self.kind == "server" and (self.status or 0) >= 500)
        )


class SSEParser:
    """Server-sent events, line by line: yields each event's ``data``.

    Lines starting with ``:`` are comments (keep-alives); ``event:``, ``id:`` and
    ``retry:`` fields are ignored; several ``data:`` lines of one event are joined with
    newlines; a blank line ends an event. With ``max_event_chars``, an event whose data
    grows past it raises `LineTooLong` (many short ``data:`` lines must not add up to an
    unbounded event either).
    """

    def __init__(self, max_event_chars: int | None = None) -> None:
        self._data: list[str] = []
        self._size = 0
        self._max = max_event_chars

    def feed(self, line: str) -> str | None:
        """The data of the event this line ends, if it ends one."""
        if line == "":
            return self.flush()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            value = value.removeprefix(" ")
            self._size += len(value) + 1
            if self._max is not None and self._size > self._max:
                self._data = []
                self._size = 0
                raise LineTooLong(self._max)
            self._data.append(value)
        return None

    def flush(self) -> str | None:
        """The data of an event cut off before its blank line, if any (at end of stream)."""
        if not self._data:
            return None
        data = "\n".join(self._data)
        self._data = []
        self._size = 0
        return data


OnPartial = Callable[[str], Awaitable[None]]


@dataclass
class _Progress:
    """What one attempt got, for the log and for a cut stream's ``partial``."""

    text: str = ""
    chunks: int = 0
    finish_reason: str | None = None
    done: bool = False
    first_token_at: float | None = None
    cut: str | None = None
    """Why the answer was cut short (a limit): the note that ends it."""


class ModelBackend(HTTPBackend):
    """The ``model`` backend. The caller owns it and closes it (``async with`` or
    `aclose`); it holds one connection pool and no tasks."""

    name = "model"
    # Images (for a vision model) and text files arrive read (`bot.attachments`).
    attachments = "content"

    def __init__(
        self,
        settings: ModelSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        backoff: Backoff | None = None,
        user_agent: str = "surfaces-bot",
    ) -> None:
        self.settings = settings
        self.backoff = backoff or BACKEND_BACKOFF
        timeout = settings.request_timeout_s
        super().__init__(
            timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)),
            transport=transport,
            user_agent=user_agent,
            limits=model_limits(settings),
        )

    def __repr__(self) -> str:
        return f"ModelBackend(url={self.settings.completions_url!r}, model={self.settings.model!r})"

    # -- the Backend and StreamingBackend protocols -------------------------------------

    async def reply_streaming(
        self,
        chat: Chat,
        message: IncomingMessage,
        context: list[Turn],
        sink: ReplySink,
        *,
        overrides: ReplyOverrides | None = None,
    ) -> str:
        """`StreamingBackend.reply_streaming`: typing on while waiting, then partial text
        (when ``stream`` is on), then the whole answer."""
        overrides = overrides or ReplyOverrides()
        loaded = message.attachment.loaded if message.attachment is not None else None
        body = message.body
        if isinstance(loaded, LoadedText):
            assert message.attachment is not None
            body = f"{body}\n\n--- {message.attachment.name} ---\n{loaded.text}"
        image = loaded if isinstance(loaded, LoadedImage) else None
        turns = self.build_turns(body, context, system_prompt=overrides.system_prompt)
        typing = True
        await sink.typing(True)

        async def on_partial(text: str) -> None:
            nonlocal typing
            if typing:
                typing = False
                await sink.typing(False)
            await sink.partial(text)

        try:
            answer = await self.complete(
                turns,
                model=overrides.model,
                on_partial=on_partial if self.settings.stream else None,
                image=image,
            )
        except BackendError:
            if typing:
                await sink.typing(False)
            raise
        if typing:
            await sink.typing(False)
        return answer

    # -- the work ----------------------------------------------------------------------

    def build_turns(
        self, body: str, context: list[Turn], *, system_prompt: str | None = None
    ) -> list[Turn]:
        """System prompt + ``context`` + the new user message, trimmed to the budget."""
        prompt = self.settings.system_prompt if system_prompt is None else system_prompt
        turns = [Turn("system", prompt)] if prompt.strip() else []
        turns.extend(context)
        turns.append(Turn("user", body))
        return trim_context(turns, self.settings.context_budget_chars)

    def payload(
        self, turns: list[Turn], *, model: str | None = None, image: LoadedImage | None = None
    ) -> dict[str, Any]:
        """The request body for ``turns`` (built once; every attempt sends the same).

        ``image`` goes with the last user turn as an ``image_url`` part (a base64
        ``data:`` URL; the chat-completions vision format), after its text.
        """
        messages: list[dict[str, Any]] = [turn.as_json() for turn in turns]
        if image is not None:
            last = max(i for i, turn in enumerate(turns) if turn.role == "user")
            messages[last] = {
                "role": "user",
                "content": [
                    {"type": "text", "text": turns[last].content},
                    {"type": "image_url", "image_url": {"url": image.data_url()}},
                ],
            }
        body: dict[str, Any] = {
            "model": model or self.settings.model,
            "messages": messages,
            "stream": self.settings.stream,
        }
        if self.settings.temperature is not None:
            body["temperature"] = self.settings.temperature
        if self.settings.max_tokens is not None:
            body["max_tokens"] = self.settings.max_tokens
        return body

    def _encoded_payload(
        self, turns: list[Turn], model: str | None, image: LoadedImage
    ) -> tuple[dict[str, Any], bytes]:
        """`payload` and its JSON as httpx would encode it (run in a worker thread)."""
        body = self.payload(turns, model=model, image=image)
        encoded = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return body, encoded.encode("utf-8")

    async def complete(
        self,
        turns: list[Turn],
        *,
        model: str | None = None,
        on_partial: OnPartial | None = None,
        image: LoadedImage | None = None,
    ) -> str:
        """Ask for the answer to ``turns`` as they are (no trimming here); ``image``
        goes with the last user turn (`payload`).

        With ``stream`` on, ``on_partial(text_so_far)`` is awaited as tokens arrive
        (given None, the stream is still read, just not reported). Retries what
        `ModelError.retryable` allows, as ``backoff`` allows. Raises `ModelError`.
        """
        encoded: bytes | None = None
        if image is None:
            body = self.payload(turns, model=model)
        else:
            # Base64 and JSON of a 10 MiB image take 0.1-0.2 s of CPU (measured on the
            # shared test machine): in a worker thread, once, not on the trio thread
            # per attempt.
            body, encoded = await trio.to_thread.run_sync(
                self._encoded_payload, turns, model, image
            )
        model_name = body["model"]
        started = time.monotonic()
        log.info(
            "model_request",
            model=model_name,
            stream=self.settings.stream,
            turns=len(turns),
            chars=sum(len(t.content) for t in turns),
            image_bytes=len(image.data) if image is not None else 0,
        )
        attempt = 0
        while True:
            progress = _Progress()
            try:
                await self._attempt(body, model_name, progress, on_partial, encoded)
            except ModelError as exc:
                delay = (
                    self.backoff.delay(attempt, retry_after=exc.retry_after)
                    if exc.retryable
                    else None
                )
                if delay is None:
                    self._log_failure(exc, model_name, attempt, started)
                    raise self._final_error(exc) from exc.__cause__
                log.warning(
                    "model_request_retry",
                    model=model_name,
                    kind=exc.kind,
                    status=exc.status,
                    attempt=attempt + 1,
                    delay_s=round(delay, 3),
                    error=str(exc),
                )
                await trio.sleep(delay)
                attempt += 1
                continue
            now = time.monotonic()
            log.info(
                "model_answer",
                model=model_name,
                chars=len(progress.text),
                chunks=progress.chunks,
                finish_reason=progress.finish_reason,
                attempts=attempt + 1,
                first_token_s=(
                    round(progress.first_token_at - started, 3)
                    if progress.first_token_at is not None
                    else None
                ),
                total_s=round(now - started, 3),
            )
            if progress.finish_reason == "length":
                log.warning(
                    "model_answer_truncated", model=model_name, max_tokens=body.get("max_tokens")
                )
            if progress.cut is not None:
                log.warning("model_answer_cut", model=model_name, reason=progress.cut)
                return with_note(progress.text, progress.cut)
            return progress.text

    async def _attempt(
        self,
        body: dict[str, Any],
        model_name: str,
        progress: _Progress,
        on_partial: OnPartial | None,
        encoded: bytes | None = None,
    ) -> None:
        """One request; ``encoded`` is ``body`` already encoded (`_encoded_payload`)."""
        headers = {
            "Accept": "text/event-stream" if body["stream"] else "application/json",
            # Inflated by the transport in bounded steps, under the byte limit (http_backend.py).
            "Accept-Encoding": "gzip, deflate",
        }
        if encoded is not None:
            headers["Content-Type"] = "application/json"
        if self.settings.api_key is not None:
            headers["Authorization"] = f"Bearer {self.settings.api_key}"
        url = self.settings.completions_url
        try:
            async with self._http.stream(
                "POST",
                url,
                json=body if encoded is None else None,
                content=encoded,
                headers=headers,
            ) as response:
                if response.status_code >= 400:
                    excerpt = await read_prefix(response, _ERROR_BODY_BYTES)
                    raise self._status_error(response, excerpt, model_name)
                content_type = response.headers.get("content-type", "")
                if body["stream"] and content_type.startswith("text/event-stream"):
                    await self._read_stream(response, progress, on_partial)
                else:
                    # Not streamed (asked so, or the server ignored ``stream``).
                    async with open_body(response, self.settings.max_response_bytes) as whole:
                        raw = await whole.read_all()
                    self._read_whole(raw, progress)
                    if on_partial is not None and progress.text:
                        await on_partial(progress.text)
        except UnreadableEncoding as exc:
            raise self._malformed(f"the answer from {url} cannot be read: {exc}", progress) from exc
        except ReadLimitError as exc:
            # Nothing of the answer could be read within the limits (a stream that had
            # text by then was cut in `_read_stream` and is not an error).
            raise ModelError(
                f"the answer from {url} cannot be read within the limits: {exc}",
                kind="too_large",
                user_message=(
                    "The assistant's server sent an answer too large for the bot to read "
                    f"({_limit_words(exc)})."
                ),
                partial=progress.text,
            ) from exc
        except ResponseTooLarge as exc:
            # Refused by the transport before the body (a head, or a Content-Length, over
            # a limit; while reading, `bounded_read` makes it a ReadLimitError): the
            # server answered, and asking again gets the same answer. Not retried.
            raise ModelError(
                f"the answer from {url} is over a limit ({exc.limit}): {exc}",
                kind="too_large",
                user_message=(
                    "The assistant's server sent an answer too large for the bot to read "
                    f"({self._head_limit_words(exc.limit)})."
                ),
                partial=progress.text,
            ) from exc
        except httpx.TimeoutException as exc:
            phase = "connecting" if isinstance(exc, httpx.ConnectTimeout) else "waiting"
            kind: ErrorKind = "network" if isinstance(exc, httpx.ConnectTimeout) else "timeout"
            raise ModelError(
                f"no answer from {url} after {self.settings.request_timeout_s:g}s "
                f"({phase}; {type(exc).__name__})",
                kind="cut" if progress.text else kind,
                user_message=(
                    "The assistant stopped answering part-way; the answer is incomplete."
                    if progress.text
                    else "The assistant took too long to answer. Please try again."
                ),
                partial=progress.text,
            ) from exc
        except (httpx.TransportError, httpx.DecodingError) as exc:
            if progress.text or progress.chunks:
                raise ModelError(
                    f"the stream from {url} broke after {progress.chunks} chunks: "
                    f"{type(exc).__name__}: {self._scrub(str(exc))}",
                    kind="cut",
                    user_message="The assistant's answer was cut off. Please try again.",
                    partial=progress.text,
                ) from exc
            if isinstance(exc, httpx.DecodingError):
                # Two content codings, or one the bot does not read: an answer, not a
                # network failure, and not retried.
                raise self._malformed(
                    f"the answer from {url} cannot be decoded: {exc}", progress
                ) from exc
            raise ModelError(
                f"could not reach {url}: {type(exc).__name__}: {self._scrub(str(exc))}",
                kind="network",
                user_message="The assistant cannot be reached right now. Please try again later.",
            ) from exc

    async def _read_stream(
        self, response: httpx.Response, progress: _Progress, on_partial: OnPartial | None
    ) -> None:
        limit = self.settings.max_line_bytes
        lines = LineSplitter(limit)
        parser = SSEParser(max_event_chars=limit)
        error: ModelError | None = None
        async with open_body(response, self.settings.max_response_bytes) as stream:
            try:
                while error is None and not progress.done and progress.cut is None:
                    chunk = await stream.next_chunk()
                    ended = chunk is None
                    if chunk is None:
                        last = lines.flush()
                        found = [] if last is None else [last]
                    else:
                        found = lines.feed(chunk)
                    for line in found:
                        data = parser.feed(line.decode("utf-8", errors="replace"))
                        if data is not None:
                            error = await self._take_event_or_error(data, progress, on_partial)
                        if error is not None or progress.done or progress.cut is not None:
                            break
                    if ended:
                        data = parser.flush()
                        done = progress.done or progress.cut is not None
                        if data is not None and error is None and not done:
                            error = await self._take_event_or_error(data, progress, on_partial)
                        break
            except ReadLimitError as exc:
                if not progress.text:
                    raise
                progress.cut = _cut_note(exc)
            if progress.done:
                # The answer is over: let the server end its body, then reuse the
                # connection; a server that keeps sending is cut off after _DRAIN_S.
                await stream.settle(_DRAIN_S)
        if error is not None:
            raise error
        if progress.cut is not None:
            return
        if not progress.done and progress.finish_reason is None:
            raise ModelError(
                f"the stream ended without [DONE] after {progress.chunks} chunks",
                kind="cut",
                user_message="The assistant's answer was cut off. Please try again.",
                partial=progress.text,
            )
        if not progress.text:
            raise self._empty_error(progress)

    async def _take_event_or_error(
        self, data: str, progress: _Progress, on_partial: OnPartial | None
    ) -> ModelError | None:
        try:
            await self._take_event(data, progress, on_partial)
        except ModelError as exc:
            return exc
        return None

    async def _take_event(
        self, data: str, progress: _Progress, on_partial: OnPartial | None
    ) -> None:
        """Apply one event (``[DONE]`` sets ``progress.done``); raises `ModelError`."""
        if data.strip() == "[DONE]":
            progress.done = True
            return
        try:
            chunk = json.loads(data)
        except ValueError as exc:
            raise self._malformed(f"a stream chunk is not JSON: {exc}", progress) from exc
        if not isinstance(chunk, dict):
            raise self._malformed("a stream chunk is not a JSON object", progress)
        if "error" in chunk:
            raise ModelError(
                f"the server reported an error mid-stream: {self._error_text(chunk)}",
                kind="cut" if progress.text else "server",
                user_message="The assistant ran into an error while answering. Please try again.",
                partial=progress.text,
            )
        progress.chunks += 1
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            raise self._malformed("a stream chunk has no choices list", progress)
        if not choices:
            return  # a usage-only chunk
        choice = choices[0]
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict):
            raise self._malformed("a stream chunk's choice has no delta object", progress)
        content = delta.get("content")
        if content is not None and not isinstance(content, str):
            raise self._malformed("a stream chunk's content is not a string", progress)
        reason = choice.get("finish_reason")
        if isinstance(reason, str):
            progress.finish_reason = reason
        if content:
            if progress.first_token_at is None:
                progress.first_token_at = time.monotonic()
            progress.text += content
            self._keep_within(progress)
            if on_partial is not None:
                await on_partial(progress.text)

    def _keep_within(self, progress: _Progress) -> None:
        """Cut ``progress.text`` at ``max_answer_chars``, noting why."""
        limit = self.settings.max_answer_chars
        if len(progress.text) > limit:
            progress.text = progress.text[:limit]
            progress.cut = cut_note(f"longer than {limit} characters")

    def _read_whole(self, raw: bytes, progress: _Progress) -> None:
        try:
            document = json.loads(raw)
        except ValueError as exc:
            raise self._malformed(f"the answer is not JSON: {exc}", progress) from exc
        try:
            choice = document["choices"][0]
            content = choice["message"].get("content")
            reason = choice.get("finish_reason")
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise self._malformed(
                f"the answer has no choices[0].message: {exc!r}", progress
            ) from exc
        if content is not None and not isinstance(content, str):
            raise self._malformed("the answer's content is not a string", progress)
        progress.chunks = 1
        progress.first_token_at = time.monotonic()
        progress.finish_reason = reason if isinstance(reason, str) else None
        progress.done = True
        progress.text = content or ""
        if not progress.text:
            raise self._empty_error(progress)
        self._keep_within(progress)

    # -- errors --------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        """``text`` without the API key in it (servers echo keys in their 401 messages)."""
        key = self.settings.api_key
        if key:
            text = text.replace(key, "[api key]")
        # Servers echo a masked key ("sk-proj-ab****wxyz"): its ends are still the key's.
        return _MASKED.sub("[masked key]", text)

    def _error_text(self, document: Any) -> str:
        error = document.get("error") if isinstance(document, dict) else None
        if isinstance(error, dict):
            message = error.get("message")
            text = message if isinstance(message, str) else json.dumps(error)
        elif isinstance(error, str):
            text = error
        else:
            text = json.dumps(document)
        return self._scrub(text[:_EXCERPT])

    def _status_error(
        self, response: httpx.Response, excerpt: bytes, model_name: str
    ) -> ModelError:
        status = response.status_code
        try:
            detail = self._error_text(json.loads(excerpt))
        except ValueError:
            detail = self._scrub(excerpt[:_EXCERPT].decode("utf-8", errors="replace"))
        what = f"HTTP {status} from the model server: {detail}"
        if status in (401, 403):
            return ModelError(
                what,
                kind="auth",
                status=status,
                user_message=(
                    "The assistant's server refused the bot's API key. "
                    "Please tell the bot's operator."
                ),
            )
        if status == 404:
            return ModelError(
                what,
                kind="not_found",
                status=status,
                user_message=f"The assistant's server does not know the model “{model_name}”.",
            )
        if status == 429:
            return ModelError(
                what,
                kind="rate_limited",
                status=status,
                retry_after=retry_after_from(response.headers),
                user_message="The assistant is busy right now (rate-limited).",
            )
        if status >= 500:
            return ModelError(
                what,
                kind="server",
                status=status,
                retry_after=retry_after_from(response.headers) if status == 503 else None,
                user_message=(
                    f"The assistant's server is having trouble (HTTP {status}). "
                    "Please try again later."
                ),
            )
        return ModelError(
            what,
            kind="bad_request",
            status=status,
            user_message=f"The assistant's server rejected the request (HTTP {status}).",
        )

    def _head_limit_words(self, limit: str) -> str:
        """What a `ResponseTooLarge` raised before the body says, for the user."""
        if limit == "max_body_bytes":
            return f"more than {self.settings.max_response_bytes} bytes"
        return _HEAD_LIMIT_WORDS.get(limit, limit)

    def _malformed(self, what: str, progress: _Progress) -> ModelError:
        return ModelError(
            self._scrub(what),
            kind="malformed",
            user_message="The assistant's server sent an answer the bot cannot read.",
            partial=progress.text,
        )

    def _empty_error(self, progress: _Progress) -> ModelError:
        return ModelError(
            f"the answer is empty (finish_reason={progress.finish_reason!r})",
            kind="empty",
            user_message="The assistant gave an empty answer. Please try rephrasing.",
        )

    def _final_error(self, exc: ModelError) -> ModelError:
        """The error to raise after the last attempt: a rate limit says how long to wait."""
        if exc.kind != "rate_limited":
            return exc
        wait = exc.retry_after
        user_message = (
            f"The assistant is busy right now (rate-limited). Please try again in about "
            f"{max(1, math.ceil(wait))} s."
            if wait is not None
            else "The assistant is busy right now (rate-limited). Please try again shortly."
        )
        return ModelError(
            str(exc),
            kind=exc.kind,
            status=exc.status,
            retry_after=wait,
            user_message=user_message,
        )

    def _log_failure(self, exc: ModelError, model_name: str, attempt: int, started: float) -> None:
        log.warning(
            "model_request_failed",
            model=model_name,
            kind=exc.kind,
            status=exc.status,
            retry_after_s=exc.retry_after,
            attempts=attempt + 1,
            partial_chars=len(exc.partial),
            elapsed_s=round(time.monotonic() - started, 3),
            error=str(exc),
        )


def _cut_note(exc: ReadLimitError) -> str:
    """The note ending an answer that a read limit cut short."""
    if isinstance(exc, LineTooLong):
        return cut_note(f"a line of the server's answer was longer than {exc.limit} bytes")
    if isinstance(exc, BodyTooLarge):
        return cut_note(f"the server sent more than {exc.limit} bytes")
    return cut_note(str(exc))


def _limit_words(exc: ReadLimitError) -> str:
    if isinstance(exc, LineTooLong):
        return f"a line longer than {exc.limit} bytes"
    return f"more than {exc.limit} bytes"
