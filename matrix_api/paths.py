"""Building request paths from untrusted identifiers.

Every variable part of a path is percent-encoded as one segment: event ids of room
version 3+ contain ``/``, state keys often start with ``@`` and may be empty or
unicode, and room aliases start with ``#``. Nothing is left for httpx to guess.
"""

from __future__ import annotations

import functools
import re
from urllib.parse import quote

__all__ = ["CLIENT_V1", "CLIENT_V3", "client_path", "segment"]

CLIENT_V3 = "/_matrix/client/v3"
CLIENT_V1 = "/_matrix/client/v1"

# What `quote` leaves alone anyway; most parts (``rooms``, ``send``, transaction ids)
# are only this, and checking is several times cheaper than quoting.
_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]+")


def segment(value: str) -> str:
    """Percent-encode one path segment; ``/`` included, nothing is safe.

    ``.`` and ``..`` are encoded too: left bare, URL normalisation would remove them
    and send the request to another endpoint (a state key may be any string).
    """
    if value in (".", ".."):
        return value.replace(".", "%2E")
    if _UNRESERVED.fullmatch(value):
        return value
    return _quoted(value)


# Room and user ids come back request after request, and `quote` is pure Python.
@functools.lru_cache(maxsize=1024)
def _quoted(value: str) -> str:
    return quote(value, safe="")


def client_path(prefix: str, *parts: str) -> str:
    """Join a fixed template with its variable parts.

    ``parts`` alternate freely between literal words and identifiers; every part is
    encoded, which leaves plain words (``rooms``, ``send``) unchanged.

    >>> client_path(CLIENT_V3, "rooms", "!a:b", "event", "$x/y")
    '/_matrix/client/v3/rooms/%21a%3Ab/event/%24x%2Fy'
    """
    return "/".join((prefix, *map(segment, parts)))
