"""The errors a Matrix client-server request can end in.

Two families, told apart by whether the homeserver answered in Matrix terms:

* `MatrixError`: the server sent a standard error body (``{"errcode", "error"}``).
  Each errcode that callers act on has its own subclass, looked up in a registry by
  `MatrixError.from_response`; an errcode we do not know still raises `MatrixError`.
* `TransportError`: no usable Matrix answer at all: the connection failed, the read
  timed out, or the body was not the JSON the endpoint promises (an HTML 502 page
  from a reverse proxy, a truncated body, a wrong type).

Neither carries the access token: messages are built from the status, the errcode,
the server's own message and the request's method and path template.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

__all__ = [
    "BadJSON",
    "BadResponse",
    "Exclusive",
    "Forbidden",
    "GuestAccessForbidden",
    "InvalidParam",
    "InvalidRequest",
    "InvalidRoomState",
    "LimitExceeded",
    "MatrixAPIError",
    "MatrixError",
    "MissingParam",
    "MissingToken",
    "NetworkError",
    "NotFound",
    "NotJSON",
    "ResourceLimitExceeded",
    "ResponseLimitExceeded",
    "RoomInUse",
    "TooLarge",
    "TransportError",
    "UnknownToken",
    "Unrecognized",
    "UnsupportedRoomVersion",
    "UserDeactivated",
    "UserInUse",
]


class MatrixAPIError(Exception):
    """Base of every error `matrix_api` raises."""


class InvalidRequest(MatrixAPIError):
    """A request this client cannot send as asked (say, a URL longer than any server
    takes, from a token a server handed out); sending it again fails the same way."""


class TransportError(MatrixAPIError):
    """The request got no usable Matrix answer."""


class NetworkError(TransportError):
    """Connecting, sending or reading failed, or timed out.

    ``maybe_processed`` is False only when the request certainly never reached the
    server (the connection could not be opened), so even a non-idempotent request
    may be sent again.
    """

    def __init__(self, message: str, *, maybe_processed: bool) -> None:
        super().__init__(message)
        self.maybe_processed = maybe_processed


class ResponseLimitExceeded(NetworkError):
    """The answer broke one of the client's response limits (too large, too slow,
    inflating too far); ``limit`` names the `ResponseLimits` field. The server may
    have acted on the request, and a retry may get a better answer."""

    def __init__(self, message: str, *, limit: str) -> None:
        super().__init__(message, maybe_processed=True)
        self.limit = limit


class BadResponse(TransportError):
    """The server answered, but not with the JSON the endpoint promises."""

    def __init__(self, message: str, *, status: int, body_excerpt: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body_excerpt = body_excerpt


_REGISTRY: dict[str, type[MatrixError]] = {}
# How much of the server's own words an error's text shows: a hostile server could put
# megabytes (or a forged log line) in its "error"; `MatrixError.message` keeps it all.
MAX_SHOWN_CHARS = 300


def shown(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    """``text`` fit for an error message or a log line: escaped when not printable,
    cut to ``limit`` characters."""
    if not text.isprintable():
        text = ascii(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class MatrixError(MatrixAPIError):
    """The homeserver answered with a Matrix error body.

    Subclasses declare the errcode they stand for; `from_response` picks one, and
    an errcode without a class of its own (``M_UNKNOWN``, custom ``X_...`` codes)
    gives this base class, with ``code`` telling which it was.
    """

    errcode: ClassVar[str] = ""

    def __init__(
        self,
        status: int,
        errcode: str,
        message: str,
        body: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status} {shown(errcode, 64)}: {shown(message)}")
        self.status = status
        # An instance keeps the errcode it was built from (the base class serves many).
        self.code = errcode
        self.message = message
        self.body: Mapping[str, Any] = body or {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.errcode:
            _REGISTRY[cls.errcode] = cls

    @staticmethod
    def from_response(
        status: int,
        body: Mapping[str, Any],
        *,
        retry_after_header: float | None = None,
    ) -> MatrixError:
        """Build the most specific error for a decoded error body."""
        errcode = body.get("errcode")
        message = body.get("error")
        if not isinstance(errcode, str):
            errcode = "M_UNKNOWN"
        if not isinstance(message, str):
            message = ""
        cls = _REGISTRY.get(errcode)
        if cls is LimitExceeded:
            return LimitExceeded(
                status,
                errcode,
                message,
                body,
                retry_after=_retry_after(body, retry_after_header),
            )
        if cls is None:
            return MatrixError(status, errcode, message, body)
        return cls(status, errcode, message, body)


def _retry_after(body: Mapping[str, Any], header_seconds: float | None) -> float | None:
    # The spec (v1.10+) prefers the Retry-After header; retry_after_ms is the older field.
    if header_seconds is not None:
        return header_seconds
    ms = body.get("retry_after_ms")
    if isinstance(ms, int | float) and not isinstance(ms, bool) and ms >= 0:
        return ms / 1000
    return None


class Forbidden(MatrixError):
    errcode = "M_FORBIDDEN"


class NotFound(MatrixError):
    errcode = "M_NOT_FOUND"


class UnknownToken(MatrixError):
    """The access token is not (or no longer) valid.

    ``soft_logout`` means the device still exists: log in again with the same
    device id and keep going (transaction ids stay scoped to that device).
    """

    errcode = "M_UNKNOWN_TOKEN"

    @property
    def soft_logout(self) -> bool:
        return self.body.get("soft_logout") is True


class MissingToken(MatrixError):
    errcode = "M_MISSING_TOKEN"


class LimitExceeded(MatrixError):
    """HTTP 429: ``retry_after`` is the wait in seconds the server asked for, if any."""

    errcode = "M_LIMIT_EXCEEDED"

    def __init__(
        self,
        status: int,
        errcode: str,
        message: str,
        body: Mapping[str, Any] | None = None,
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(status, errcode, message, body)
        self.retry_after = retry_after


class Unrecognized(MatrixError):
    errcode = "M_UNRECOGNIZED"


class BadJSON(MatrixError):
    errcode = "M_BAD_JSON"


class NotJSON(MatrixError):
    errcode = "M_NOT_JSON"


class MissingParam(MatrixError):
    errcode = "M_MISSING_PARAM"


class InvalidParam(MatrixError):
    errcode = "M_INVALID_PARAM"


class TooLarge(MatrixError):
    errcode = "M_TOO_LARGE"


class UnsupportedRoomVersion(MatrixError):
    errcode = "M_UNSUPPORTED_ROOM_VERSION"


class RoomInUse(MatrixError):
    errcode = "M_ROOM_IN_USE"


class InvalidRoomState(MatrixError):
    errcode = "M_INVALID_ROOM_STATE"


class UserInUse(MatrixError):
    errcode = "M_USER_IN_USE"


class UserDeactivated(MatrixError):
    errcode = "M_USER_DEACTIVATED"


class GuestAccessForbidden(MatrixError):
    errcode = "M_GUEST_ACCESS_FORBIDDEN"


class Exclusive(MatrixError):
    errcode = "M_EXCLUSIVE"


class ResourceLimitExceeded(MatrixError):
    errcode = "M_RESOURCE_LIMIT_EXCEEDED"
