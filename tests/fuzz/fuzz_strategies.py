"""Hypothesis strategies for hostile /sync answers, rendered as raw bytes.

A scenario is what one homeserver tells the bot from start-up on: the start-up sync, a
few long-poll batches, and a last batch that carries one ordinary message from the owner
of a known chat. Every part may be hostile: events with any JSON in any field (wrong
types everywhere, missing fields, duplicate keys), deep nesting (up to 100,000 levels,
written as raw bytes, never built as Python objects), huge strings, unicode edge cases
(lone surrogate escapes, NUL, bidi overrides, non-characters), broken envelopes (``rooms``
a list, ``device_lists`` a string), and "glitches": answers that are not a sync at all
(no ``next_batch``, truncated JSON, invalid UTF-8), served once before the real batch.

The bytes go through the bot's real decoder (`matrix_api.models.sync.decode_sync`, via the
client), so a homeserver that validates less than Synapse is what is being played.

What the strategies never generate, because it would change what a correct bot does with
the final message (not what the property is about):

* a junk ``!archive`` (or ``!unarchive``) from the owner: ``archive`` is spelled ``arch1ve``;
* a valid Space marker in the known room, a junk marker that comes after the known room's
  real one, or a junk chat marker claiming the known chat's id;
* junk in the room that carries the final message where its events are (the timeline
  itself, ``limited``, ``prev_batch``); junk in its counts (``summary``,
  ``unread_notifications``) is fair game: a room must not lose its events over those;
* the final message's event id anywhere else.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from bot.chats import CHAT_MARKER, SPACE_MARKER, marker_content
from fake_homeserver import ALICE, BASE_TS, BOT
from ordering_harness import chat

__all__ = [
    "BOB",
    "CANARY",
    "FINAL_BODY",
    "FINAL_EVENT",
    "FINAL_TOKEN",
    "KNOWN_CHAT",
    "KNOWN_ROOM",
    "MALLORY",
    "SEED_TOKEN",
    "Deep",
    "Glitch",
    "Obj",
    "Raw",
    "Repeat",
    "Scenario",
    "Step",
    "deep",
    "dump",
    "final_batch",
    "final_message",
    "hand_made",
    "known_marker",
    "scenarios",
    "start_batch",
    "sync_body",
]

BOB = "@bob:hs.test"  # allowed (the bot's own server), not the known chat's owner
MALLORY = "@mallory:elsewhere.test"  # not allowed
KNOWN_ROOM = "!known:hs.test"
KNOWN_CHAT = "c_known"
FINAL_EVENT = "$fuzz-final-message"
FINAL_BODY = "after all that: are you still there?"
SEED_TOKEN = "s0"
FINAL_TOKEN = "fin"
CANARY = "CANARY-c0ntent-9f2e"
"""Put into message contents only: it must never reach a log line."""
ENVELOPES = os.environ.get("SURFACES_FUZZ_ENVELOPES", "1") != "0"
"""Whether batches may have broken envelopes and glitches; ``0`` hunts what hides
behind them (junk inside well-formed batches)."""


# --- raw JSON ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """A JSON fragment written as is: deep nesting, odd numbers, invalid bytes."""

    data: bytes

    def __repr__(self) -> str:
        return f"Raw({clip(self.data)!r})"


@dataclass(frozen=True)
class Deep:
    """A value nested ``levels`` deep, written as bytes when dumped (a Python value that
    deep could not be built, let alone dumped, without recursion). Kept as a recipe, not
    as bytes: hypothesis keeps drawn values around, and megabytes each add up."""

    levels: int
    shape: str = "["

    def render(self) -> bytes:
        if self.shape == "[":
            return b"[" * self.levels + b"]" * self.levels
        if self.shape == "{":
            return b'{"a":' * self.levels + b"0" + b"}" * self.levels
        return b'[{"a":' * self.levels + b"0" + b"}]" * self.levels


@dataclass(frozen=True)
class Repeat:
    """A huge string: ``unit`` ``count`` times, written out only when dumped."""

    unit: str
    count: int


@dataclass(frozen=True)
class Obj:
    """A JSON object written pair by pair, so a key may appear twice."""

    pairs: tuple[tuple[str, Any], ...]


def dump(value: Any) -> bytes:
    """``value`` (JSON values, `Raw`, `Obj`) as JSON bytes.

    Strings holding a lone surrogate are written with ``\\uXXXX`` escapes (the only way
    JSON can carry one); others as UTF-8, so both spellings of non-ASCII text occur.
    """
    out = bytearray()
    _dump(value, out)
    return bytes(out)


def _dump(value: Any, out: bytearray) -> None:
    if isinstance(value, Raw):
        out += value.data
    elif isinstance(value, Deep):
        out += value.render()
    elif isinstance(value, Repeat):
        out += _string(value.unit * value.count)
    elif isinstance(value, str):
        out += _string(value)
    elif value is None or isinstance(value, bool | int | float):
        out += json.dumps(value).encode()
    elif isinstance(value, dict | Obj):
        pairs = value.items() if isinstance(value, dict) else value.pairs
        out += b"{"
        for index, (key, item) in enumerate(pairs):
            if index:
                out += b","
            out += _string(key)
            out += b":"
            _dump(item, out)
        out += b"}"
    elif isinstance(value, list | tuple):
        out += b"["
        for index, item in enumerate(value):
            if index:
                out += b","
            _dump(item, out)
        out += b"]"
    else:
        raise TypeError(f"not a JSON value: {type(value).__name__}")


def _string(text: str) -> bytes:
    try:
        return json.dumps(text, ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate: only an escape can carry it
        return json.dumps(text).encode("ascii")


def clip(data: bytes | str, limit: int = 300) -> bytes | str:
    """``data`` cut to ``limit`` with a note of its real length: for readable failures."""
    if len(data) <= limit:
        return data
    note = f"...<{len(data)} in all>"
    return data[:limit] + (note.encode() if isinstance(data, bytes) else note)


def deep(levels: int, shape: str = "[") -> Deep:
    return Deep(levels, shape)


# --- text -------------------------------------------------------------------------------


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, each as often as its weight says (shrinking goes to the
    first): keeps deep and huge values a seasoning, not the whole dish."""
    total = sum(weight for weight, _ in choices)

    def pick(n: int) -> st.SearchStrategy[Any]:
        for weight, strategy in choices:
            if n < weight:
                return strategy
            n -= weight
        raise AssertionError(n)

    return st.integers(0, total - 1).flatmap(pick)


def _no_archive(text: str) -> str:
    # A junk "!archive" from the owner would rightly stop the answers in the known chat.
    lowered = text.lower()
    return lowered.replace("archive", "arch1ve") if "archive" in lowered else text


SPECIAL_TEXT = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\ud800",  # lone surrogates: written as \ud800 escapes
    "\udfff",
    "x\udc00\ud800y",  # a surrogate pair the wrong way round
    "\u202egnp.exe",  # right-to-left override
    "\u2066\u2067\u2068\u2069\u200e\u200f",
    "\u200b\u2060\ufeff",
    "\ufffe\uffff\ufdd0\ufdef",  # non-characters
    "\U0010ffff\U0001fffe",
    "\U000e0041\U000e007f",  # tag characters
    "e\u0301\u0301\u0301",
    "\u0301" * 200,  # combining marks with nothing to combine with
    "\U0001f3f3\ufe0f\u200d\U0001f308",
    "\r\n\r\n",
    "\u2028\u2029\x85\x0b\x0c",
    "\x1b[31mred\x1b[0m",
    "<b>bold</b><script>alert(1)</script>",
    "&amp;&lt;&#0;",
    "%s%n%x{0}",
    "${jndi:ldap://x}",
    "> <@alice:hs.test> quoted\n\nthe reply",
    "!help",
    "!status",
    "!chats",
    "!settings",
    "!forget",
    "!HELP",
    "!help\n!chats",
    "! help",
    "!!",
    "!",
    "!new \u202etitle",
    "!new " + "t" * 300,
    "!rename \x00",
    "!rename \ud800",
    "!model \ud800",
    "!system " + "x" * 3000,
    "!" + "n" * 40,
]


def _repeated(units: Sequence[str], sizes: Sequence[int]) -> st.SearchStrategy[Repeat]:
    """Long strings, cheap to draw: a unit repeated up to about ``size`` characters."""
    return st.builds(
        lambda unit, size: Repeat(unit, max(1, size // len(unit))),
        st.sampled_from(units),
        st.sampled_from(sizes),
    )


# Characters; the long profile (bench/fuzz.py) goes further.
HUGE_SIZES = tuple(
    int(size) for size in os.environ.get("SURFACES_FUZZ_HUGE", "65537,300000").split(",")
)
huge_text = _repeated(["a", "\u202e", "\x00", "\U0001f600", "\ud800", "\\", '"', "é"], HUGE_SIZES)

every_char = st.characters(exclude_categories=())  # lone surrogates and controls too
plain_text = st.one_of(
    st.text(every_char, max_size=16),
    st.sampled_from(SPECIAL_TEXT),
).map(_no_archive)
"""Hostile text for anything that may rightly be logged (ids, types, titles)."""

content_text = weighted(
    (12, plain_text),
    (6, st.text(every_char, max_size=10).map(lambda s: _no_archive(f"{s}{CANARY}"))),
    (1, huge_text),
)
"""Hostile text for message contents: may carry `CANARY`."""


# --- any JSON -----------------------------------------------------------------------------

odd_numbers = st.sampled_from(
    [
        Raw(b"1e400"),
        Raw(b"-1e400"),
        Raw(b"-0"),
        Raw(b"1E-400"),
        Raw(b"1" + b"0" * 400),
        Raw(b"-" + b"9" * 40),
        Raw(b"0.1e1"),
    ]
)
big_ints = st.sampled_from([2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, -(10**30)])
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    big_ints,
    st.floats(allow_nan=False, allow_infinity=False),
    odd_numbers,
    plain_text,
)


def _objects(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    keys = plain_text
    return st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(keys, children, max_size=4),
        # The same key twice: which one wins is up to the decoder.
        st.lists(st.tuples(st.sampled_from(["a", "body", "msgtype"]), children), max_size=4).map(
            lambda pairs: Obj(tuple(pairs))
        ),
    )


json_values = st.recursive(scalars, _objects, max_leaves=5)
deep_values = st.builds(
    deep,
    st.one_of(
        st.integers(1, 200),
        st.sampled_from([63, 64, 65, 127, 128, 129, 999, 1000, 1001, 5000, 100_000]),
    ),
    st.sampled_from(["[", "{", "[{"]),
)
junk = weighted((30, json_values), (3, deep_values), (1, huge_text))
"""Anything at all, where a field should be (deep or huge now and then: a batch full of
them would only measure the decoder's speed). No `CANARY`: junk goes where ids go too,
and ids may rightly be logged; `content_junk` is for contents."""
content_junk = st.one_of(junk, content_text, st.dictionaries(st.just(CANARY), junk, max_size=1))


def mostly(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` three times in four, junk otherwise: enough junk to hurt, enough
    well-typed events to get past the decoder and into intake, routing and commands."""
    return st.one_of(good, good, good, junk)


def seldom_junk(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good``, and junk one time in ten."""
    return weighted((9, good), (1, junk))


# --- events -------------------------------------------------------------------------------

event_ids = mostly(st.integers(0, 200).map(lambda n: f"$e{n}")).filter(lambda v: v != FINAL_EVENT)
senders = st.one_of(
    st.sampled_from([ALICE, ALICE, BOB, MALLORY, BOT]),
    st.sampled_from(["", "@", "@:", "alice", "@alice:hs.test\x00", "@\u202ealice:hs.test"]),
    st.sampled_from(["@ALICE:HS.TEST", "@alice:hs.test:8448", "@alice:hs.test "]),
    junk,
)
timestamps = mostly(st.integers(BASE_TS - 10, BASE_TS + 1_000_000))
msgtypes = mostly(st.sampled_from(["m.text", "m.text", "m.emote", "m.notice", "m.image", ""]))


@st.composite
def relations(draw: st.DrawFn) -> Any:
    target = draw(mostly(event_ids))
    return draw(
        st.one_of(
            st.just({"m.in_reply_to": {"event_id": target}}),
            st.just({"rel_type": "m.replace", "event_id": target}),
            st.just({"rel_type": "m.thread", "event_id": target, "is_falling_back": True}),
            st.just({"m.in_reply_to": target}),
            st.just([{"m.in_reply_to": {"event_id": target}}]),
            st.fixed_dictionaries({"rel_type": junk, "m.in_reply_to": junk}),
            junk,
        )
    )


def _with_extra(base: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """``base`` plus a few keys of junk (the decoder keeps unknown content keys)."""
    extra = st.dictionaries(st.one_of(plain_text, st.just(CANARY)), content_junk, max_size=2)
    return extra.map(lambda more: {**more, **base})


@st.composite
def message_contents(draw: st.DrawFn) -> Any:
    body = draw(st.one_of(content_text, content_text, content_junk))
    content: dict[str, Any] = {"msgtype": draw(msgtypes), "body": body}
    if draw(st.booleans()):
        content["m.relates_to"] = draw(relations())
    if draw(st.booleans()):
        content["format"] = draw(mostly(st.just("org.matrix.custom.html")))
        content["formatted_body"] = draw(st.one_of(content_text, content_junk))
    if draw(st.integers(0, 5)) == 0:
        content["m.new_content"] = draw(st.one_of(content_junk, message_contents()))
    for key in draw(st.sets(st.sampled_from(sorted(content)), max_size=2)):
        del content[key]
    return draw(_with_extra(content))


@st.composite
def room_events(draw: st.DrawFn) -> Any:
    """One event as a timeline or a joined room's state delivers it."""
    kind = draw(
        st.sampled_from(
            ["message", "message", "message", "member", "encrypted", "encryption", "other", "junk"]
        )
    )
    if kind == "junk":
        return draw(junk)
    event: dict[str, Any] = {
        "event_id": draw(event_ids),
        "sender": draw(senders),
        "origin_server_ts": draw(timestamps),
    }
    if kind == "message":
        event["type"] = draw(mostly(st.just("m.room.message")))
        event["content"] = draw(mostly(message_contents()))
    elif kind == "member":
        event["type"] = "m.room.member"
        event["state_key"] = draw(mostly(st.sampled_from([BOT, ALICE, MALLORY, ""])))
        membership = draw(mostly(st.sampled_from(["join", "invite", "leave", "ban", "knock"])))
        event["content"] = draw(
            mostly(st.just({"membership": membership, "displayname": draw(plain_text)}))
        )
        if draw(st.booleans()):
            event["unsigned"] = {"prev_content": draw(mostly(st.just({"membership": "join"})))}
    elif kind == "encrypted":
        event["type"] = "m.room.encrypted"
        event["content"] = draw(
            mostly(
                st.fixed_dictionaries(
                    {
                        "algorithm": mostly(st.just("m.megolm.v1.aes-sha2")),
                        "ciphertext": content_text,
                        "session_id": plain_text,
                    }
                )
            )
        )
    elif kind == "encryption":
        event["type"] = "m.room.encryption"
        event["state_key"] = draw(mostly(st.just("")))
        event["content"] = draw(mostly(st.just({"algorithm": "m.megolm.v1.aes-sha2"})))
    else:
        event["type"] = draw(plain_text)
        event["content"] = draw(content_junk)
        event["state_key"] = draw(st.one_of(st.none(), plain_text))
    if draw(st.integers(0, 3)) == 0:
        event["unsigned"] = draw(
            st.one_of(
                st.fixed_dictionaries({"redacted_because": junk}),
                st.fixed_dictionaries({"prev_content": junk, "age": junk}),
                junk,
            )
        )
    if draw(st.integers(0, 5)) == 0:
        event["room_id"] = draw(mostly(st.just(KNOWN_ROOM)))
    # Break a field or two: drop it, or put junk in its place.
    for key in draw(st.sets(st.sampled_from(sorted(event)), max_size=2)):
        if draw(st.booleans()):
            del event[key]
        else:
            event[key] = draw(junk)
    if draw(st.integers(0, 7)) == 0:
        key = draw(st.sampled_from(sorted(event) or ["type"]))
        return Obj((*event.items(), (key, draw(junk))))
    return event


def marker_contents(*, chat_ids: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return mostly(
        st.fixed_dictionaries(
            {
                "version": mostly(st.just(1)),
                "chat_id": chat_ids,
                "owner": mostly(st.sampled_from([ALICE, BOB, MALLORY, "alice", "@"])),
                "title": mostly(plain_text),
                "created_ts": mostly(st.integers(BASE_TS - 10**9, BASE_TS)),
                "archived": mostly(st.booleans()),
            },
            optional={
                "space_id": mostly(st.just("!space:hs.test")),
                "successor": mostly(plain_text),
                "settings": mostly(st.dictionaries(plain_text, plain_text, max_size=2)),
            },
        )
    )


_junk_chat_ids = mostly(st.integers(0, 9).map(lambda n: f"c_junk{n}")).filter(
    lambda v: v != KNOWN_CHAT
)


@st.composite
def account_data_events(draw: st.DrawFn, *, known_room: bool = False) -> Any:
    """Room account data; in the known room never a Space marker (that would rightly
    make it a Space) and never after the room's real marker (see the module docstring)."""
    types = [CHAT_MARKER, "m.fully_read", "m.tag"] + ([] if known_room else [SPACE_MARKER])
    data_type = draw(mostly(st.sampled_from(types)))
    if data_type in (CHAT_MARKER, SPACE_MARKER):
        content = draw(marker_contents(chat_ids=_junk_chat_ids))
    else:
        content = draw(junk)
    return draw(
        st.one_of(
            st.just({"type": data_type, "content": content}),
            st.just({"type": data_type}),
            junk,
        )
    )


@st.composite
def ephemeral_events(draw: st.DrawFn) -> Any:
    target = draw(st.one_of(st.integers(0, 200).map(lambda n: f"$e{n}"), plain_text))
    return draw(
        st.one_of(
            st.just({"type": "m.receipt", "content": {target: {"m.read": {BOT: {"ts": 1}}}}}),
            st.fixed_dictionaries(
                {
                    "type": st.just("m.receipt"),
                    "content": mostly(
                        st.dictionaries(
                            st.one_of(st.just(target), plain_text),
                            mostly(st.just({"m.read": draw(mostly(st.just({BOT: draw(junk)})))})),
                            max_size=3,
                        )
                    ),
                }
            ),
            st.fixed_dictionaries({"type": st.just("m.typing"), "content": junk}),
            junk,
        )
    )


@st.composite
def invite_states(draw: st.DrawFn) -> list[Any]:
    """Stripped state of an invite: the bot's membership (maybe twice, maybe forged,
    maybe not last), encryption, and junk."""
    member = st.fixed_dictionaries(
        {
            "type": st.just("m.room.member"),
            "state_key": mostly(st.sampled_from([BOT, ALICE])),
            "sender": senders,
            "content": mostly(
                st.fixed_dictionaries({"membership": mostly(st.sampled_from(["invite", "join"]))})
            ),
        }
    )
    other = st.fixed_dictionaries(
        {
            "type": st.sampled_from(["m.room.encryption", "m.room.name", "m.room.create"]),
            "state_key": mostly(st.just("")),
            "sender": senders,
            "content": junk,
        }
    )
    return draw(st.lists(st.one_of(member, member, other, junk), max_size=4))


def to_device_events() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.fixed_dictionaries(
            {"type": plain_text, "sender": senders, "content": mostly(message_contents())}
        ),
        junk,
    )


def envelope(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A part of the envelope: now and then junk, unless `ENVELOPES` is off."""
    return mostly(good) if ENVELOPES else good


def events_of(events: st.SearchStrategy[Any], max_size: int = 4) -> st.SearchStrategy[Any]:
    """A top-level ``{"events": [...]}`` section, or junk where it should be."""
    return envelope(st.lists(events, max_size=max_size).map(lambda listed: {"events": listed}))


# --- rooms and bodies ---------------------------------------------------------------------

_room_ids = st.integers(0, 20).map(lambda n: f"!junk{n}:hs.test")
junk_room_ids = st.one_of(_room_ids, _room_ids, _room_ids, plain_text).filter(
    lambda v: v != KNOWN_ROOM
)
"""Room ids are object keys: always strings, but any string."""


@st.composite
def joined_rooms(draw: st.DrawFn, *, known: bool = False, carries_final: bool = False) -> Any:
    """A joined room; the known room keeps its real marker last; the room carrying the
    final message keeps a decodable shape (junk only inside its events)."""
    timeline: dict[str, Any] = {
        "events": draw(st.lists(room_events(), max_size=4)),
        "limited": draw(st.booleans()) if not carries_final else False,
        "prev_batch": "p1",
    }
    account_data = draw(st.lists(account_data_events(known_room=known), max_size=2))
    if known:
        account_data.append({"type": CHAT_MARKER, "content": known_marker()})
    room: dict[str, Any] = {
        "timeline": timeline,
        "state": {"events": draw(st.lists(room_events(), max_size=2))},
        "account_data": {"events": account_data},
        "ephemeral": {"events": draw(st.lists(ephemeral_events(), max_size=2))},
        # Counts the bot never reads; junk there must not cost the room its events.
        "summary": draw(seldom_junk(st.just({"m.joined_member_count": 2}))),
        "unread_notifications": draw(seldom_junk(st.just({"notification_count": 0}))),
    }
    if carries_final:
        timeline["events"].append(final_message())
        return room
    # Break the room's own shape now and then.
    where = draw(
        st.sampled_from(
            [None, None, None, "room", "timeline", "events", "limited", "prev_batch", "state"]
        )
    )
    if where == "room":
        return draw(junk)
    if where == "timeline":
        room["timeline"] = draw(junk)
    elif where in ("events", "limited", "prev_batch"):
        timeline[where] = draw(junk)
    elif where == "state":
        room["state"] = draw(junk)
    return room


def known_marker() -> dict[str, Any]:
    return marker_content(chat(KNOWN_CHAT, KNOWN_ROOM))


def final_message() -> dict[str, Any]:
    """The ordinary message that must be answered after the junk."""
    return {
        "type": "m.room.message",
        "event_id": FINAL_EVENT,
        "sender": ALICE,
        "origin_server_ts": BASE_TS + 2_000_000,
        "content": {"msgtype": "m.text", "body": FINAL_BODY},
        "unsigned": {"age": 1},
    }


def sync_body(next_batch: Any, **sections: Any) -> dict[str, Any]:
    """A /sync answer with ``sections`` (``join``/``invite``/``leave``/``knock`` go under
    ``rooms``); ``next_batch=None`` leaves it out."""
    rooms = {key: sections.pop(key, {}) for key in ("join", "invite", "leave", "knock")}
    body: dict[str, Any] = {} if next_batch is None else {"next_batch": next_batch}
    body["rooms"] = rooms
    body.update(sections)
    return body


@st.composite
def sync_bodies(
    draw: st.DrawFn,
    next_batch: str,
    *,
    known_room: bool,
    carries_final: bool = False,
    initial: bool = False,
) -> dict[str, Any]:
    """A batch: junk rooms and events around the known room (always there in the
    start-up sync, with its marker; carrying the final message in the last batch)."""
    join: dict[Any, Any] = {
        room_id: draw(joined_rooms())
        for room_id in draw(st.lists(junk_room_ids, max_size=2, unique=True))
    }
    if known_room or carries_final or initial:
        join[KNOWN_ROOM] = draw(joined_rooms(known=True, carries_final=carries_final))
    invites = invite_states().map(lambda state: {"invite_state": {"events": state}})
    invite = {
        room_id: draw(mostly(invites))
        for room_id in draw(st.lists(junk_room_ids, max_size=1, unique=True))
    }
    leave = {
        room_id: draw(joined_rooms())
        for room_id in draw(st.lists(junk_room_ids, max_size=1, unique=True))
    }
    body = sync_body(
        next_batch,
        join=join,
        invite=invite,
        leave=leave,
        account_data=draw(events_of(account_data_events(), max_size=2)),
        to_device=draw(events_of(to_device_events(), max_size=2)),
        presence=draw(events_of(junk, max_size=2)),
        device_lists=draw(envelope(st.just({"changed": [ALICE], "left": []}))),
    )
    if draw(st.integers(0, 4)) == 0:
        body[draw(plain_text)] = draw(junk)  # an unknown top-level key
    if ENVELOPES and not carries_final and draw(st.integers(0, 3)) == 0:
        # A broken envelope that still says where the next batch starts.
        where = draw(
            st.sampled_from(
                ["rooms", "join", "invite", "leave", "account_data", "to_device", "device_lists"]
            )
        )
        broken = draw(st.one_of(st.lists(json_values, max_size=2), content_text, deep_values))
        if where in ("join", "invite", "leave"):
            body["rooms"][where] = broken
        else:
            body[where] = broken
    return body


@dataclass(frozen=True)
class Glitch:
    """An answer that is no sync at all, made from a batch when served (see `glitches`)."""

    kind: str
    body: Any
    arg: Any = None

    def render(self) -> bytes:
        if self.kind == "no_next_batch":
            return dump({k: v for k, v in self.body.items() if k != "next_batch"})
        if self.kind == "next_batch_junk":
            return dump({**self.body, "next_batch": self.arg})
        if self.kind == "truncated":  # arg: how much of it, in thousandths
            whole = dump(self.body)
            return whole[: len(whole) * self.arg // 1000]
        if self.kind == "trailing":
            return dump(self.body) + self.arg
        if self.kind == "invalid_utf8":
            return dump({**self.body, "junk": Raw(b'"\xff\xfe\xc3("')})
        return dump(self.arg)  # not_json, top_level


@st.composite
def glitches(draw: st.DrawFn, body: dict[str, Any]) -> Glitch:
    """An answer that is no sync at all, served once in place of ``body``: the bot
    must ride it out (retry) and take the real batch after it."""
    kind = draw(
        st.sampled_from(
            [
                "no_next_batch",
                "next_batch_junk",
                "truncated",
                "trailing",
                "invalid_utf8",
                "not_json",
                "top_level",
            ]
        )
    )
    arg: Any = None
    if kind == "next_batch_junk":
        arg = draw(st.one_of(st.none(), st.integers(), st.lists(st.integers(), max_size=2)))
    elif kind == "truncated":
        arg = draw(st.integers(0, 999))
    elif kind == "trailing":
        arg = draw(st.sampled_from([b"}", b",", b" x", b"\x00", b"{}"]))
    elif kind == "not_json":
        arg = Raw(draw(st.sampled_from([b"", b"NaN", b"{'next_batch': 's'}", b"<html>502</html>"])))
    elif kind == "top_level":
        arg = draw(st.one_of(deep_values, st.just(Raw(b"null")), st.just(Raw(b"[]"))))
    return Glitch(kind, body, arg)


# --- scenarios ----------------------------------------------------------------------------


@dataclass
class Step:
    """What the server answers for one ``since`` token: ``glitches`` once each, in
    order, then ``body`` to every request (the same batch, as a real server would)."""

    body: Any
    glitches: list[Glitch | bytes] = field(default_factory=list)

    def answer(self, served: int) -> bytes:
        """The bytes of the answer to request number ``served`` (from 0) for this token,
        written out each time (see `Deep`)."""
        if served < len(self.glitches):
            glitch = self.glitches[served]
            return glitch if isinstance(glitch, bytes) else glitch.render()
        return self.body if isinstance(self.body, bytes) else dump(self.body)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        # Hypothesis prints a falsifying example with this: clipped, never megabytes.
        printer.text(repr(self))

    def __repr__(self) -> str:
        shown = [clip(g if isinstance(g, bytes) else g.render()) for g in self.glitches]
        return f"Step(glitches={shown!r}, body={clip(self.answer(len(self.glitches)), 1500)!r})"


@dataclass
class Scenario:
    """The bot's whole conversation with the server (see the module docstring).

    ``seeded``: the store holds the known chat and the token ``s0`` from a previous run
    (else the bot starts with an empty store and learns the chat from the marker).
    ``steps[0]`` answers the start-up sync; each next step answers the token the one
    before it handed out; the last one carries the final message and hands out
    `FINAL_TOKEN`.
    """

    seeded: bool
    steps: list[Step]
    restart_at: str | None = None
    """Stop the bot once it has committed the batch that hands out this token, and
    start it again on the same store."""

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))

    def __repr__(self) -> str:
        restart = f"restart_at={self.restart_at!r}"
        return f"Scenario(seeded={self.seeded}, {restart}, steps={self.steps!r})"

    def tokens(self) -> list[str | None]:
        """The ``since`` each step answers."""
        first = SEED_TOKEN if self.seeded else None
        return [first, *(f"f{index}" for index in range(1, len(self.steps)))]


def next_token(index: int, count: int) -> str:
    return FINAL_TOKEN if index == count - 1 else f"f{index + 1}"


@st.composite
def scenarios(draw: st.DrawFn, max_polls: int = 2) -> Scenario:
    seeded = draw(st.booleans())
    polls = draw(st.integers(0, max_polls))
    count = polls + 2  # the start-up sync, the polls, the final batch
    steps = []
    for index in range(count):
        last = index == count - 1
        body = draw(
            sync_bodies(
                next_token(index, count),
                known_room=draw(st.booleans()),
                carries_final=last,
                initial=index == 0,
            )
        )
        glitched = (
            draw(st.lists(glitches(body), max_size=2)) if ENVELOPES and draw(st.booleans()) else []
        )
        steps.append(Step(body, glitched))
    restart = draw(st.one_of(st.none(), st.integers(0, count - 2)))
    return Scenario(seeded, steps, None if restart is None else next_token(restart, count))


def hand_made(*bodies: Callable[[str], Any], seeded: bool = True) -> Scenario:
    """A scenario from hand-written bodies, each called with its ``next_batch``: the
    first answers the start-up sync, the last must carry the final message. For the
    regression tests."""
    count = len(bodies)
    return Scenario(seeded, [Step(make(next_token(i, count))) for i, make in enumerate(bodies)])


def start_batch(next_batch: Any, *timeline: Any, **sections: Any) -> dict[str, Any]:
    """A start-up sync: the known room with its marker (and ``timeline``)."""
    room = {
        "timeline": {"events": list(timeline)},
        "account_data": {"events": [{"type": CHAT_MARKER, "content": known_marker()}]},
    }
    return sync_body(next_batch, join={KNOWN_ROOM: room, **sections.pop("join", {})}, **sections)


def final_batch(
    next_batch: Any, *before: Any, room: dict[str, Any] | None = None, **sections: Any
) -> dict[str, Any]:
    """A batch whose known room's timeline is ``before`` then the final message; ``room``
    adds to (or overrides) the known room's other parts."""
    known = {"timeline": {"events": [*before, final_message()]}, **(room or {})}
    return sync_body(next_batch, join={KNOWN_ROOM: known, **sections.pop("join", {})}, **sections)
