"""Security under fire: two bots in one room with a stranger, and hostile message
bodies and command arguments (with the check that the bot's HTML carries no injection).
"""

from __future__ import annotations

import time
from functools import partial
from html.parser import HTMLParser
from typing import Any
from urllib.parse import quote

import httpx
import trio

from bot.handler import FAILED_NOTICE
from bot.messages import in_reply_to
from faults.harness.figures import Figures, figures
from faults.harness.lab import FaultLab, managed_rooms, stage
from faults.harness.tasks import background
from faults.harness.traffic import Sent, Traffic, audit
from matrix_api import (
    MatrixClient,
    MatrixError,
    new_txn_id,
)
from matrix_api.models import EventID, RoomID
from matrix_api.testing.synapse import SynapseServer


async def run_two_bots(lab: FaultLab, hs: SynapseServer, *, messages: int = 5) -> Figures:
    """Two bots (two accounts, two processes) in one room with their owner and a
    stranger they do not serve: each of the owner's messages is answered once by each
    bot; the bots never answer each other, nor the stranger."""
    bots = [await lab.user(hs, "bot-a"), await lab.user(hs, "bot-b")]
    owner = await lab.user(hs, "owner")
    stranger = await lab.user(hs, "stranger")
    (room,) = await managed_rooms(hs.base_url, bots, owner, 1, members=[stranger])
    processes = [
        lab.bot(
            hs.base_url,
            b.user_id,
            access_token=b.access_token,
            name=f"bot{i}",
            allowed=[owner.user_id],
        )
        for i, b in enumerate(bots)
    ]
    for process in processes:
        await process.start()
    for process in processes:
        await process.wait_ready()
    traffic = Traffic([b.user_id for b in bots])
    sender = lab.client(hs.base_url, owner)
    as_stranger = lab.client(hs.base_url, stranger)
    async with background(partial(traffic.collect, lab.client(hs.base_url, owner))):
        ignored = [
            await traffic.send(as_stranger, room, "hello bots, answer me"),
            await traffic.send(as_stranger, room, "!help"),
        ]
        for index in range(messages):
            await traffic.send(sender, room, f"to both bots {index}")
        ours = [x.event_id for x in traffic.sent if x.sender == owner.user_id]
        await traffic.wait_answered(ours, timeout=60)
        await trio.sleep(5.0)  # long enough for a loop to show
    timelines = await audit(lab.client(hs.base_url, owner), [room])
    owner_sent = [x for x in traffic.sent if x.sender == owner.user_id]
    per_bot = [figures("", owner_sent, timelines, b.user_id) for b in bots]
    notices = [e for e in timelines[room] if e.sender in traffic.bots]
    targets = [in_reply_to(e) for e in notices]
    bot_events = {e.event_id for e in notices}
    result = Figures(
        "sec: two bots",
        sent=len(owner_sent),
        answered_once=min(f.answered_once for f in per_bot),
        lost=max(f.lost for f in per_bot),
        duplicated=max(f.duplicated for f in per_bot),
        notes={
            "bot_notices": len(notices),
            "answers_to_bots": sum(1 for t in targets if t in bot_events),
            "answers_to_stranger": sum(1 for t in targets if t in ignored),
        },
    )
    result.details.update(processes=processes, notices=notices)
    return result


def hostile_contents(big: int) -> list[tuple[str, dict[str, Any], bool]]:
    """(label, content, answered?) for the hostile messages of the security check."""
    injection = "<img src=x onerror=alert(1)>"
    return [
        ("big body", {"msgtype": "m.text", "body": "x" * big}, True),
        (
            "control characters",
            {
                "msgtype": "m.text",
                "body": "ctl \x00\x01\x07\x08\x0b\x0c\x1b[31mred\x1b[0m\x7f\x85 end",
            },
            True,
        ),
        (
            "bidi overrides",
            {"msgtype": "m.text", "body": "bidi \u202egnp.exe\u202c \u2066x\u2069\u200f"},
            True,
        ),
        (
            "html in body",
            {"msgtype": "m.text", "body": f"{injection}<script>alert(2)</script>"},
            True,
        ),
        (
            "html in formatted_body",
            {
                "msgtype": "m.text",
                "body": "look at this",
                "format": "org.matrix.custom.html",
                "formatted_body": f'{injection}<a href="javascript:alert(1)">x</a>',
            },
            True,
        ),
        ("markdown", {"msgtype": "m.text", "body": "[click](javascript:alert(1)) **b** `c`"}, True),
        ("emote", {"msgtype": "m.emote", "body": f"waves {injection}"}, True),
        (
            "reply fallback",
            {"msgtype": "m.text", "body": "> <@x:y> " + injection + "\n\nreal"},
            True,
        ),
        ("!new with html", {"msgtype": "m.text", "body": f"!new {injection}"}, True),
        ("!help with html", {"msgtype": "m.text", "body": "!help <script>alert(1)</script>"}, True),
        ("!chats", {"msgtype": "m.text", "body": "!chats"}, True),
        ("!status", {"msgtype": "m.text", "body": "!status"}, True),
        ("!new with bidi", {"msgtype": "m.text", "body": "!new abc\u202edcba"}, True),
        ("!new with NUL", {"msgtype": "m.text", "body": "!new a\x00b"}, True),
        ("long command", {"msgtype": "m.text", "body": "!" + "a" * 3000}, True),
        ("body not a string", {"msgtype": "m.text", "body": {"html": injection}}, False),
        ("no body", {"msgtype": "m.text"}, False),
    ]


class _HTMLAudit(HTMLParser):
    """Collects what in a piece of HTML could run or load something."""

    _DANGEROUS_TAGS = frozenset({"img", "script", "iframe", "object", "embed", "style", "svg"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.problems: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._DANGEROUS_TAGS:
            self.problems.append(f"<{tag}>")
        for name, value in attrs:
            if name.startswith("on"):
                self.problems.append(f"{tag} {name}=")
            if name in ("href", "src") and (value or "").strip().lower().startswith("javascript:"):
                self.problems.append(f"{tag} {name}=javascript:")


def html_problems(formatted: str) -> list[str]:
    """Elements and attributes of ``formatted`` that carry an injection through."""
    audit = _HTMLAudit()
    audit.feed(formatted)
    audit.close()
    return audit.problems


async def _largest_accepted_body(client: MatrixClient, room: RoomID) -> tuple[int, EventID]:
    for size in range(64 * 1024, 32 * 1024, -512):
        try:
            event_id = await client.send_event(
                room, "m.room.message", {"msgtype": "m.text", "body": "x" * size}, new_txn_id()
            )
        except MatrixError as exc:
            if exc.status == 413:
                continue
            raise
        return size, event_id
    raise AssertionError("Synapse refused every body above 32 KiB")


async def run_hostile_bodies(lab: FaultLab, hs: SynapseServer) -> Figures:
    """Hostile message bodies and command arguments: the bot never crashes, answers
    each text once, and its HTML never carries the injection through."""
    s = await stage(lab, hs, rooms=1)
    bot = await lab.ready_bot(s)
    room = s.rooms[0]
    expected: list[EventID] = []
    unanswered: list[EventID] = []
    refused: dict[str, int] = {}
    async with background(partial(s.traffic.collect, s.observer)):
        big, big_id = await _largest_accepted_body(s.sender, room)
        s.traffic.sent.append(Sent(big_id, room, s.owner.user_id, 0, time.time()))
        expected.append(big_id)
        for label, content, answered in hostile_contents(big)[1:]:
            try:
                event_id = await s.traffic.send(s.sender, room, content=content)
            except MatrixError as exc:
                refused[label] = exc.status  # the homeserver would not take it
                continue
            (expected if answered else unanswered).append(event_id)
        # A lone surrogate escape, as raw JSON (impossible to send through our client).
        async with httpx.AsyncClient(base_url=hs.base_url, timeout=30) as http:
            raw = await http.put(
                f"/_matrix/client/v3/rooms/{quote(room)}/send/m.room.message/{new_txn_id()}",
                content=rb'{"msgtype": "m.text", "body": "lone \ud800 surrogate"}',
                headers={
                    "Authorization": f"Bearer {s.owner.access_token}",
                    "Content-Type": "application/json",
                },
            )
        surrogate_status = raw.status_code
        if raw.status_code == 200:
            expected.append(raw.json()["event_id"])
        tail = await s.traffic.send(s.sender, room, "still there?")
        expected.append(tail)
        await s.traffic.wait_answered(expected, timeout=90)
        await trio.sleep(3.0)
        alive = bot.running
    timelines = await audit(s.observer, s.rooms)
    sent = [x for x in s.traffic.sent if x.event_id in set(expected)]
    result = figures("sec: hostile bodies", sent, timelines, bot.user_id)
    notices = [e for e in timelines[room] if e.sender == bot.user_id]
    formatted = [e.content["formatted_body"] for e in notices if "formatted_body" in e.content]
    leaking = [html for html in formatted if html_problems(str(html))]
    answers_to_ignored = [e for e in notices if in_reply_to(e) in set(unanswered)]
    big_answer = [e for e in notices if in_reply_to(e) == big_id]
    result.notes.update(
        big_body=big,
        big_answer=(
            "echo"
            if big_answer and big_answer[0].content.get("body") != FAILED_NOTICE
            else "failure notice"
        ),
        lone_surrogate_put=surrogate_status,
        refused_by_synapse=refused or "none",
        html_replies=len(formatted),
        html_leaks=len(leaking),
    )
    result.details.update(
        bot=bot, alive=alive, leaking=leaking, answers_to_ignored=answers_to_ignored
    )
    return result
