"""A streamed model answer into a room: time to first visible token, to final answer, edits.

Runs the fake OpenAI-compatible server of the tests (``tests/backends/fake_openai.py``)
on loopback, generating ``--tokens`` tokens at ``--rate`` tokens per second, and the
model backend streaming into a `MatrixReplySink` whose homeserver is an
`httpx.MockTransport` answering each send after ``--latency`` seconds. For each run:

* first token: from the request to the reply event holding the first token being sent;
* final: from the request to the final edit (the whole answer) being sent;
* updates: partial texts the backend reported; edits: events sent (reply + edits + final).

Then the same answer without streaming (one message), for comparison.

    python bench/model_stream.py [--tokens 300] [--rate 50] [--interval 1.5] [--runs 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import httpx
import structlog
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "backends"))

from bot.backends.model import ModelBackend, ModelSettings
from bot.chats import Chat
from bot.messages import IncomingMessage
from bot.replies.reply_sink import MatrixReplySink, open_reply_sink
from fake_openai import FakeOpenAI
from matrix_api import MatrixClient
from matrix_api.models import EventID, RoomID, UserID

ROOM = RoomID("!bench:example.org")
SOURCE = EventID("$question")
CHAT = Chat("c_bench", ROOM, "@alice:example.org", "bench", 0)
MESSAGE = IncomingMessage(SOURCE, "@alice:example.org", "Tell me a long story.", 0)


class Room:
    """A homeserver that takes ``latency`` seconds per request and records send times."""

    def __init__(self, latency: float) -> None:
        self.latency = latency
        self.sends: list[float] = []

    async def handle(self, request: httpx.Request) -> httpx.Response:
        await trio.sleep(self.latency)
        if "/send/" in request.url.path:
            self.sends.append(time.monotonic())
            return httpx.Response(200, json={"event_id": f"$e{len(self.sends)}"})
        return httpx.Response(200, json={})

    def client(self) -> MatrixClient:
        return MatrixClient(
            "https://hs.bench",
            access_token="t",
            user_id=UserID("@bot:bench"),
            transport=httpx.MockTransport(self.handle),
        )


class CountingSink:
    """Counts the backend's partial updates before passing them on."""

    def __init__(self, inner: MatrixReplySink) -> None:
        self.inner = inner
        self.updates = 0

    async def partial(self, text: str) -> None:
        self.updates += 1
        await self.inner.partial(text)

    async def typing(self, on: bool) -> None:
        await self.inner.typing(on)


async def one_run(settings: ModelSettings, latency: float) -> dict[str, float]:
    room = Room(latency)
    async with ModelBackend(settings) as backend, room.client() as client:
        started = time.monotonic()
        async with open_reply_sink(
            client, ROOM, SOURCE, edit_interval_s=settings.edit_interval_s
        ) as sink:
            counting = CountingSink(sink)
            answer = await backend.reply_streaming(CHAT, MESSAGE, [], counting)
            await sink.finish(answer)
        done = time.monotonic()
    return {
        "first_s": room.sends[0] - started,
        "final_s": done - started,
        "updates": counting.updates,
        "events": len(room.sends),
        "chars": len(answer),
    }


async def main(args: argparse.Namespace) -> None:
    words = ["lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit"]
    answer = " ".join(words[i % len(words)] for i in range(args.tokens))
    server = FakeOpenAI(api_key="sk-bench", answer=answer, token_delay=1 / args.rate)
    async with trio.open_nursery() as nursery:
        base_url = await nursery.start(server.serve)
        values = {
            "base_url": base_url,
            "api_key": "sk-bench",
            "model": "test-model",
            "edit_interval_s": args.interval,
        }
        streamed = ModelSettings.from_mapping(values)
        whole = ModelSettings.from_mapping({**values, "stream": False})
        print(
            f"fake model: {args.tokens} tokens at {args.rate:g} tokens/s "
            f"(generation {args.tokens / args.rate:.2f} s); edit interval {args.interval:g} s; "
            f"homeserver latency {args.latency * 1000:.0f} ms per request"
        )
        runs = [await one_run(streamed, args.latency) for _ in range(args.runs)]
        print(f"streamed, {args.runs} runs (median):")
        for key, label in (
            ("first_s", "message to first visible token"),
            ("final_s", "message to final answer"),
        ):
            print(f"  {label:34s} {statistics.median(r[key] for r in runs):8.3f} s")
        updates = statistics.median(r["updates"] for r in runs)
        print(f"  {'partial updates from the model':34s} {updates:8.0f}")
        events = statistics.median(r["events"] for r in runs)
        print(f"  {'events sent (reply + edits)':34s} {events:8.0f}")
        print(f"  {'edits per answer':34s} {events - 1:8.0f}")
        single = await one_run(whole, args.latency)
        print("not streamed:")
        print(f"  {'message to the answer':34s} {single['final_s']:8.3f} s")
        print(f"  {'events sent':34s} {single['events']:8.0f}")
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--rate", type=float, default=50.0, help="tokens per second")
    parser.add_argument("--interval", type=float, default=1.5, help="edit interval, seconds")
    parser.add_argument("--latency", type=float, default=0.02, help="homeserver latency, s")
    parser.add_argument("--runs", type=int, default=3)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    trio.run(main, parser.parse_args())
