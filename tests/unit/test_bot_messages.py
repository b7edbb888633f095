"""bot.messages: which events are answered, and the shape of the bot's answers."""

from __future__ import annotations

from typing import Any

import pytest

from bot.messages import (
    MAX_BODY,
    IncomingMessage,
    escape,
    in_reply_to,
    is_actionable,
    is_encryption_event,
    malformed,
    notice,
    parse_incoming,
    reply_txn_id,
    strip_reply_fallback,
    thread_root,
)
from matrix_api.models import EventID, RoomEvent, UserID

BOT = "@bot:example.org"
ALICE = "@alice:example.org"


def event(
    content: dict[str, Any],
    *,
    sender: str = ALICE,
    type: str = "m.room.message",
    unsigned: dict[str, Any] | None = None,
    state_key: str | None = None,
) -> RoomEvent:
    return RoomEvent(
        type=type,
        event_id=EventID("$ev"),
        sender=UserID(sender),
        origin_server_ts=1234,
        content=content,
        state_key=state_key,
        unsigned=unsigned or {},
    )


def text(body: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"msgtype": "m.text", "body": body, **extra}


# --- parse_incoming ----------------------------------------------------------------------


def test_a_text_message_is_answered() -> None:
    assert parse_incoming(event(text("hello")), BOT) == IncomingMessage(
        event_id=EventID("$ev"), sender=ALICE, body="hello", origin_server_ts=1234
    )


def test_an_emote_is_answered() -> None:
    message = parse_incoming(event({"msgtype": "m.emote", "body": "waves"}), BOT)

    assert message is not None
    assert message.body == "waves"


@pytest.mark.parametrize(
    "ev",
    [
        pytest.param(event(text(), sender=BOT), id="own-message"),
        pytest.param(event({"msgtype": "m.notice", "body": "beep"}), id="notice"),
        pytest.param(
            event(
                text(
                    "* fixed",
                    **{
                        "m.new_content": text("fixed"),
                        "m.relates_to": {"rel_type": "m.replace", "event_id": "$orig"},
                    },
                )
            ),
            id="edit",
        ),
        pytest.param(
            event({}, unsigned={"redacted_because": {"type": "m.room.redaction"}}),
            id="redacted",
        ),
        pytest.param(
            event(text(), unsigned={"redacted_because": {"type": "m.room.redaction"}}),
            id="redacted-with-content",
        ),
        pytest.param(event({"body": "no msgtype"}), id="no-msgtype"),
        pytest.param(event({"msgtype": "m.text"}), id="no-body"),
        pytest.param(event({"msgtype": "m.text", "body": 42}), id="body-not-text"),
        pytest.param(event({"msgtype": "m.text", "body": None}), id="body-null"),
        pytest.param(
            event({"membership": "join"}, type="m.room.member", state_key=ALICE), id="member"
        ),
        pytest.param(event(text(), type="m.room.encrypted"), id="encrypted"),
        pytest.param(event(text(), type="m.sticker"), id="sticker"),
    ],
)
def test_events_the_bot_must_not_answer(ev: RoomEvent) -> None:
    assert parse_incoming(ev, BOT) is None


def test_another_bots_text_is_answered_only_if_it_is_not_a_notice() -> None:
    other_bot = "@otherbot:example.org"

    assert parse_incoming(event(text(), sender=other_bot), BOT) is not None
    assert (
        parse_incoming(event({"msgtype": "m.notice", "body": "x"}, sender=other_bot), BOT) is None
    )


def test_a_thread_or_annotation_relation_is_not_an_edit() -> None:
    threaded = text("in a thread", **{"m.relates_to": {"rel_type": "m.thread", "event_id": "$r"}})

    assert parse_incoming(event(threaded), BOT) is not None


def test_a_rich_reply_loses_its_fallback() -> None:
    content = text(
        "> <@bot:example.org> the previous answer\n> second line\n\nand my follow-up",
        **{"m.relates_to": {"m.in_reply_to": {"event_id": "$prev"}}},
    )

    message = parse_incoming(event(content), BOT)

    assert message is not None
    assert message.body == "and my follow-up"


def test_a_quote_in_a_plain_message_is_kept() -> None:
    message = parse_incoming(event(text("> a quote\n\nmy words")), BOT)

    assert message is not None
    assert message.body == "> a quote\n\nmy words"


def test_a_long_body_is_cut() -> None:
    message = parse_incoming(event(text("x" * (MAX_BODY + 10))), BOT)

    assert message is not None
    assert len(message.body) == MAX_BODY


# --- replies ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "stripped"),
    [
        ("> <@a:b> quoted\n\nanswer", "answer"),
        ("> <@a:b> quoted\n> more\nanswer", "answer"),
        ("> <@a:b> one\n>\n> two\n\nline 1\nline 2", "line 1\nline 2"),
        ("> <@a:b> only a quote", ""),
        ("plain", "plain"),
        ("", ""),
        (">no space is not a fallback\n\nx", ">no space is not a fallback\n\nx"),
        ("text\n> quote later", "text\n> quote later"),
        ("> <@a:b> q\n\n\nkept blank", "\nkept blank"),
    ],
)
def test_strip_reply_fallback(body: str, stripped: str) -> None:
    assert strip_reply_fallback(body) == stripped


@pytest.mark.parametrize(
    ("content", "target"),
    [
        ({"m.relates_to": {"m.in_reply_to": {"event_id": "$e"}}}, "$e"),
        ({"m.relates_to": {"m.in_reply_to": {"event_id": 5}}}, None),
        ({"m.relates_to": {"m.in_reply_to": "$e"}}, None),
        ({"m.relates_to": {"rel_type": "m.replace", "event_id": "$e"}}, None),
        ({"m.relates_to": "$e"}, None),
        ({}, None),
    ],
)
def test_in_reply_to(content: dict[str, Any], target: str | None) -> None:
    assert in_reply_to(event(content)) == target


def test_a_plain_notice_mentions_no_one() -> None:
    assert notice("hi") == {"msgtype": "m.notice", "body": "hi", "m.mentions": {}}


def test_a_notice_that_names_a_user_in_its_body_still_mentions_no_one() -> None:
    # Without m.mentions a client would match the body against the user's id and name.
    content = notice("@alice:example.org asked @room about it", reply_to=EventID("$q"))
    assert content["m.mentions"] == {}


def test_a_notice_meant_to_notify_mentions_exactly_that_user() -> None:
    content = notice("slow down", reply_to=EventID("$q"), mention="@alice:example.org")
    assert content["m.mentions"] == {"user_ids": ["@alice:example.org"]}


def test_a_notice_replying_to_an_event() -> None:
    content = notice("answer", reply_to=EventID("$question"))

    assert content == {
        "msgtype": "m.notice",
        "body": "answer",
        # A reply, yet it does not notify the sender it answers.
        "m.mentions": {},
        "m.relates_to": {"m.in_reply_to": {"event_id": "$question"}},
    }
    # The bot reads its own replies back this way after losing its store.
    assert in_reply_to(event(content, sender=BOT)) == "$question"


def test_a_formatted_notice() -> None:
    content = notice("<b>", reply_to=EventID("$q"), formatted_body=f"<b>{escape('<b>')}</b>")

    assert content["format"] == "org.matrix.custom.html"
    assert content["formatted_body"] == "<b>&lt;b&gt;</b>"
    assert content["body"] == "<b>"
    assert content["m.relates_to"] == {"m.in_reply_to": {"event_id": "$q"}}


def test_no_html_is_derived_from_plain_text() -> None:
    assert "formatted_body" not in notice("<script>")


def test_the_bots_notices_are_never_answered() -> None:
    assert parse_incoming(event(notice("x", reply_to=EventID("$q"))), BOT) is None


# --- transaction ids ---------------------------------------------------------------------------


def test_reply_txn_id_is_deterministic() -> None:
    assert reply_txn_id("$abc") == reply_txn_id("$abc") == reply_txn_id("$abc", "reply")


def test_reply_txn_id_differs_by_event_and_purpose() -> None:
    ids = {
        reply_txn_id(event_id, purpose)
        for event_id in ("$a", "$b", "$a/b+c")
        for purpose in ("reply", "repair", "failure", "greeting")
    }

    assert len(ids) == 12


def test_reply_txn_id_does_not_confuse_purpose_and_event() -> None:
    # The separator keeps "ab" + "c" apart from "a" + "bc".
    assert reply_txn_id("c", "ab") != reply_txn_id("bc", "a")


def test_reply_txn_id_is_a_safe_path_segment() -> None:
    txn_id = reply_txn_id("$weird/event+id==", "reply")

    assert txn_id.startswith("sb.reply.")
    assert all(ch.isalnum() or ch == "." for ch in txn_id)
    assert len(txn_id) < 64


# --- encryption -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ev", "expected"),
    [
        pytest.param(
            event({"algorithm": "m.megolm.v1.aes-sha2"}, type="m.room.encrypted"),
            True,
            id="encrypted-message",
        ),
        pytest.param(
            event({"algorithm": "m.megolm.v1.aes-sha2"}, type="m.room.encryption", state_key=""),
            True,
            id="encryption-turned-on",
        ),
        pytest.param(
            event({"algorithm": "x"}, type="m.room.encryption", state_key="odd"),
            False,
            id="encryption-with-a-state-key",
        ),
        pytest.param(
            event({"algorithm": "x"}, type="m.room.encrypted", sender=BOT), False, id="own"
        ),
        pytest.param(event(text()), False, id="plain-text"),
    ],
)
def test_is_encryption_event(ev: RoomEvent, expected: bool) -> None:
    assert is_encryption_event(ev, BOT) is expected


@pytest.mark.parametrize(
    ("ev", "expected"),
    [
        pytest.param(event(text()), True, id="text"),
        pytest.param(event({"algorithm": "x"}, type="m.room.encrypted"), True, id="encrypted"),
        pytest.param(event({"msgtype": "m.notice", "body": "x"}), False, id="notice"),
        pytest.param(event(text(), sender=BOT), False, id="own"),
    ],
)
def test_is_actionable(ev: RoomEvent, expected: bool) -> None:
    assert is_actionable(ev, BOT) is expected


@pytest.mark.parametrize(
    ("content", "body"),
    [
        ({"msgtype": "m.image", "body": "cat.png", "url": "mxc://x/y"}, "[image: cat.png]"),
        ({"msgtype": "m.file", "body": "a.pdf"}, "[file: a.pdf]"),
        (
            {"msgtype": "m.image", "body": "what is it?", "filename": "c.png", "url": 7},
            "[image: c.png]\nwhat is it?",
        ),
        ({"msgtype": "m.video", "body": None, "url": "https://x/y"}, "[file: attachment]"),
    ],
)
def test_images_and_files_are_answered_with_their_attachment(
    content: dict[str, object], body: str
) -> None:
    # Even an unreadable one: the user is told what the bot reads (bot.attachments).
    message = parse_incoming(event(content), BOT)
    assert message is not None
    assert message.body == body
    assert message.attachment is not None


# --- threads -----------------------------------------------------------------------------


def in_thread(root: Any, **relation: Any) -> dict[str, Any]:
    return text(
        "in a thread", **{"m.relates_to": {"rel_type": "m.thread", "event_id": root, **relation}}
    )


def test_a_message_in_a_thread_names_its_root() -> None:
    content = in_thread("$root", is_falling_back=True, **{"m.in_reply_to": {"event_id": "$prev"}})

    message = parse_incoming(event(content), BOT)

    assert message is not None
    assert message.thread_root == "$root"
    assert message.body == "in a thread"
    assert thread_root(event(content)) == "$root"
    assert malformed(event(content), BOT) is None


def test_main_timeline_messages_and_other_relations_are_in_no_thread() -> None:
    reply_only = text("re", **{"m.relates_to": {"m.in_reply_to": {"event_id": "$x"}}})
    annotation = text("hm", **{"m.relates_to": {"rel_type": "m.reference", "event_id": "$x"}})

    for content in (text("plain"), reply_only, annotation):
        message = parse_incoming(event(content), BOT)
        assert message is not None
        assert message.thread_root is None


def test_an_image_in_a_thread_is_answered_in_it() -> None:
    content = {
        "msgtype": "m.image",
        "body": "cat.png",
        "url": "mxc://example.org/cat",
        "m.relates_to": {"rel_type": "m.thread", "event_id": "$root"},
    }

    message = parse_incoming(event(content), BOT)

    assert message is not None
    assert message.attachment is not None
    assert message.thread_root == "$root"


@pytest.mark.parametrize(
    "root",
    [
        None,
        42,
        ["$root"],
        {"event_id": "$root"},
        "",
        "root-without-dollar",
        "$" + "x" * 255,
        "$é" * 128,
        "$\ud800",
    ],
)
def test_a_thread_relation_without_a_root_is_malformed_and_not_answered(root: Any) -> None:
    content = in_thread(root)
    if root is None:
        del content["m.relates_to"]["event_id"]

    assert malformed(event(content), BOT) == "m.thread relation without an event id for its root"
    assert parse_incoming(event(content), BOT) is None
    assert thread_root(event(content)) is None


def test_the_longest_event_id_is_a_root() -> None:
    root = "$" + "x" * 254

    message = parse_incoming(event(in_thread(root)), BOT)

    assert message is not None
    assert message.thread_root == root


def test_a_notice_in_a_thread_carries_the_thread_and_the_reply_fallback() -> None:
    content = notice("answer", reply_to=EventID("$question"), thread=EventID("$root"))

    assert content["m.relates_to"] == {
        "rel_type": "m.thread",
        "event_id": "$root",
        "is_falling_back": True,
        "m.in_reply_to": {"event_id": "$question"},
    }
    # The bot's own answers are found again by the event they reply to.
    answer = event(content, sender=BOT)
    assert in_reply_to(answer) == "$question"
    assert thread_root(answer) == "$root"
    assert parse_incoming(answer, BOT) is None


def test_a_notice_outside_threads_has_no_thread_relation() -> None:
    content = notice("answer", reply_to=EventID("$question"))

    assert content["m.relates_to"] == {"m.in_reply_to": {"event_id": "$question"}}
