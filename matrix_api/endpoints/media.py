"""Content repository downloads through the authenticated media API.

``GET /_matrix/client/v1/media/download/{serverName}/{mediaId}`` (spec v1.11,
"Client Behaviour / Content repository"): the same bearer token as every other
request. The unauthenticated ``/_matrix/media/v3/download`` is being removed from
servers and is never used.

Only ``mxc://<server-name>/<media-id>`` is downloaded, and `parse_mxc` reads it
strictly: a server name as the spec's grammar has it (a DNS name, an IPv4 address or
a bracketed IPv6 address, an optional port) and a media id of ``[A-Za-z0-9_-]``
only (the spec's "opaque identifier" characters), so nothing from an event can steer
the request to another path or host; both are percent-encoded as segments anyway.

The answer is read inside `ResponseLimits` built from the caller's ``max_bytes``
and ``timeout_s``: the transport counts bytes as they arrive (a ``Content-Length``
or an ``info.size`` that lies does not matter) and stops past the limit, inflated
bytes included. What the bytes are is the caller's business: the server's
``Content-Type`` is only what the uploader claimed.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from ..errors import MatrixAPIError
from ..h11_transport import ResponseLimits
from ..http import HTTPCore, Request
from ..paths import CLIENT_V1, client_path

__all__ = ["InvalidMxcUri", "MediaEndpoints", "MxcUri", "parse_mxc"]

# RFC 1123 host names (one label at least), IPv4, or [IPv6]; then an optional port.
_SERVER_NAME = re.compile(
    r"(?:\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,253}[A-Za-z0-9])?)"
    r"(?::[0-9]{1,5})?"
)
_MEDIA_ID = re.compile(r"[A-Za-z0-9_-]{1,255}")
_MXC = "mxc://"
_HEAD_ROOM = 64 * 1024
"""An error answer (JSON) must fit even when the caller's limit is tiny."""


class InvalidMxcUri(ValueError):
    """Not an ``mxc://server/id`` URI this client will download (the reason says why,
    without quoting the value)."""


class MxcUri(NamedTuple):
    server_name: str
    media_id: str

    def __str__(self) -> str:
        return f"{_MXC}{self.server_name}/{self.media_id}"


def parse_mxc(value: object) -> MxcUri:
    """``value`` as an `MxcUri`; raises `InvalidMxcUri` for anything else (another
    type, another scheme, a query, a fragment, more path, empty parts, odd characters)."""
    if not isinstance(value, str):
        raise InvalidMxcUri(f"a media URI must be a string, not {type(value).__name__}")
    if len(value) > 512:
        raise InvalidMxcUri("the media URI is too long")
    if not value.startswith(_MXC):
        raise InvalidMxcUri("not an mxc:// URI")
    server, sep, media_id = value[len(_MXC) :].partition("/")
    if not sep:
        raise InvalidMxcUri("the mxc:// URI has no media id")
    if not _SERVER_NAME.fullmatch(server) or ".." in server:
        raise InvalidMxcUri("the mxc:// URI's server name is not a valid server name")
    if not _MEDIA_ID.fullmatch(media_id):
        raise InvalidMxcUri("the mxc:// URI's media id has characters outside [A-Za-z0-9_-]")
    port = server.rpartition(":")[2] if not server.endswith("]") and ":" in server else None
    if port is not None and not 0 < int(port) < 65536:
        raise InvalidMxcUri("the mxc:// URI's server name has an invalid port")
    return MxcUri(server, media_id)


def media_limits(max_bytes: int, timeout_s: float) -> ResponseLimits:
    """The `ResponseLimits` of one download: ``max_bytes`` as sent and once inflated,
    ``timeout_s`` for the whole answer (connecting included)."""
    if max_bytes < 1 or not timeout_s > 0:
        raise MatrixAPIError("a media download needs a positive size and time limit")
    room = max(max_bytes, _HEAD_ROOM)
    return ResponseLimits(
        max_body_bytes=room,
        max_decoded_bytes=room,
        total_timeout_s=timeout_s,
        read_timeout_s=timeout_s,
    )


def _body(body: bytes) -> bytes:
    return body


class MediaEndpoints(HTTPCore):
    async def download_media(self, uri: MxcUri, *, max_bytes: int, timeout_s: float) -> bytes:
        """The bytes of ``uri`` (from `parse_mxc`), at most ``max_bytes`` of them.

        Raises `matrix_api.ResponseLimitExceeded` (``limit`` ``max_body_bytes`` or
        ``max_decoded_bytes``: too large; ``total_timeout_s``: too slow) when the
        answer breaks its limits, and what `HTTPCore.send` raises otherwise
        (`NotFound` for unknown media, ``M_TOO_LARGE`` as a `MatrixError`). The bytes
        may hold up to 64 KiB over ``max_bytes`` when ``max_bytes`` is smaller than
        that (room for an error answer): callers compare the length themselves.

        Not retried once an answer started (``idempotent=False``): an answer over a
        limit would be as large again, and the caller has a time budget.
        """
        path = client_path(CLIENT_V1, "media", "download", uri.server_name, uri.media_id)
        request = Request(
            "GET",
            path,
            # Do not let the server park the request until an unfinished upload ends.
            query={"timeout_ms": "0"},
            idempotent=False,
            read_timeout=timeout_s,
            limits=media_limits(max_bytes, timeout_s),
        )
        return await self.send(request, _body)
