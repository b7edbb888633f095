"""Per-room lanes on the mock clock: a room's messages in order, no room waiting for
another, backend calls bounded and served in turn, commands never behind the backend."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import trio

from bot.chats import Chat, marker_content
from bot.config import Settings
from bot.messages import IncomingMessage
from fake_homeserver import ALICE, FakeHomeserver, text_event
from ordering_harness import chat, reply_to, running_bot, seed_store, until_handled


@dataclass
class RecordingBackend:
    """Answers after ``seconds[room]`` (else ``default_s``) of virtual time; records
    each call's room, body, start and end, and the most calls ever at once."""

    default_s: float = 1.0
    seconds: dict[str, float] = field(default_factory=dict)
    calls: list[tuple[str, str, float, float]] = field(default_factory=list)
    running: int = 0
    most_at_once: int = 0
    name: str = "recording"

    async def reply(self, chat: Chat, message: IncomingMessage) -> str:
        started = trio.current_time()
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            await trio.sleep(self.seconds.get(chat.room_id, self.default_s))
        finally:
            self.running -= 1
        self.calls.append((chat.room_id, message.body, started, trio.current_time()))
        return f"re: {message.body}"


async def _rooms(settings: Settings, hs: FakeHomeserver, count: int) -> list[str]:
    chats = [chat(f"c{n}", f"!room{n}:hs.test") for n in range(count)]
    await seed_store(settings.store_path, chats=chats, token="s0")
    for one in chats:
        hs.add_room(one.room_id, marker=marker_content(one))
    return [one.room_id for one in chats]


def _message_id(room: str, n: int) -> str:
    return f"${room[1:].split(':')[0]}-{n}"


async def test_a_slow_answer_in_one_room_delays_no_other_room(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, settings: Settings
) -> None:
    rooms = await _rooms(settings, hs, 16)
    slow = rooms[0]
    backend = RecordingBackend(default_s=0.2, seconds={slow: 8.0})
    async with running_bot(settings, hs, backend=backend) as bot:
        hs.queue_sync({room: [text_event(_message_id(room, 1), ALICE, "hi")] for room in rooms})
        asked = trio.current_time()
        await hs.wait_for(reply_to(_message_id(slow, 1)), ended=True)
        await until_handled(bot.store, *[_message_id(room, 1) for room in rooms])

    replied = {sent.room_id: sent.at - asked for sent in hs.sent}
    assert set(replied) == set(rooms)
    assert replied[slow] >= 8.0
    # Every other room's answer took its own 0.2 s, not a turn after the slow one.
    assert all(replied[room] < 1.0 for room in rooms[1:]), replied
    assert [sent.room_id for sent in hs.sent][-1] == slow


async def test_each_rooms_messages_in_order_while_rooms_run_side_by_side(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, settings: Settings
) -> None:
    rooms = await _rooms(settings, hs, 4)
    backend = RecordingBackend(default_s=1.0)
    ids = {room: [_message_id(room, n) for n in range(5)] for room in rooms}
    async with running_bot(settings, hs, backend=backend) as bot:
        hs.queue_sync(
            {
                room: [text_event(eid, ALICE, f"{room[1:]} {n}") for n, eid in enumerate(ids[room])]
                for room in rooms
            }
        )
        asked = trio.current_time()
        await until_handled(bot.store, *[eid for room in rooms for eid in ids[room]])
        took = trio.current_time() - asked

    for room in rooms:
        assert [sent.reply_to for sent in hs.sent_in(room)] == ids[room]
        calls = [call for call in backend.calls if call[0] == room]
        assert [body for _, body, _, _ in calls] == [f"{room[1:]} {n}" for n in range(5)]
        # One at a time within the room.
        assert all(later[2] >= earlier[3] for earlier, later in itertools.pairwise(calls))
    assert backend.most_at_once == 4
    assert took < 6.0  # five answers of 1 s in each room, the rooms side by side


async def test_backend_calls_stay_within_the_limit_and_busy_rooms_take_turns(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, settings: Settings
) -> None:
    settings = replace(settings, max_concurrent_answers=2)
    rooms = await _rooms(settings, hs, 6)
    backend = RecordingBackend(default_s=1.0)
    ids = [_message_id(room, n) for room in rooms for n in range(3)]
    async with running_bot(settings, hs, backend=backend) as bot:
        hs.queue_sync(
            {
                room: [text_event(_message_id(room, n), ALICE, f"m{n}") for n in range(3)]
                for room in rooms
            }
        )
        await until_handled(bot.store, *ids)

    assert backend.most_at_once == 2
    assert len(backend.calls) == 18
    # Every room's first message is answered before any room's second, and so on:
    # a room with more to say queues again behind the others.
    rounds = [[body for _, body, _, _ in backend.calls[i : i + 6]] for i in range(0, 18, 6)]
    assert rounds == [["m0"] * 6, ["m1"] * 6, ["m2"] * 6]
    assert [sorted({room for room, _, _, _ in backend.calls[i : i + 6]}) for i in (0, 6, 12)] == [
        sorted(rooms)
    ] * 3


async def test_commands_and_other_rooms_commands_never_wait_for_a_backend_slot(
    autojump_clock: trio.abc.Clock, hs: FakeHomeserver, settings: Settings
) -> None:
    settings = replace(settings, max_concurrent_answers=1)
    busy, waiting, commanding = await _rooms(settings, hs, 3)
    backend = RecordingBackend(default_s=1.0, seconds={busy: 60.0})
    async with running_bot(settings, hs, backend=backend) as bot:
        hs.queue_sync({busy: [text_event("$slow", ALICE, "think hard")]})
        while backend.running == 0:  # noqa: ASYNC110 - the backend tells no one
            await trio.sleep(0.1)
        # The busy room holds the only slot.
        hs.queue_sync(
            {
                waiting: [text_event("$queued", ALICE, "me next")],
                commanding: [text_event("$help", ALICE, "!help")],
            }
        )
        asked = trio.current_time()
        # Waiting for the sends, not polling the store: these waits are long in virtual time.
        helped = await hs.wait_for(reply_to("$help"), ended=True)
        assert backend.calls == []  # the slow answer still holds the slot
        queued = await hs.wait_for(reply_to("$queued"), ended=True)
        await until_handled(bot.store, "$slow", "$queued", "$help")

    assert helped.at - asked < 1.0
    assert queued.at - asked > 55.0  # its turn came when the slow answer was done
    assert [room for room, _, _, _ in backend.calls] == [busy, waiting]
    assert backend.most_at_once == 1
