"""How deep JSON nests, found without recursion; and cutting out what nests too deep.

Decoders recurse (msgspec included: it gives up near Python's recursion limit, and
skipping a value it does not want recurses too), so a value nested a thousand levels
deep sinks the whole document it is in. Here JSON is read as a flat stream of tokens
(strings, brackets, colons, commas) with a regular expression, so depth costs
nothing but a counter. Sans-IO: bytes in, bytes and records out.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Collection
from dataclasses import dataclass, field

import msgspec

__all__ = ["Cut", "cut_too_deep", "exceeds_depth"]

# A JSON string (escapes included), or one of the structural characters the
# scanner follows. Numbers, literals and whitespace are never looked at.
_RUNS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[{]+|[\]}]+|[:,]')
_BRACKETS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[{]+|[\]}]+')
_OPEN = frozenset(b"[{")
_CLOSE = frozenset(b"]}")
_QUOTE = ord('"')
_COLON = ord(":")
_COMMA = ord(",")
_ARRAY = ord("[")
_OBJECT = ord("{")


def exceeds_depth(raw: bytes, limit: int) -> bool:
    """Whether ``raw`` (JSON) nests containers more than ``limit`` levels deep."""
    # Fewer opening brackets than the limit cannot nest deeper: most events stop here.
    if raw.count(b"{") + raw.count(b"[") <= limit:
        return False
    depth = 0
    for match in _BRACKETS.finditer(raw):
        char = raw[match.start()]
        if char in _OPEN:
            depth += match.end() - match.start()
            if depth > limit:
                return True
        elif char in _CLOSE:
            depth -= match.end() - match.start()
    return False


@dataclass(slots=True)
class Cut:
    """A value taken out of a document because it nested too deep.

    ``path`` is where it was: object keys and array indexes from the top. For an
    event the whole event is cut, and its ``event_id`` and ``sender`` are kept when
    they were plain strings.
    """

    path: list[str | int]
    is_event: bool
    event_id: str | None = None
    sender: str | None = None


@dataclass(slots=True)
class _Frame:
    opener: int
    start: int
    key: str | None
    is_event: bool
    index: int = 0
    fields: dict[str, str] = field(default_factory=dict)


def _string(token: bytes) -> str | None:
    try:
        value = msgspec.json.decode(token)
    except msgspec.DecodeError:
        return None  # a lone surrogate escape, say
    return value if isinstance(value, str) else None


def cut_too_deep(
    body: bytes, limit: int, event_placeholder: bytes, event_arrays: Collection[str]
) -> tuple[bytes, list[Cut]]:
    """``body`` with every value nested deeper than ``limit`` cut out, and what was cut.

    An event (an object in an array under one of the keys ``event_arrays``) holding
    such a value is replaced whole by ``event_placeholder`` (its array keeps its
    length); any other value is replaced by ``null`` where it crosses the limit.
    Malformed JSON is left for the decoder to refuse: this only follows brackets.
    """
    pieces: list[bytes] = []
    copied = 0  # body[:copied] is in pieces (or was cut)
    cuts: list[Cut] = []
    stack: list[_Frame] = []  # the containers open, down to one past the limit
    excess = 0  # containers open deeper than that: only counted
    cutting: int | None = None  # index in stack of the frame being cut
    last_string = b""  # the latest string token: a key, if a colon follows
    key: str | None = None
    after_colon = False

    def cut(frame: _Frame, end: int, path: list[str | int]) -> None:
        nonlocal copied
        pieces.append(body[copied : frame.start])
        pieces.append(event_placeholder if frame.is_event else b"null")
        copied = end
        cuts.append(
            Cut(path, frame.is_event, frame.fields.get("event_id"), frame.fields.get("sender"))
        )

    for match in _RUNS.finditer(body):
        start = match.start()
        char = body[start]
        if excess and char not in _OPEN and char not in _CLOSE:
            continue  # inside what is already too deep: only brackets count
        if char == _QUOTE:
            if after_colon and key in ("event_id", "sender") and stack and stack[-1].is_event:
                value = _string(match.group())
                if value is not None:
                    stack[-1].fields[key] = value
            last_string = b"" if after_colon else match.group()
            after_colon = False
            continue
        after_colon = char == _COLON
        if after_colon:
            key = _string(last_string) if last_string else None
        elif char == _COMMA:
            key = None
            if stack and stack[-1].opener == _ARRAY:
                stack[-1].index += 1
        elif char in _OPEN:
            run = match.group()
            framed = max(0, min(len(run), limit + 1 - len(stack)))
            for offset in range(framed):
                parent = stack[-1] if stack else None
                opener = run[offset]
                is_event = (
                    opener == _OBJECT
                    and parent is not None
                    and parent.opener == _ARRAY
                    and parent.key in event_arrays
                )
                frame_key = key if parent is None or parent.opener == _OBJECT else None
                stack.append(_Frame(opener, start + offset, frame_key, is_event))
                key = None
            excess += len(run) - framed
            if cutting is None and len(stack) > limit:
                # The outermost event holding it goes whole; elsewhere just this value.
                cutting = next((i for i, f in enumerate(stack) if f.is_event), len(stack) - 1)
        else:  # a run of closing brackets
            closing = len(match.group())
            unframed = min(excess, closing)
            excess -= unframed
            for offset in range(unframed, closing):
                if not stack:
                    break
                if cutting == len(stack) - 1:
                    cut(stack[cutting], start + offset + 1, _path(stack))
                    cutting = None
                stack.pop()
            key = None
    if cutting is not None:
        # Never closed: the document is truncated; cut to its end and let the decoder say so.
        cut(stack[cutting], len(body), _path(stack[: cutting + 1]))
    if not cuts:
        return body, cuts
    pieces.append(body[copied:])
    return b"".join(pieces), cuts


def _path(stack: list[_Frame]) -> list[str | int]:
    """The keys and indexes leading to the top frame of ``stack``."""
    path: list[str | int] = []
    for parent, frame in itertools.pairwise(stack):
        if parent.opener == _ARRAY:
            path.append(parent.index)
        else:
            path.append(frame.key if frame.key is not None else "?")
    return path
