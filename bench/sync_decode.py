"""Decode a synthetic initial /sync into the typed models; compare with json.loads.

The response has 1,000 joined rooms with 20 timeline events each, plus the usual
state and account data of a bot's rooms. Prints MB/s and events/s for both.

    python bench/sync_decode.py [--rooms 1000] [--events 20] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from matrix_api.models import decode_sync


def synthetic_sync(rooms: int, events_per_room: int) -> bytes:
    join: dict[str, Any] = {}
    for r in range(rooms):
        room_id = f"!room{r:05d}:example.org"
        state = [
            {
                "type": "m.room.create",
                "state_key": "",
                "sender": "@bot:example.org",
                "event_id": f"$create{r}",
                "origin_server_ts": 1_700_000_000_000,
                "content": {"room_version": "11", "creator": "@bot:example.org"},
            },
            {
                "type": "m.room.member",
                "state_key": "@alice:example.org",
                "sender": "@alice:example.org",
                "event_id": f"$member{r}",
                "origin_server_ts": 1_700_000_000_001,
                "content": {"membership": "join", "displayname": "Alice"},
            },
            {
                "type": "m.room.name",
                "state_key": "",
                "sender": "@bot:example.org",
                "event_id": f"$name{r}",
                "origin_server_ts": 1_700_000_000_002,
                "content": {"name": f"Chat number {r}"},
            },
        ]
        timeline = [
            {
                "type": "m.room.message",
                "sender": "@alice:example.org" if e % 2 == 0 else "@bot:example.org",
                "event_id": f"$ev{r}_{e}/abcdefghijklmnop+qrstuv",
                "origin_server_ts": 1_700_000_001_000 + e,
                "content": {
                    "msgtype": "m.text" if e % 2 == 0 else "m.notice",
                    "body": f"message {e} in room {r}: " + "lorem ipsum dolor sit amet " * 3,
                },
                "unsigned": {"age": 1234, "transaction_id": f"txn{e}"},
            }
            for e in range(events_per_room)
        ]
        join[room_id] = {
            "state": {"events": state},
            "timeline": {"events": timeline, "limited": True, "prev_batch": f"t{r}-prev"},
            "account_data": {
                "events": [
                    {
                        "type": "org.surfaces.chat",
                        "content": {"chat_id": f"chat-{r}", "owner": "@alice:example.org"},
                    }
                ]
            },
            "ephemeral": {"events": []},
            "summary": {"m.joined_member_count": 2},
            "unread_notifications": {"highlight_count": 0, "notification_count": 3},
        }
    body = {
        "next_batch": "s123_456_789",
        "rooms": {"join": join, "invite": {}, "leave": {}},
        "account_data": {"events": [{"type": "m.push_rules", "content": {}}]},
        "presence": {"events": []},
    }
    return json.dumps(body).encode()


def measure(label: str, fn: Any, body: bytes, events: int, repeat: int) -> None:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn(body)
        best = min(best, time.perf_counter() - start)
    mb = len(body) / 1e6
    print(
        f"{label:<28} {best * 1000:8.1f} ms  {mb / best:8.1f} MB/s  {events / best:12,.0f} events/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rooms", type=int, default=1000)
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    body = synthetic_sync(args.rooms, args.events)
    # Timeline plus state and account data: every event the decoder must type.
    events = args.rooms * (args.events + 3 + 1)
    parsed = decode_sync(body)
    assert len(parsed.rooms.join) == args.rooms
    assert not parsed.skipped
    print(
        f"synthetic initial /sync: {args.rooms} rooms x {args.events} timeline events, "
        f"{len(body) / 1e6:.1f} MB, {events:,} events (best of {args.repeat})"
    )
    measure("json.loads (untyped)", json.loads, body, events, args.repeat)
    measure("decode_sync (typed, msgspec)", decode_sync, body, events, args.repeat)


if __name__ == "__main__":
    main()
