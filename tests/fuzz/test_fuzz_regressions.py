"""Every failure the pipeline fuzz (test_pipeline_fuzz.py) has found, kept as an explicit,
minimal example. Each runs the whole bot through `check_scenario`, the fuzz's own property:
the bot starts, stays up, moves its sync token past every batch, ends every event, and
answers the final ordinary message exactly once.

Each test says what it found, against which commit, and where the fault was.
"""

from __future__ import annotations

from typing import Any

from fuzz_harness import check_scenario
from fuzz_strategies import (
    FINAL_TOKEN,
    KNOWN_ROOM,
    MALLORY,
    Scenario,
    Step,
    deep,
    final_batch,
    final_message,
    hand_made,
    start_batch,
    sync_body,
)

from fake_homeserver import ALICE
from matrix_api.models import decode_sync
from ordering_harness import Logs


def junk_message(content: Any, event_id: str = "$junk") -> dict[str, Any]:
    """An allowed user's message in the known chat, with ``content`` as given."""
    return {**final_message(), "event_id": event_id, "content": content}


def assert_quarantined(logs: Logs, event_id: str = "$junk") -> None:
    """``event_id`` was logged once as quarantined, with a reason and its sender."""
    (entry,) = [e for e in logs if e["event"] == "event_quarantined" and e["event_id"] == event_id]
    assert entry["reason"]
    assert entry["room_id"] == KNOWN_ROOM
    assert entry["sender"] == final_message()["sender"]


# --- per event -------------------------------------------------------------------------


def test_a_msgtype_that_is_a_list_in_a_long_poll() -> None:
    # Found at 60c345f: TypeError (unhashable type: 'list') in bot/messages.py
    # parse_incoming escaped the sync loop and stopped the bot.
    junk = junk_message({"msgtype": ["m.text"], "body": "x"})
    logs = check_scenario(hand_made(start_batch, lambda nb: final_batch(nb, junk)))
    assert_quarantined(logs)


def test_a_msgtype_that_is_an_object_in_the_start_up_sync() -> None:
    # Found at 60c345f: the same TypeError in the start-up sync stopped start-up, and the
    # token never moved past it: every restart died the same way.
    junk = junk_message({"msgtype": {"a": 1}, "body": "x"})
    logs = check_scenario(hand_made(lambda nb: start_batch(nb, junk), final_batch))
    assert_quarantined(logs)


def test_a_msgtype_that_is_an_object_in_the_start_up_sync_of_an_empty_store() -> None:
    # Found at 60c345f: as above, through the catch-up after a lost store (no token).
    junk = junk_message({"msgtype": {"a": 1}, "body": "x"})
    check_scenario(hand_made(lambda nb: start_batch(nb, junk), final_batch, seeded=False))


def test_an_event_nested_100000_deep_before_the_final_message() -> None:
    # Guards the depth limits of the decoder (RecursionError would fail the whole batch).
    check_scenario(hand_made(start_batch, lambda nb: final_batch(nb, deep(100_000))))


def test_a_body_nested_100000_deep_before_the_final_message() -> None:
    junk = junk_message({"msgtype": "m.text", "body": deep(100_000)})
    logs = check_scenario(hand_made(start_batch, lambda nb: final_batch(nb, junk)))
    assert_quarantined(logs)


def test_a_limited_timeline_whose_prev_batch_is_70000_characters() -> None:
    # Found at 60c345f: the gap fill asked /messages with the token as its ``from``;
    # httpx refused the URL (httpx.InvalidURL, "URL component 'query' too long"), which
    # is no MatrixAPIError, escaped the sync loop and stopped the bot.
    junk_room = {"timeline": {"events": [], "limited": True, "prev_batch": "p" * 70_000}}
    check_scenario(
        hand_made(start_batch, lambda nb: final_batch(nb, join={"!junk:hs.test": junk_room}))
    )


def test_a_forged_invite_state_naming_an_allowed_user_first() -> None:
    # Issue 15: a remote user who is not allowed put an allowed user's invite first in
    # the stripped state; the server's own entry, last, is the stranger's. Never joined.
    def member(sender: str) -> dict[str, Any]:
        return {
            "type": "m.room.member",
            "state_key": "@bot:hs.test",
            "sender": sender,
            "content": {"membership": "invite"},
        }

    invite = {"invite_state": {"events": [member(ALICE), member(MALLORY)]}}
    logs = check_scenario(
        hand_made(start_batch, lambda nb: final_batch(nb, invite={"!forged:hs.test": invite}))
    )
    assert not [e for e in logs if e["event"] == "invite_accepted"]
    assert [e["room_id"] for e in logs if e["event"] == "invite_declined"] == ["!forged:hs.test"]


# --- per room ----------------------------------------------------------------------------


def test_a_room_whose_unread_notifications_is_a_list_keeps_its_events() -> None:
    # Found at 60c345f: a room whose ``unread_notifications`` (a count the bot never
    # reads) is not an object failed to decode as a whole, in
    # matrix_api/models/sync.py: its timeline was dropped with it, the token moved on,
    # and the message in it was never answered nor recorded anywhere.
    check_scenario(
        hand_made(start_batch, lambda nb: final_batch(nb, room={"unread_notifications": []}))
    )


def test_the_decoder_keeps_the_events_of_a_room_with_junk_counts() -> None:
    # The same finding at the decoder: the events decode, so they are kept.
    body = final_batch("s1", room={"summary": 5, "unread_notifications": []})
    sync = decode_sync(sync_body_bytes(body))
    (event,) = sync.rooms.join["!known:hs.test"].timeline.events  # type: ignore[index]
    assert event.event_id == final_message()["event_id"]


# --- the envelope ------------------------------------------------------------------------


def test_rooms_as_a_list_in_the_start_up_sync() -> None:
    # Found at 60c345f: BadResponse escaped start-up (exit 1, a traceback). With the
    # start-up sync retried, start-up still never ends: the same answer comes back for
    # the same token. The envelope says where the next batch starts; nothing else in it
    # can be read.
    check_scenario(hand_made(lambda nb: {"next_batch": nb, "rooms": []}, final_batch))


def test_to_device_as_a_list_in_a_long_poll() -> None:
    # Found at 60c345f: the sync loop fetched the same batch forever (sync_failed,
    # backoff, same token): nothing after it was ever answered.
    check_scenario(hand_made(start_batch, lambda nb: sync_body(nb, to_device=[]), final_batch))


def test_a_start_up_sync_answer_without_next_batch_then_the_real_one() -> None:
    # Found at 60c345f: one unusable answer to the start-up sync (a glitch) stopped
    # start-up; it must be retried like any other failed request.
    scenario = Scenario(
        seeded=True,
        steps=[Step(start_batch("f1"), glitches=[b'{"rooms":{}}']), Step(final_batch(FINAL_TOKEN))],
    )
    check_scenario(scenario)


def test_long_poll_answers_that_are_no_json_then_the_real_one() -> None:
    scenario = Scenario(
        seeded=True,
        steps=[
            Step(start_batch("f1")),
            Step(final_batch(FINAL_TOKEN), glitches=[b"<html>502</html>", b'{"rooms":{']),
        ],
    )
    check_scenario(scenario)


def sync_body_bytes(body: dict[str, Any]) -> bytes:
    return Step(body).answer(0)
