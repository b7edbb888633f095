"""The edit throttler on the mock clock: exact virtual times, no real waiting."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from bot.replies.throttle import EditThrottler, open_edit_throttler


class Edits:
    """A send_edit that records (time, text, final) and may take a while."""

    def __init__(self, duration: float = 0.0) -> None:
        self.duration = duration
        self.sent: list[tuple[float, str, bool]] = []

    async def __call__(self, text: str, final: bool) -> None:
        started = trio.current_time()
        await trio.sleep(self.duration)
        self.sent.append((started, text, final))

    @property
    def times(self) -> list[float]:
        return [round(at, 6) for at, _, _ in self.sent]


async def test_updates_are_coalesced_to_one_edit_per_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    edits = Edits()
    start = trio.current_time()
    async with open_edit_throttler(edits, 1.0) as throttle:
        text = ""
        for i in range(35):  # a token every 0.1 s for 3.5 s
            text += f"t{i} "
            await throttle.update(text)
            await trio.sleep(0.1)
        await throttle.finish(text)
    times = [round(t - start, 6) for t in edits.times]
    assert times == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert [final for _, _, final in edits.sent] == [False] * 4 + [True]
    # each partial edit shows the newest text at the time it was sent
    assert edits.sent[1][1].endswith("t10 ")
    assert edits.sent[-1][1] == text
    assert throttle.partial_edits == 4
    assert throttle.finished


async def test_the_final_edit_waits_out_the_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    edits = Edits()
    start = trio.current_time()
    async with open_edit_throttler(edits, 2.0) as throttle:
        await throttle.update("a")
        await trio.sleep(0.5)
        await throttle.update("ab")
        await throttle.finish("abc")
    assert [(round(t - start, 6), text, final) for t, text, final in edits.sent] == [
        (0.0, "a", False),
        (2.0, "abc", True),  # "ab" was superseded by the final text
    ]


async def test_without_updates_the_final_edit_is_immediate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    edits = Edits()
    start = trio.current_time()
    async with open_edit_throttler(edits, 5.0) as throttle:
        await throttle.finish("whole answer")
    assert edits.sent == [(start, "whole answer", True)]


async def test_a_slow_send_is_never_overlapped(autojump_clock: trio.testing.MockClock) -> None:
    edits = Edits(duration=2.5)
    start = trio.current_time()
    async with open_edit_throttler(edits, 1.0) as throttle:
        for i in range(30):
            await throttle.update(str(i))
            await trio.sleep(0.1)
        await throttle.finish("done")
    times = [round(t - start, 6) for t in edits.times]
    # starts 2.5 s apart (the send's own duration), never two at once, final last
    assert times == [0.0, 2.5, 5.0]
    assert edits.sent[-1][1:] == ("done", True)
    assert [text for _, text, _ in edits.sent[:-1]] == ["0", "24"]


async def test_an_unchanged_text_is_not_sent_again(autojump_clock: trio.testing.MockClock) -> None:
    edits = Edits()
    async with open_edit_throttler(edits, 1.0) as throttle:
        await throttle.update("same")
        await trio.sleep(1.5)
        await throttle.update("same")
        await trio.sleep(1.5)
        await throttle.finish("same")
    assert [(text, final) for _, text, final in edits.sent] == [("same", False), ("same", True)]


async def test_finish_is_once_and_later_updates_are_ignored(
    autojump_clock: trio.testing.MockClock,
) -> None:
    edits = Edits()
    async with open_edit_throttler(edits, 1.0) as throttle:
        await throttle.finish("one")
        await throttle.finish("two")
        await throttle.update("three")
        await trio.sleep(5)
    assert [text for _, text, _ in edits.sent] == ["one"]


async def test_leaving_without_finish_sends_nothing_final(
    autojump_clock: trio.testing.MockClock,
) -> None:
    edits = Edits(duration=1.0)

    async def broken_answer() -> None:
        async with open_edit_throttler(edits, 1.0) as throttle:
            await throttle.update("partial")
            await trio.sleep(0.5)
            raise RuntimeError("backend broke")

    with pytest.raises(RuntimeError, match="backend broke"):
        await broken_answer()
    assert edits.sent == []  # the edit in flight was cancelled, no final edit


async def test_run_in_the_callers_nursery(autojump_clock: trio.testing.MockClock) -> None:
    edits = Edits()
    throttle = EditThrottler(edits, 0.5)
    async with trio.open_nursery() as nursery:
        await nursery.start(throttle.run)
        await throttle.update("x")
        await trio.sleep(0.1)
        await throttle.update("xy")
        await throttle.finish("xyz")
    assert [(round(t, 6), text) for t, text, _ in edits.sent][-1] == (
        round(edits.sent[0][0] + 0.5, 6),
        "xyz",
    )


def test_interval_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="negative"):
        EditThrottler(Edits(), -1)
