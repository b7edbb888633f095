"""The one place requests meet the network.

`HTTPCore` turns a `Request` into an `httpx.Request`, adds the bearer token, sends it
through its one `httpx.AsyncClient`, maps every failure onto the `matrix_api.errors`
tree (here, once), and retries what the `RetryPolicy` allows. Endpoint mixins
(`matrix_api.endpoints`) only build `Request` values and name the decoder for the
answer; they never touch httpx.

The transport is httpx's seam (``transport=``): `H11Transport` by default (HTTP/1.1
framed by h11 on trio, inside `ResponseLimits`), `httpx.MockTransport` in tests; both
receive the same `httpx.Request` values through the same client. Requests are built
here with their headers, timeouts and limits and handed to `httpx.AsyncClient.send`,
so the client merges nothing per request; it follows no redirects (a 3xx is an
error), reads no proxy settings from the environment, and keeps no cookies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Self, TypeVar
from urllib.parse import quote

import httpx
import msgspec
import structlog
import trio

from .errors import (
    BadResponse,
    InvalidRequest,
    MatrixAPIError,
    MatrixError,
    MissingToken,
    NetworkError,
    ResponseLimitExceeded,
)
from .h11_transport import LIMITS_EXTENSION, H11Transport, ResponseLimitError, ResponseLimits
from .models.identifiers import UserID
from .retry import RetryPolicy
from .server_clock import ServerClock, find_header, seconds_until

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_TIMEOUT",
    "LARGE_ANSWER_LIMITS",
    "HTTPCore",
    "Request",
    "RequestObserver",
    "decode_json_object",
    "ignore_body",
]

log = structlog.get_logger("matrix_api")

T = TypeVar("T")
Method = Literal["GET", "POST", "PUT", "DELETE"]

# httpx's own default (5 s for everything) is too short for a homeserver under load;
# a long-poll /sync raises the read timeout above its own ``timeout`` per request.
DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=30.0, write=30.0, pool=10.0)

_MiB = 1024 * 1024
DEFAULT_LIMITS = ResponseLimits(
    max_body_bytes=16 * _MiB, max_decoded_bytes=16 * _MiB, total_timeout_s=120.0
)
"""What any answer may cost: a page of events, a room's members, an error."""
LARGE_ANSWER_LIMITS = ResponseLimits(
    max_body_bytes=64 * _MiB, max_decoded_bytes=64 * _MiB, total_timeout_s=300.0
)
"""For answers that grow with the account: a /sync (an initial full-state one
above all), a big room's whole state."""
_EXCERPT = 200


@dataclass(frozen=True, slots=True)
class Request:
    """A request ready to send: nothing in it is resolved at send time.

    ``idempotent`` tells the retry policy whether sending it twice is harmless; it
    defaults to True for GET, PUT and DELETE (PUTs carry their transaction id or
    replace a whole value) and False for POST.
    """

    method: Method
    path: str
    # A sequence value repeats the parameter (``?via=a&via=b``).
    query: Mapping[str, str | Sequence[str]] = field(default_factory=dict)
    body: Mapping[str, Any] | None = None
    authenticated: bool = True
    idempotent: bool | None = None
    read_timeout: float | None = None
    # None: the transport's own (`DEFAULT_LIMITS` unless the client was given others).
    limits: ResponseLimits | None = None

    @property
    def is_idempotent(self) -> bool:
        if self.idempotent is not None:
            return self.idempotent
        return self.method != "POST"

    def encoded_body(self) -> bytes | None:
        # The spec wants a JSON object on every POST/PUT, "{}" when there is nothing to say.
        if self.body is not None:
            return msgspec.json.encode(self.body)
        if self.method in ("POST", "PUT"):
            return b"{}"
        return None


_object_decoder = msgspec.json.Decoder(dict[str, Any])


def decode_json_object(body: bytes) -> dict[str, Any]:
    """The decoder for endpoints whose answer is an arbitrary JSON object."""
    return _object_decoder.decode(body)


def ignore_body(body: bytes) -> None:
    """The decoder for endpoints answering ``{}``: any JSON object will do."""
    _object_decoder.decode(body)


class RequestObserver(Protocol):
    """Told of what `HTTPCore` sends, for whoever counts (the caller's metrics).

    Called on the trio thread in the request's own task: an observer must be cheap and
    must not raise. ``request.path`` holds identifiers (room ids, user ids): an observer
    that keeps anything per path must map it to a bounded template first.
    """

    def answered(self, request: Request, status: int | None) -> None:
        """One attempt ended: the HTTP ``status`` of the answer, or None when no
        (complete) answer came."""

    def retry_wait(self, request: Request, error: MatrixAPIError, delay_s: float) -> None:
        """The attempt that failed with ``error`` is sent again after ``delay_s``."""


def _timeout_extension(timeout: httpx.Timeout) -> dict[str, float | None]:
    """The ``timeout`` request extension httpx transports read."""
    return {
        "connect": timeout.connect,
        "read": timeout.read,
        "write": timeout.write,
        "pool": timeout.pool,
    }


def _encode_query(query: Mapping[str, str | Sequence[str]]) -> str:
    """``a=1&b=x&b=y``, every key and value percent-encoded (filters are JSON)."""
    pairs = []
    for key, value in query.items():
        for one in (value,) if isinstance(value, str) else value:
            pairs.append(f"{quote(key, safe='')}={quote(one, safe='')}")
    return "&".join(pairs)


class _NoCookies(httpx.Cookies):
    """Matrix authenticates by token: a cookie set by a server or a proxy in front
    of it is never kept, never sent back, and costs no parsing."""

    def extract_cookies(self, response: httpx.Response) -> None:
        pass


class _Client(httpx.AsyncClient):
    """httpx's client with `_NoCookies` (its ``cookies`` argument would copy any jar
    into a plain one, and parse every answer for ``Set-Cookie``)."""

    _no_cookies = _NoCookies()

    @property
    def cookies(self) -> httpx.Cookies:
        return self._no_cookies

    @cookies.setter
    def cookies(self, cookies: object) -> None:
        raise AttributeError("this client keeps no cookies")


def _parse_retry_after(value: bytes | None, answered: bytes | None) -> float | None:
    """``Retry-After`` is either delta-seconds or an HTTP date (`seconds_until`,
    measured from the answer's own ``Date``, ``answered``)."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    return seconds_until(value, answered)


class HTTPCore:
    """Sends `Request` values to one homeserver with one identity.

    The caller owns the instance and must close it (``async with`` or `aclose`).
    The access token lives only in the ``Authorization`` header of each request; it
    is never part of a URL, a log line, a repr or an error message.

    ``limits`` bound every answer whose `Request` names none, when the transport is
    the default `H11Transport`; a transport passed in keeps its own, and gets a
    `Request`'s limits as the ``response_limits`` request extension.
    """

    def __init__(
        self,
        homeserver: str,
        *,
        access_token: str | None = None,
        user_id: str | None = None,
        device_id: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        retry_policy: RetryPolicy | None = None,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        limits: ResponseLimits = DEFAULT_LIMITS,
        user_agent: str = "surfaces-bot matrix_api",
        max_connections: int = 16,
    ) -> None:
        self.homeserver = homeserver.rstrip("/")
        self.user_id = UserID(user_id) if user_id is not None else None
        self.device_id = device_id
        self.retry_policy = retry_policy or RetryPolicy()
        self._authorization: bytes | None = None
        self.set_access_token(access_token)
        self._timeouts = _timeout_extension(timeout)
        self.requests_sent = 0
        """Every attempt that went to the network, retries included (for diagnostics)."""
        self._server_clock = ServerClock()
        self.observer: RequestObserver | None = None
        """Told of every attempt and retry wait (`RequestObserver`); None: nobody."""
        url = httpx.URL(self.homeserver)
        if url.userinfo:
            # Matrix authenticates by token; credentials here would only end up in messages.
            raise MatrixAPIError("the homeserver URL must not hold credentials (user:password@)")
        if url.scheme not in ("http", "https") or not url.host:
            raise MatrixAPIError(f"not an http(s) homeserver URL: {self.homeserver!r}")
        if url.query or url.fragment:
            raise MatrixAPIError(f"the homeserver URL must not have a query: {self.homeserver!r}")
        # A homeserver behind a path prefix (``https://example.org/matrix``) keeps it.
        self._base = self.homeserver
        # Built once: the same on every request.
        self._fixed_headers = [
            (b"User-Agent", user_agent.encode()),
            (b"Accept", b"application/json"),
        ]
        # Only a GET asks for compression: what it reads (a /sync above all) can be
        # large, while the answer to a write is a few bytes, which the server would
        # compress and we would inflate for nothing, on every message sent.
        self._get_headers = [*self._fixed_headers, (b"Accept-Encoding", b"gzip, deflate")]
        self._http = _Client(
            transport=(
                transport
                if transport is not None
                else H11Transport(limits=limits, max_connections=max_connections)
            ),
            timeout=timeout,
            follow_redirects=False,
            # Proxies from the environment would be served by httpx's own transport,
            # outside these limits; netrc credentials have no place in Matrix.
            trust_env=False,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(homeserver={self.homeserver!r}, user_id={self.user_id!r}, "
            f"device_id={self.device_id!r})"
        )

    @property
    def has_access_token(self) -> bool:
        return self._authorization is not None

    def set_access_token(self, token: str | None) -> None:
        """Use ``token`` for the requests that follow (None after a logout)."""
        self._authorization = b"Bearer " + token.encode() if token is not None else None

    def require_user_id(self) -> UserID:
        """The user this client acts as; known after `login_password` or `whoami`."""
        if self.user_id is None:
            raise MatrixAPIError("the user id is not known yet: call whoami() or log in first")
        return self.user_id

    def server_time_ms(self) -> int | None:
        """The homeserver's clock now, in milliseconds since the epoch, or None when
        no answer yet carried a readable ``Date`` header.

        This machine's wall clock plays no part: use it to compare with events'
        ``origin_server_ts``. Never ahead of the server; at most a second behind,
        and within milliseconds once a few answers have come (`ServerClock`).
        """
        return self._server_clock.now_ms()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def send(self, request: Request, decode: Callable[[bytes], T]) -> T:
        """Send ``request`` (retrying as the policy allows) and decode its answer.

        Raises a `MatrixError` subclass for a Matrix error answer, `NetworkError`
        when no answer came (`ResponseLimitExceeded` when one broke a limit),
        `BadResponse` when the answer was not the JSON the endpoint promises (or a
        redirect), and `InvalidRequest` for a request that cannot be sent. The
        request is the same value on every attempt, so a transaction id in its path
        makes a retried send idempotent.
        """
        attempt = 0
        while True:
            try:
                return await self._send_once(request, decode)
            except MatrixAPIError as exc:
                if self.observer is not None and isinstance(exc, NetworkError):
                    self.observer.answered(request, None)
                delay = self.retry_policy.delay_for(exc, attempt, idempotent=request.is_idempotent)
                if delay is None:
                    raise
                if self.observer is not None:
                    self.observer.retry_wait(request, exc, delay)
                log.warning(
                    "matrix_request_retry",
                    method=request.method,
                    path=request.path,
                    attempt=attempt + 1,
                    delay_s=round(delay, 3),
                    error=str(exc),
                )
                await trio.sleep(delay)
                attempt += 1

    def _build(self, request: Request) -> httpx.Request:
        headers = list(self._get_headers if request.method == "GET" else self._fixed_headers)
        if request.authenticated:
            if self._authorization is None:
                raise MissingToken(401, "M_MISSING_TOKEN", "this client has no access token")
            headers.append((b"Authorization", self._authorization))
        content = request.encoded_body()
        if content is not None:
            headers.append((b"Content-Type", b"application/json"))
        timeouts = self._timeouts
        if request.read_timeout is not None:
            timeouts = {**timeouts, "read": request.read_timeout}
        # Paths and queries are percent-encoded by their builders.
        url = self._base + request.path
        if request.query:
            url += "?" + _encode_query(request.query)
        extensions: dict[str, object] = {"timeout": timeouts}
        if request.limits is not None:
            extensions[LIMITS_EXTENSION] = request.limits
        return httpx.Request(
            request.method, url, headers=headers, content=content, extensions=extensions
        )

    async def _send_once(self, request: Request, decode: Callable[[bytes], T]) -> T:
        what = f"{request.method} {request.path}"
        try:
            http_request = self._build(request)
        except httpx.InvalidURL as exc:
            raise InvalidRequest(f"{what}: cannot be sent: {exc}") from exc
        self.requests_sent += 1
        try:
            response = await self._http.send(http_request)
        except ResponseLimitError as exc:
            raise ResponseLimitExceeded(
                f"{what}: answer refused ({exc.limit}): {exc}", limit=exc.limit
            ) from exc
        except (httpx.InvalidURL, httpx.LocalProtocolError, httpx.UnsupportedProtocol) as exc:
            raise InvalidRequest(f"{what}: cannot be sent: {exc}") from exc
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise NetworkError(
                f"{what}: could not connect to {self.homeserver}: {type(exc).__name__}: {exc}",
                maybe_processed=False,
            ) from exc
        except httpx.RequestError as exc:
            # Every other transport failure, and a body that does not match its
            # Content-Encoding (DecodingError): the request went out, no answer came.
            raise NetworkError(
                f"{what}: no complete answer: {type(exc).__name__}: {exc}",
                maybe_processed=True,
            ) from exc
        raw_headers = response.headers.raw
        self._server_clock.observe(raw_headers)
        body = response.content
        status = response.status_code
        if self.observer is not None:
            self.observer.answered(request, status)
        if not 200 <= status < 300:
            raise _error_from(status, raw_headers, body, what)
        try:
            return decode(body)
        except (msgspec.DecodeError, RecursionError) as exc:
            # RecursionError: JSON nested deeper than the decoder will follow.
            raise BadResponse(
                f"{what}: {status} answer is not what the endpoint promises: {exc}",
                status=status,
                body_excerpt=body[:_EXCERPT].decode("utf-8", "replace"),
            ) from exc


def _error_from(
    status: int, headers: Sequence[tuple[bytes, bytes]], content: bytes, what: str
) -> MatrixAPIError:
    """The error a non-2xx answer means: a Matrix error when its body is one."""
    try:
        body = _object_decoder.decode(content)
    except (msgspec.DecodeError, RecursionError):
        body = None
    if body is not None and isinstance(body.get("errcode"), str):
        return MatrixError.from_response(
            status,
            body,
            retry_after_header=_parse_retry_after(
                find_header(headers, b"retry-after"), find_header(headers, b"date")
            ),
        )
    if 300 <= status < 400:
        location = find_header(headers, b"location") or b"nowhere"
        return BadResponse(
            f"{what}: HTTP {status} redirect to {location[:_EXCERPT].decode('latin-1')!r},"
            " not followed",
            status=status,
            body_excerpt=content[:_EXCERPT].decode("utf-8", "replace"),
        )
    content_type = find_header(headers, b"content-type") or b"no content type"
    return BadResponse(
        f"{what}: HTTP {status} without a Matrix error body ({content_type.decode('latin-1')})",
        status=status,
        body_excerpt=content[:_EXCERPT].decode("utf-8", "replace"),
    )
