"""CPU per Megolm encrypt + decrypt of a 200-byte message, next to a JSON round trip.

What the bot adds per encrypted message in `matrix_crypto.megolm`, measured in one
process against a baseline taken in the same run (so a busy machine shifts both):

* ``json``: ``json.dumps`` + ``json.loads`` of the same event content (what a plain
  message costs to serialise and parse, the least any message costs).
* ``encrypt``: ``prepare_outbound`` (rotation every 100 messages, as by default: the
  new session's key is added on the receiving side too, as a room key would be) and
  ``encrypt`` on the sending side.
* ``persist out`` / ``persist in``: ``take_changes`` after each send (the outbound
  session's pickle, which the bot must store before sending) and after each
  decryption (the replay record; a new inbound session's pickle every 100 messages).
* ``decrypt``: ``decrypt`` on the receiving side (a new event id per message, so every
  message writes a replay record; past ``SEEN_LIMIT`` each also drops the oldest).

CPU time (``time.process_time``) per message, median of ``--rounds`` rounds.

    python bench/e2ee_megolm.py [--messages 5000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from matrix_crypto.megolm import GroupSessions, RotationSettings

ROOM = "!bench:example.org"
DEVICES = [("@user:example.org", f"DEVICE{i}") for i in range(3)]
SETTINGS = RotationSettings()


def content_of(size: int, i: int) -> dict[str, object]:
    body = f"message {i:06d} " + "x" * size
    return {"msgtype": "m.text", "body": body[:size]}


def json_round_trip(messages: int) -> float:
    start = time.process_time()
    for i in range(messages):
        event = {"type": "m.room.message", "content": content_of(200, i), "room_id": ROOM}
        json.loads(json.dumps(event, ensure_ascii=False, separators=(",", ":")))
    return time.process_time() - start


def megolm_round_trip(messages: int) -> dict[str, float]:
    sender = GroupSessions(bytes(32))
    receiver = GroupSessions(bytes(range(32)))
    spent = dict.fromkeys(("encrypt", "persist out", "decrypt", "persist in"), 0.0)
    clock = time.process_time
    for i in range(messages):
        t0 = clock()
        plan = sender.prepare_outbound(
            ROOM,
            now_ms=i,
            settings=SETTINGS,
            devices=DEVICES,
            own_curve25519="SenderCurve",
            own_ed25519="SenderEd",
        )
        if plan.to_share:
            receiver.add_room_key(
                plan.room_key, sender_curve25519="SenderCurve", sender_ed25519="SenderEd"
            )
            sender.mark_shared(ROOM, plan.session_id, plan.to_share)
        encrypted = sender.encrypt(ROOM, "m.room.message", content_of(200, i), "DEV", "SenderCurve")
        t1 = clock()
        sender.take_changes()
        t2 = clock()
        receiver.decrypt(ROOM, f"$event{i}", i, encrypted)
        t3 = clock()
        receiver.take_changes()
        t4 = clock()
        spent["encrypt"] += t1 - t0
        spent["persist out"] += t2 - t1
        spent["decrypt"] += t3 - t2
        spent["persist in"] += t4 - t3
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    names = ("json", "encrypt", "persist out", "decrypt", "persist in")
    rows: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        rows["json"].append(json_round_trip(args.messages) / args.messages)
        for name, seconds in megolm_round_trip(args.messages).items():
            rows[name].append(seconds / args.messages)

    median = {name: statistics.median(values) * 1e6 for name, values in rows.items()}
    megolm_total = sum(median[name] for name in names[1:])
    print(f"{args.messages} messages of 200 bytes, median of {args.rounds} rounds, CPU µs/msg")
    for name in names:
        print(f"  {name:<12} {median[name]:8.1f}")
    print(f"  {'megolm':<12} {megolm_total:8.1f}  (all but json)")
    print(f"  megolm / json: {megolm_total / median['json']:.1f}x")


if __name__ == "__main__":
    main()
