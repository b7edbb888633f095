"""Properties of the command parser and runner: whatever a user types, the bot answers
with a sane reply and never crashes, and user text in HTML is always escaped."""

from __future__ import annotations

import html
import re
import tempfile
import unicodedata
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from bot.chats import MAX_TITLE, Chat
from bot.commands import (
    COMMANDS,
    CommandContext,
    CommandError,
    ParsedCommand,
    Reply,
    clean_title,
    parse_command,
    run_command,
)
from bot.commands.new import DEFAULT_TITLE
from bot.commands.parser import MAX_COMMAND_LENGTH
from bot.config import Settings
from bot.dispatch import is_transient
from bot.store import Store
from matrix_api import Forbidden, MatrixAPIError, MatrixClient, NetworkError, NotFound
from matrix_api.models import RoomID
from stub_client import STUB_SERVER, StubClient

# Unicode's Bidi_Control characters (PropList.txt): they reorder text invisibly.
BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)
LINE_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
PREFIXES = ("!", "?", "bot:", "!!", ".", "\u00a7")

PROPERTIES = settings(max_examples=200, deadline=None)

# --- strategies -----------------------------------------------------------------------

every_char = st.characters(blacklist_categories=())  # lone surrogates and control chars too
tricky = st.sampled_from(
    [
        "\n",
        "\r\n",
        "\t",
        " ",
        "\u00a0",
        "\u2028",
        "\u0085",
        "\x00",
        "\x1b",
        "\u202e",
        "\u2066",
        "\u061c",
        "\ufeff",
        "\u200b",
        "\ud800",
        "\U0010ffff",
        "\u212a",  # KELVIN SIGN: lower-cases to ASCII "k"
        "\u0130",  # capital I with dot: lower-cases to two code points
        "e\u0301",
        "<",
        ">",
        "&",
        '"',
        "<b>x</b>",
        "<script>alert(1)</script>",
        '<a href="javascript:alert(1)">x</a>',
        "<img src=x onerror=alert(1)>",
        "!",
        "help",
        "new",
        "rename",
    ]
)
short_text = (
    st.text()
    | st.text(every_char)
    | st.lists(tricky | st.text(every_char, max_size=3)).map("".join)
)


@st.composite
def long_text(draw: st.DrawFn) -> str:
    """Up to 70 000 characters: a repeated piece, with something odd at either end."""
    piece = draw(st.text(every_char, min_size=1, max_size=6) | tricky)
    size = draw(st.integers(0, 70_000))
    head = draw(short_text)
    return (head + piece * (size // len(piece) + 1))[:70_000]


any_text = short_text | long_text()


@st.composite
def command_like(draw: st.DrawFn, prefix: str) -> str:
    """Bodies that start like a command, so the parser's interesting paths are reached."""
    name = draw(st.sampled_from([*COMMANDS, "frobnicate", "HELP", "Re-Name_2"]) | short_text)
    separator = draw(st.sampled_from([" ", "  ", "\t", "\n", "", " \n "]))
    return prefix + name + separator + draw(any_text)


def bodies(prefix: str) -> st.SearchStrategy[str]:
    return any_text | command_like(prefix) | any_text.map(lambda text: prefix + text)


# --- parse_command --------------------------------------------------------------------


@PROPERTIES
@given(data=st.data(), prefix=st.sampled_from(PREFIXES))
def test_parse_command_returns_a_valid_command_or_none(data: st.DataObject, prefix: str) -> None:
    _check_parse(data.draw(bodies(prefix), label="body"), prefix)


@pytest.mark.parametrize(
    "body",
    [
        "!\u212aelp",
        "!help\u2028x",
        "!rename\ttitle",
        "!" * 70_000,
        "!a" * 35_000,
        "!\ud800",
        "!rename \x00",
        "!\u0130x",
        "!new\n\n",
    ],
)
def test_parse_command_odd_bodies(body: str) -> None:
    _check_parse(body, "!")


@PROPERTIES
@given(prefix=st.text(min_size=1, max_size=8).filter(lambda p: not any(c.isspace() for c in p)))
def test_parse_command_with_any_allowed_prefix(prefix: str) -> None:
    for body in (prefix, prefix + "help", prefix * 3, prefix + "x" * 3000, prefix + " help"):
        _check_parse(body, prefix)


def _parse(body: str, prefix: str) -> tuple[ParsedCommand | None, CommandError | None]:
    """`parse_command`'s outcome as a value; anything but `CommandError` propagates."""
    try:
        return parse_command(body, prefix), None
    except CommandError as exc:
        return None, exc


def _check_parse(body: str, prefix: str) -> None:
    parsed, error = _parse(body, prefix)
    if error is not None:
        assert str(error)
        assert body.startswith(prefix)
        return
    if parsed is None:
        return
    assert isinstance(parsed, ParsedCommand)
    assert NAME.fullmatch(parsed.name), parsed.name
    assert body.startswith(prefix)
    assert len(body) <= MAX_COMMAND_LENGTH
    assert "\n" not in parsed.args
    assert parsed.args == parsed.args.strip()


# --- clean_title ----------------------------------------------------------------------


@PROPERTIES
@given(raw=any_text)
@example(raw="x" * (MAX_TITLE + 1))
@example(raw=" " + "x" * MAX_TITLE + " ")
@example(raw="a\u2028b\u2029c")
@example(raw="\u202eabc")
@example(raw="e\u0301" * MAX_TITLE)
def test_clean_title_is_one_printable_line_or_an_error(raw: str) -> None:
    try:
        title = clean_title(raw)
    except CommandError as exc:
        message = str(exc)
        title = None
    if title is None:
        assert message
        return
    assert 1 <= len(title) <= MAX_TITLE
    assert title == title.strip()
    for index, char in enumerate(title):
        category = unicodedata.category(char)
        assert category not in REFUSED_CATEGORIES or _joining(title, index), repr(char)
        assert char not in LINE_BREAKS, repr(char)
        assert char not in BIDI_CONTROLS, repr(char)
    assert clean_title(title) == title, "cleaning is idempotent"


REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Co", "Cs", "Cn", "Zl", "Zp"})


def _joining(title: str, index: int) -> bool:
    """ZWNJ/ZWJ between two visible characters: the one format character a title keeps."""
    return (
        title[index] in "\u200c\u200d"
        and 0 < index < len(title) - 1
        and all(
            not c.isspace() and unicodedata.category(c) not in REFUSED_CATEGORIES
            for c in (title[index - 1], title[index + 1])
        )
    )


@pytest.mark.parametrize(
    ("raw", "code_point"),
    [
        ("abc\u061cdef", "U+061C"),  # ARABIC LETTER MARK (bidi)
        ("pay\u202eecnalab", "U+202E"),  # RIGHT-TO-LEFT OVERRIDE
        ("\u2066x\u2069", "U+2066"),  # isolates
        ("ad\u200bmin", "U+200B"),  # ZERO WIDTH SPACE
        ("\u200bleading", "U+200B"),
        ("trailing\ufeff", "U+FEFF"),  # BOM
        ("soft\u00adhyphen", "U+00AD"),
        ("word\u2060joiner", "U+2060"),
        ("flag\U000e0067\U000e0062\U000e007f", "U+E0067"),  # tag characters
        ("tag\U000e0001", "U+E0001"),  # LANGUAGE TAG
        ("one\u2028two", "U+2028"),  # LINE SEPARATOR
        ("one\u2029two", "U+2029"),  # PARAGRAPH SEPARATOR
        ("private\ue000use", "U+E000"),
        ("plane\U000f0000", "U+F0000"),
        ("unassigned\u0378", "U+0378"),
        ("null\x00byte", "U+0000"),
        ("escape\x1b[31m", "U+001B"),
        ("tab\there", "U+0009"),
        ("anchor\ufff9x", "U+FFF9"),
        ("\u200dedge", "U+200D"),  # a joiner at an edge ...
        ("edge\u200c", "U+200C"),
        ("a \u200d b", "U+200D"),  # ... next to a space ...
        ("a\u200d\u200db", "U+200D"),  # ... or doubled is refused
    ],
)
def test_a_title_with_an_invisible_or_control_character_is_refused_by_name(
    raw: str, code_point: str
) -> None:
    with pytest.raises(CommandError) as raised:
        clean_title(raw)
    message = str(raised.value)
    assert code_point in message
    # The message names the character; it never carries it (it cannot be seen).
    assert all(unicodedata.category(c) not in REFUSED_CATEGORIES for c in message)


@pytest.mark.parametrize(
    "raw",
    [
        "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",  # Persian: ZWNJ is spelling
        "\U0001f468\u200d\U0001f469\u200d\U0001f467",  # an emoji family (ZWJ sequence)
        "\U0001f3f3\ufe0f\u200d\U0001f308 Pride",  # VS16 then ZWJ
        "Caf\u00e9 \u00e0 Z\u00fcrich",
        "\u05e9\u05dc\u05d5\u05dd world",  # right-to-left letters need no override
    ],
)
def test_real_text_with_joiners_is_a_title(raw: str) -> None:
    assert clean_title(raw) == raw


# --- run_command ----------------------------------------------------------------------

ALICE = "@alice:example.org"
BOB = "@bob:example.org"
ADMIN = "@admin:example.org"
SERVER = STUB_SERVER


ERRORS: list[Callable[[], MatrixAPIError]] = [
    lambda: Forbidden(403, "M_FORBIDDEN", "You may not"),
    lambda: NotFound(404, "M_NOT_FOUND", "No such room"),
    lambda: NetworkError("connection reset", maybe_processed=True),
]
METHODS = ["create_space", "create_room", "put_room_account_data", "put_state_event"]

# Stored titles come from markers, and a JSON decoder never yields a lone surrogate.
titles = st.text(max_size=MAX_TITLE) | st.lists(tricky, max_size=6).map("".join).map(
    lambda text: text.replace("\ud800", "")
)
args_text = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(categories=["L", "N", "P", "S", "Zs"]), max_size=60),
    st.lists(tricky, max_size=6).map("".join),
    any_text,
)


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    name = draw(st.sampled_from([*sorted(COMMANDS), ""]))
    if not name:  # one draw in eight: any other well-formed name
        name = draw(st.from_regex(NAME, fullmatch=True))
    failure = draw(st.none() | st.tuples(st.sampled_from(METHODS), st.sampled_from(ERRORS)))
    owner = draw(st.sampled_from([ALICE, BOB]))
    return {
        "parsed": ParsedCommand(name, draw(args_text)),
        # Mostly the owner, so that changes get past the guard.
        "sender": draw(st.sampled_from([owner, owner, ALICE, BOB, ADMIN])),
        "owner": owner,
        "title": draw(titles),
        "archived": draw(st.booleans()),
        "in_chat": draw(st.sampled_from([True, True, True, False])),
        "other_titles": draw(st.lists(titles, max_size=3)),
        "failure": failure,
        "prefix": draw(st.sampled_from(PREFIXES)),
    }


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))


ALLOWED_TAGS = {"p", "ul", "li", "a", "b", "code"}
# Every tag the commands write, exactly; after removing them no "<" or ">" may be left.
_KNOWN_TAG = re.compile(r'</?(?:p|ul|li|b|code)>|<a href="https://matrix\.to/#/[^"<>]*">|</a>')


def _check_html(markup: str) -> None:
    assert "<script" not in markup.lower()
    leftover = _KNOWN_TAG.sub("", markup)
    assert "<" not in leftover, leftover
    assert ">" not in leftover, leftover
    parser = _Tags()
    parser.feed(markup)
    parser.close()
    for tag, attrs in parser.tags:
        assert tag in ALLOWED_TAGS, tag
        for attr, value in attrs:
            assert (tag, attr) == ("a", "href")
            assert value is not None
            assert value.startswith("https://matrix.to/#/!"), value


@PROPERTIES
@given(scenario=scenarios())
async def test_run_command_always_answers_with_a_safe_reply(scenario: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        store = await Store.open(Path(directory) / "store.sqlite3", "@bot:example.org")
        try:
            await _run_scenario(store, scenario)
        finally:
            await store.aclose()


async def _run_scenario(store: Store, scenario: dict[str, Any]) -> None:
    parsed: ParsedCommand = scenario["parsed"]
    sender: str = scenario["sender"]
    chat = Chat(
        "c_here",
        RoomID(f"!here:{SERVER}"),
        scenario["owner"],
        scenario["title"],
        1_000,
        archived=scenario["archived"],
    )
    others = [
        Chat(f"c_{i}", RoomID(f"!other{i}:{SERVER}"), sender, title, 2_000 + i)
        for i, title in enumerate(scenario["other_titles"])
    ]
    await store.apply_chats(put=[chat, *others])
    stub = StubClient()
    if scenario["failure"] is not None:
        stub.fail_on, make_error = scenario["failure"]
        stub.error = make_error()
    settings = Settings(
        homeserver=f"https://{SERVER}",
        user_id=f"@bot:{SERVER}",
        access_token="not-a-token",
        admins=frozenset({ADMIN}),
        command_prefix=scenario["prefix"],
    )
    ctx = CommandContext(
        client=cast("MatrixClient", stub),
        store=store,
        settings=settings,
        backend_name="echo",
        room_id=chat.room_id,
        sender=sender,
        chat=chat if scenario["in_chat"] else None,
    )

    raised: MatrixAPIError | None = None
    try:
        reply = await run_command(ctx, parsed)
    except MatrixAPIError as exc:
        raised = exc
    if raised is not None:
        # An error that may pass goes to the dispatcher, which runs the command again.
        assert raised is stub.error
        assert is_transient(raised)
        event("transient error: left for the dispatcher")
        return

    assert isinstance(reply, Reply)
    assert isinstance(reply.body, str)
    assert reply.body.strip()
    event(f"{parsed.name if parsed.name in COMMANDS else 'unknown'}: {bool(reply.html)}")
    changes = parsed.name in ("rename", "archive", "unarchive")
    if changes and (ctx.chat is None or not ctx.may_change(chat)):
        # A refused change touches nothing, on the server or here.
        assert stub.calls == []
        assert store.chat_for_room(chat.room_id) == chat
    if reply.html is None:
        return
    _check_html(reply.html)
    # What the user wrote shows up in the HTML escaped, never raw.
    expected: list[str] = []
    if parsed.name in ("new", "rename"):
        expected.append(clean_title(parsed.args) if parsed.args else DEFAULT_TITLE)
    elif parsed.name == "status" and ctx.chat is not None:
        expected.append(chat.title)
    elif parsed.name == "chats":
        expected.extend(c.title for c in store.chats() if c.owner == sender)
    for text in expected:
        assert html.escape(text) in reply.html, text


@PROPERTIES
@given(body=bodies("!"), sender=st.sampled_from([ALICE, BOB]))
async def test_any_message_body_parses_and_runs_to_a_reply(body: str, sender: str) -> None:
    """The handler's path end to end: parse, then run; a `CommandError` is a reply too."""
    parsed, error = _parse(body, "!")
    if parsed is None:
        assert error is None or str(error)
        return
    with tempfile.TemporaryDirectory() as directory:
        store = await Store.open(Path(directory) / "store.sqlite3", "@bot:example.org")
        try:
            scenario = {
                "parsed": parsed,
                "sender": sender,
                "owner": ALICE,
                "title": "A chat",
                "archived": False,
                "in_chat": True,
                "other_titles": [],
                "failure": None,
                "prefix": "!",
            }
            await _run_scenario(store, scenario)
        finally:
            await store.aclose()


valid_titles = st.one_of(
    st.text(st.characters(categories=["L", "N", "P", "S", "Zs", "M"]), min_size=1, max_size=80),
    st.lists(
        st.sampled_from(["<b>x</b>", "<script>alert(1)</script>", "&amp;", "<", '"']), min_size=1
    ).map(" ".join),
)


@PROPERTIES
@given(raw=valid_titles, owner_is_admin=st.booleans())
async def test_new_and_rename_store_the_title_and_show_it_escaped(
    raw: str, owner_is_admin: bool
) -> None:
    try:
        title = clean_title(raw)
    except CommandError:
        event("title refused")
        return
    sender = ADMIN if owner_is_admin else ALICE
    chat = Chat("c_here", RoomID(f"!here:{SERVER}"), ALICE, "Old", 1_000)
    with tempfile.TemporaryDirectory() as directory:
        store = await Store.open(Path(directory) / "store.sqlite3", "@bot:example.org")
        try:
            await store.apply_chats(put=[chat])
            stub = StubClient()
            ctx = CommandContext(
                client=cast("MatrixClient", stub),
                store=store,
                settings=Settings(
                    homeserver=f"https://{SERVER}",
                    user_id=f"@bot:{SERVER}",
                    access_token="not-a-token",
                    admins=frozenset({ADMIN}),
                ),
                backend_name="echo",
                room_id=chat.room_id,
                sender=sender,
                chat=chat,
            )
            renamed = await run_command(ctx, ParsedCommand("rename", raw.strip()))
            created = await run_command(ctx, ParsedCommand("new", raw.strip()))
            stored = store.chat_for_room(chat.room_id)
            new_chats = [c for c in store.chats() if c.chat_id != chat.chat_id]
        finally:
            await store.aclose()
    for reply in (renamed, created):
        assert reply.html is not None, reply.body
        _check_html(reply.html)
        assert html.escape(title) in reply.html
    assert stored == chat.with_title(title)
    assert ("put_state_event", (chat.room_id, "m.room.name", {"name": title}, "")) in stub.calls
    [new_chat] = new_chats
    assert new_chat.title == title
    assert new_chat.owner == sender
    [create_room] = [args for name, args in stub.calls if name == "create_room"]
    assert create_room[0]["name"] == title
