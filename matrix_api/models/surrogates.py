"""Mending JSON whose strings hold lone UTF-16 surrogate escapes (``"\\ud800"``).

JSON allows them; msgspec (rightly: they are not text) refuses the whole document
for one of them. A homeserver relaying another server's event can hand us one,
and one poisoned event must not sink a /sync: each lone surrogate escape becomes
U+FFFD, the replacement character, and the caller records what was mended.
"""

from __future__ import annotations

import re

__all__ = ["replace_lone_surrogates"]

# A \uXXXX escape not itself escaped: preceded by an even number of backslashes.
_LONE_HIGH = re.compile(
    rb"(?<!\\)((?:\\\\)*)\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
)
_LONE_LOW = re.compile(
    rb"(?<!\\)((?:\\\\)*)(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)


def replace_lone_surrogates(body: bytes) -> tuple[bytes, int]:
    """``body`` with every lone surrogate escape replaced by ``\\ufffd``; and how many."""
    mended, high = _LONE_HIGH.subn(rb"\1\\ufffd", body)
    mended, low = _LONE_LOW.subn(rb"\1\\ufffd", mended)
    return mended, high + low
