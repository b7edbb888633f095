"""Decoding a response envelope that one poisoned event would otherwise sink.

An envelope is decoded with its events kept raw (see `decode_events`), but two
things in any one event fail the whole document before that: a lone surrogate
escape (msgspec refuses the text) and a value nested deeper than the decoder will
follow. Each is mended and recorded, and the document decoded again: lone
surrogates become U+FFFD; an event nested too deep is cut out whole (its id and
sender kept for the record), and anything else nested too deep becomes ``null``.
An envelope that still does not decode may be taken apart piece by piece.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import TypeVar

import msgspec

from .events import CUT_EVENT, MAX_EVENT_DEPTH, SkippedEvent
from .nesting import Cut, cut_too_deep
from .surrogates import replace_lone_surrogates

__all__ = ["decode_mended"]

T = TypeVar("T")

# Where an envelope nests deeper than this, the value is cut out: far below where
# msgspec gives up (near Python's recursion limit), far above any real response.
ENVELOPE_DEPTH = 2 * MAX_EVENT_DEPTH


def decode_mended(
    decoder: msgspec.json.Decoder[T],
    body: bytes,
    skipped: list[SkippedEvent],
    event_arrays: Collection[str],
    lenient: Callable[[bytes, list[SkippedEvent]], T] | None = None,
) -> T:
    """``decoder.decode(body)``, mended as the module docstring says when it must be.

    ``event_arrays``: the keys whose arrays hold events. ``lenient``: when even the
    mended body does not decode, it gets the last word (a decoder that takes the
    envelope apart piece by piece, recording what it leaves out). Raises
    `msgspec.DecodeError` and nothing else when the envelope cannot be used.
    """
    mended_surrogates = cut_deep = False
    while True:
        try:
            return decoder.decode(body)
        except RecursionError:
            if cut_deep:
                raise msgspec.DecodeError("nested too deep even after cutting") from None
            cut_deep = True
            body = _cut(body, event_arrays, skipped)
        except msgspec.DecodeError:
            if not mended_surrogates:
                mended_surrogates = True
                body, count = replace_lone_surrogates(body)
                if count:
                    skipped.append(
                        SkippedEvent("body", f"{count} lone surrogate escape(s) replaced by U+FFFD")
                    )
                    continue
            if lenient is None:
                raise
            if not cut_deep:  # a piecewise decode recurses too
                body = _cut(body, event_arrays, skipped)
            try:
                return lenient(body, skipped)
            except RecursionError:
                raise msgspec.DecodeError("nested too deep even after cutting") from None


def _cut(body: bytes, event_arrays: Collection[str], skipped: list[SkippedEvent]) -> bytes:
    body, cuts = cut_too_deep(body, ENVELOPE_DEPTH, CUT_EVENT, event_arrays)
    skipped.extend(_skipped_for(cut) for cut in cuts)
    return body


def _skipped_for(cut: Cut) -> SkippedEvent:
    path = cut.path
    room_id = path[2] if len(path) > 2 and path[0] == "rooms" else None
    shown = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path[:8])
    return SkippedEvent(
        shown.lstrip(".") + ("..." if len(path) > 8 else ""),
        f"nested deeper than {ENVELOPE_DEPTH} levels",
        cut.event_id if cut.is_event else None,
        cut.sender if cut.is_event else None,
        room_id if isinstance(room_id, str) else None,
    )
