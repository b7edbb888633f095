"""CPU of the key backup per room key: backing one up, and restoring one.

What `bot.e2ee.key_backup` costs per inbound Megolm session, in one process, next to
a baseline measured in the same run (a busy machine shifts both):

* ``megolm key``: making the session and the receiving side's copy of it (what a
  room key's arrival costs the bot before any backup), the baseline.
* ``back up``: `OlmMachine.room_key_to_back_up`'s work (the export at the first known
  index) and `backup.authenticated_backup_data` (Curve25519 + AES + the MSC4048 MAC).
* ``restore``: `backup.decrypt_room_keys` of the whole backup, per entry, and the
  import into a fresh `GroupSessions` (what a lost store pays once at start).

CPU time (``time.process_time``) per session, median of ``--rounds`` rounds.

    python bench/key_backup.py [--sessions 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import vodozemac

from matrix_crypto import backup
from matrix_crypto.megolm import GroupSessions

ROOM = "!bench:example.org"
USER = "@bot:example.org"
_ACCOUNT = vodozemac.Account()
CURVE = _ACCOUNT.curve25519_key.to_base64()
ED = _ACCOUNT.ed25519_key.to_base64()


def one_round(sessions: int) -> dict[str, float]:
    key = backup.BackupKey.create()
    started = time.process_time()
    inbound = []
    for _ in range(sessions):
        outbound = vodozemac.GroupSession()
        inbound.append(vodozemac.InboundGroupSession(outbound.session_key))
    made = time.process_time()
    entries: dict[str, object] = {}
    for session in inbound:
        exported = session.export_at(session.first_known_index)
        assert exported is not None
        to_back_up = backup.RoomKeyToBackUp(
            room_id=ROOM,
            session_id=session.session_id,
            sender_curve25519=CURVE,
            sender_claimed_ed25519=ED,
            session_key=exported.to_base64(),
            first_message_index=session.first_known_index,
            authenticated=True,
        )
        entries[session.session_id] = backup.authenticated_backup_data(key, USER, to_back_up)
    backed_up = time.process_time()
    restored, refused = backup.decrypt_room_keys(key, {ROOM: entries}, user_id=USER)
    groups = GroupSessions(bytes(32))
    for entry in restored:
        groups.add_backed_up_room_key(
            entry.forwarded_room_key_content(), authenticated=entry.authenticated
        )
    done = time.process_time()
    assert not refused
    assert len(restored) == sessions
    assert all(entry.authenticated for entry in restored)
    return {
        "megolm key": (made - started) / sessions,
        "back up": (backed_up - made) / sessions,
        "restore": (done - backed_up) / sessions,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rounds = [one_round(args.sessions) for _ in range(args.rounds)]
    print(f"{args.sessions} sessions, median of {args.rounds} rounds (CPU per session)")
    baseline = statistics.median(r["megolm key"] for r in rounds)
    for name in ("megolm key", "back up", "restore"):
        median = statistics.median(r[name] for r in rounds)
        print(f"  {name:<11} {median * 1e6:8.1f} µs  ({median / baseline:4.1f}x the megolm key)")


if __name__ == "__main__":
    main()
