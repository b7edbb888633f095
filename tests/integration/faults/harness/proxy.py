"""`FaultProxy`: a small HTTP/1.1 proxy on 127.0.0.1 in front of Synapse, written with
trio, with its own request reader. It records every exchange with its timing
(`Exchange`) and, when armed with a `Fault`, spoils selected answers: truncated JSON,
wrong types, malformed events, slow answers, resets mid-answer, HTML 502 pages, a 429
in the homeserver's place, or a rewrite of the body (the rewriters are here too).
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import struct
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import httpx
import trio

from faults.harness.tasks import background

FaultKind = Literal[
    "truncate", "wrong_types", "bad_events", "slow", "reset", "html_502", "rewrite", "limit"
]
FAULT_KINDS: tuple[FaultKind, ...] = (
    "truncate",
    "wrong_types",
    "bad_events",
    "slow",
    "reset",
    "html_502",
)

_HTML_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host"}
)
_NOT_FORWARDED = _HOP_BY_HOP | {"accept-encoding"}


@dataclass
class Fault:
    """One way to spoil the answers to matching requests.

    ``path`` is a regular expression searched in the request path; ``when`` (if
    given) looks at the decoded upstream answer and says whether to spoil this one.
    ``times`` answers are spoiled (None: until disarmed). A ``limit`` fault answers
    429 (``M_LIMIT_EXCEEDED``, ``Retry-After: retry_after_s``) in the homeserver's
    place: the request is not forwarded, as a real rate limit would refuse it.
    """

    kind: FaultKind
    method: str = "GET"
    path: str = r"/sync$"
    when: Callable[[Any], bool] | None = None
    times: int | None = 1
    delay_s: float = 3.0
    rewrite: Callable[[bytes], bytes] | None = None
    retry_after_s: int = 3
    applied: int = 0

    def wants(self, method: str, path: str) -> bool:
        return (
            (self.times is None or self.applied < self.times)
            and method == self.method
            and re.search(self.path, path) is not None
        )


@dataclass(frozen=True)
class Exchange:
    """One request through the proxy, on trio's clock."""

    method: str
    path: str
    received: float
    answered: float
    status: int | None  # None: the connection was dropped
    retry_after_header: float | None
    retry_after_ms: int | None
    fault: str | None

    @property
    def retry_after(self) -> float | None:
        """What the client must wait: the header when there is one (it wins), else the body."""
        if self.retry_after_header is not None:
            return self.retry_after_header
        return self.retry_after_ms / 1000 if self.retry_after_ms is not None else None


@dataclass(frozen=True)
class _Request:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def wants_close(self) -> bool:
        return any(k.lower() == "connection" and v.lower() == "close" for k, v in self.headers)


class _RequestReader:
    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def _fill(self) -> bool:
        try:
            data = await self._stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        self._buffer += data
        return bool(data)

    async def next(self) -> _Request | None:
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            if len(self._buffer) > 65536 or not await self._fill():
                return None
        head = bytes(self._buffer[:end]).decode("latin-1")
        del self._buffer[: end + 4]
        request_line, *lines = head.split("\r\n")
        method, target, _ = request_line.split(" ", 2)
        headers = [(n.strip(), v.strip()) for n, _, v in (line.partition(":") for line in lines)]
        length = int(next((v for k, v in headers if k.lower() == "content-length"), "0"))
        while len(self._buffer) < length:
            if not await self._fill():
                return None
        body = bytes(self._buffer[:length])
        del self._buffer[:length]
        return _Request(method, target, headers, body)


def _head(status: int, reason: str, headers: Iterable[tuple[str, str]], length: int) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _reset(stream: trio.SocketStream) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashing peer does."""
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def timeline_events(doc: Any) -> Iterator[dict[str, Any]]:
    """The events of a decoded /sync answer's joined timelines, or of a /messages
    page (answers of the homeserver, before any fault: well-formed)."""
    if not isinstance(doc, dict):
        return
    events = [
        event
        for room in doc.get("rooms", {}).get("join", {}).values()
        for event in room.get("timeline", {}).get("events", [])
    ]
    events.extend(doc.get("chunk", []))
    yield from (event for event in events if isinstance(event, dict))


def _has_body(event: dict[str, Any], body: str) -> bool:
    content = event.get("content")
    return isinstance(content, dict) and content.get("body") == body


def carries_body(body: str) -> Callable[[Any], bool]:
    """A `Fault.when`: the answer carries the message whose body is ``body``."""
    return lambda doc: any(_has_body(event, body) for event in timeline_events(doc))


def carries_timeline(doc: Any) -> bool:
    """A /sync answer with at least one timeline event in a joined room."""
    if not isinstance(doc, dict):
        return False
    joined = doc.get("rooms", {}).get("join", {})
    return any(room.get("timeline", {}).get("events") for room in joined.values())


def _with_bad_events(body: bytes) -> bytes:
    """Malformed and wrongly typed events among the good ones, and a room that is a list."""
    doc = json.loads(body)
    for room in doc.get("rooms", {}).get("join", {}).values():
        events = room.get("timeline", {}).get("events")
        if not events:
            continue
        sender = events[0].get("sender", "@someone:localhost")
        events.insert(
            len(events) // 2,
            {
                "type": "m.room.message",
                "event_id": "$fault-content-is-a-string",
                "sender": sender,
                "origin_server_ts": 1,
                "content": "<b>not an object</b>",
            },
        )
        events.insert(
            0,
            {
                "type": "m.room.message",
                "event_id": "$fault-wrong-types",
                "sender": sender,
                "origin_server_ts": "yesterday",
                "content": {"msgtype": "m.text", "body": ["not", "a", "string"]},
            },
        )
        events.append({"no": "type, no id, nothing"})
        break
    doc.setdefault("rooms", {}).setdefault("join", {})["!fault-room:localhost"] = ["a list"]
    return json.dumps(doc).encode()


def _wrong_types(body: bytes) -> bytes:
    del body
    return json.dumps({"next_batch": 42, "rooms": ["not", "an", "object"]}).encode()


class FaultProxy:
    """HTTP/1.1 on 127.0.0.1 in front of one homeserver; open with `open_fault_proxy`.

    Requests are forwarded whole (the bot's keep-alive connections are kept), each
    exchange is recorded in `exchanges`, and armed `Fault`\\ s spoil the answers they
    match. The proxy keeps no header values: tokens never reach its records.
    """

    def __init__(self, upstream: str, http: httpx.AsyncClient) -> None:
        self.upstream = upstream.rstrip("/")
        self.url = ""
        self.exchanges: list[Exchange] = []
        self.faults: list[Fault] = []
        self._in_flight: Counter[tuple[str, str]] = Counter()
        self._http = http
        self._moved = trio.Event()
        self.delivered: set[str] = set()
        """Event ids the proxy has seen in /sync answers (before any fault spoiled them)."""
        self.targets: list[str] = []
        """Every request line's target (path and query), to scan for secrets."""

    def arm(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    def disarm(self, fault: Fault) -> None:
        with contextlib.suppress(ValueError):
            self.faults.remove(fault)

    def in_flight(self, method: str, path: str) -> int:
        """Requests being answered right now whose path matches ``path`` (a regex)."""
        return sum(n for (m, p), n in self._in_flight.items() if m == method and re.search(path, p))

    async def wait_until(self, condition: Callable[[], bool], *, timeout: float = 60.0) -> None:
        """Wait until ``condition()`` holds; it is checked whenever traffic moves."""
        with trio.fail_after(timeout):
            while not condition():
                await self._moved.wait()

    async def wait_applied(self, fault: Fault, count: int = 1, *, timeout: float = 60.0) -> None:
        await self.wait_until(lambda: fault.applied >= count, timeout=timeout)

    def _notify(self) -> None:
        self._moved.set()
        self._moved = trio.Event()

    def _note_delivered(self, body: bytes) -> None:
        for event in timeline_events(_json_or_none(body)):
            if isinstance(event.get("event_id"), str):
                self.delivered.add(event["event_id"])

    def _pick(self, method: str, path: str, body: bytes) -> Fault | None:
        doc: Any = None
        parsed = False
        for fault in self.faults:
            if fault.kind == "limit" or not fault.wants(method, path):
                continue
            if fault.when is not None:
                if not parsed:
                    doc, parsed = _json_or_none(body), True
                if not fault.when(doc):
                    continue
            fault.applied += 1
            self._notify()
            return fault
        return None

    async def handle(self, stream: trio.SocketStream) -> None:
        reader = _RequestReader(stream)
        try:
            while True:
                request = await reader.next()
                if request is None or not await self._exchange(stream, request):
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the client went away (killed, or cancelled its request)
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _exchange(self, stream: trio.SocketStream, request: _Request) -> bool:
        """Answer one request; False when the connection must not be used again."""
        path = request.target.partition("?")[0]
        self.targets.append(request.target)
        received = trio.current_time()
        key = (request.method, path)
        self._in_flight[key] += 1
        self._notify()
        try:
            limit = next(
                (f for f in self.faults if f.kind == "limit" and f.wants(request.method, path)),
                None,
            )
            if limit is not None:
                limit.applied += 1
                self._notify()
                body = json.dumps(
                    {
                        "errcode": "M_LIMIT_EXCEEDED",
                        "error": "Too Many Requests",
                        "retry_after_ms": limit.retry_after_s * 1000,
                    }
                ).encode()
                headers = [
                    ("Content-Type", "application/json"),
                    ("Retry-After", str(limit.retry_after_s)),
                ]
                await stream.send_all(_head(429, "Too Many Requests", headers, len(body)) + body)
                self._record(request.method, path, received, 429, headers, body, "limit")
                return not request.wants_close
            try:
                upstream = await self._http.request(
                    request.method,
                    self.upstream + request.target,
                    headers=[(k, v) for k, v in request.headers if k.lower() not in _NOT_FORWARDED],
                    content=request.body,
                )
            except httpx.TransportError:
                self._record(request.method, path, received, None, [], b"", "upstream_down")
                await _reset(stream)
                return False
            status, reason = upstream.status_code, upstream.reason_phrase
            headers = [(k, v) for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP]
            body = upstream.content
            if status == 200 and path.endswith("/sync"):
                self._note_delivered(body)
            fault = self._pick(request.method, path, body)
            kind = fault.kind if fault is not None else None
            if fault is not None:
                if fault.kind == "slow":
                    await trio.sleep(fault.delay_s)
                elif fault.kind == "truncate":
                    body = body[: len(body) // 2]
                elif fault.kind == "wrong_types":
                    body = _wrong_types(body)
                elif fault.kind == "bad_events":
                    body = _with_bad_events(body)
                elif fault.kind == "rewrite" and fault.rewrite is not None:
                    body = fault.rewrite(body)
                elif fault.kind == "html_502":
                    status, reason, body = 502, "Bad Gateway", _HTML_502
                    headers = [("Content-Type", "text/html"), ("Server", "nginx")]
                elif fault.kind == "reset":
                    await stream.send_all(_head(status, reason, headers, len(body)))
                    await stream.send_all(body[: len(body) // 2])
                    self._record(request.method, path, received, None, headers, body, kind)
                    await _reset(stream)
                    return False
            await stream.send_all(_head(status, reason, headers, len(body)) + body)
            self._record(request.method, path, received, status, headers, body, kind)
            return not request.wants_close
        finally:
            self._in_flight[key] -= 1
            self._notify()

    def _record(
        self,
        method: str,
        path: str,
        received: float,
        status: int | None,
        headers: list[tuple[str, str]],
        body: bytes,
        fault: str | None,
    ) -> None:
        header = next((v for k, v in headers if k.lower() == "retry-after"), None)
        retry_ms = None
        if status == 429:
            doc = _json_or_none(body)
            if isinstance(doc, dict) and isinstance(doc.get("retry_after_ms"), int):
                retry_ms = doc["retry_after_ms"]
        self.exchanges.append(
            Exchange(
                method,
                path,
                received,
                trio.current_time(),
                status,
                float(header) if header is not None and header.isdigit() else None,
                retry_ms,
                fault,
            )
        )


@asynccontextmanager
async def open_fault_proxy(upstream: str) -> AsyncIterator[FaultProxy]:
    """A `FaultProxy` listening on 127.0.0.1 for the body of the block."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), follow_redirects=False) as http:
        proxy = FaultProxy(upstream, http)
        async with background() as nursery:
            listeners = await nursery.start(
                partial(trio.serve_tcp, proxy.handle, 0, host="127.0.0.1")
            )
            port = listeners[0].socket.getsockname()[1]
            proxy.url = f"http://127.0.0.1:{port}"
            yield proxy


def lone_surrogate_rewrite(marker: str) -> Callable[[bytes], bytes]:
    """Put a lone surrogate escape (``\\ud800``) into the body of the message ``marker``."""
    needle = marker.encode()

    def rewrite(body: bytes) -> bytes:
        return body.replace(needle, needle + rb" \ud800 lone")

    return rewrite


def content_rewrite(marker: str, content: bytes) -> Callable[[bytes], bytes]:
    """Give the message whose body is ``marker`` the raw JSON ``content`` instead of its
    own. ``content`` goes in as bytes, unparsed: it may nest deeper than any parser
    here (or in the bot) would read."""
    placeholder = f"fault-content-{uuid.uuid4().hex}"

    def rewrite(body: bytes) -> bytes:
        doc = _json_or_none(body)
        found = [event for event in timeline_events(doc) if _has_body(event, marker)]
        if not found:
            return body
        for event in found:
            event["content"] = placeholder
        return json.dumps(doc).encode().replace(json.dumps(placeholder).encode(), content)

    return rewrite
