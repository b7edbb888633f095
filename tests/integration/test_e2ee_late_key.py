"""A message whose room key comes late, against Synapse.

The js client always sends a room key before the message it is for, so the person
here is Python (e2ee_person.py: matrix_crypto's OlmMachine on a MatrixClient, its own
device). It holds the to-device message carrying its room key back, sends the
message, and sends the key some seconds later: the bot waits for the key, without
answering or churning requests, and answers once it comes, exactly once. Meanwhile
another user offers a key for that session (unencrypted, and as Olm garbage), which
the bot does not take, and another room's key wakes the waiting message without the
bot giving up on it.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import trio
import vodozemac
from structlog.testing import capture_logs

from bot.invites import GREETING
from bot_harness import bot_settings, running_bot
from e2ee_person import EncryptedPerson, open_encrypted_person
from matrix_api import StateEventSpec, new_txn_id
from matrix_api.models import EventID, RoomEvent, RoomID
from matrix_api.testing.synapse import RegisteredUser, SynapseServer
from matrix_helpers import MakeUser, client_for, text

SCENARIO_S = 180
MEGOLM = {"algorithm": "m.megolm.v1.aes-sha2"}
# How long the key is held back: long enough for the bot to take the message up
# (a sync and its lane) several times over on a loaded machine.
HOLD_S = 6

# Synapse's access log: one line per completed request, with who made it.
_ACCESS = re.compile(
    r' - \{(?P<who>[^}|]*)[^}]*\} Processed request: .*"(?P<method>[A-Z]+) (?P<path>\S+) '
)


def requests_of(synapse: SynapseServer, user_id: str, start: int) -> Counter[str]:
    """``user_id``'s requests completed since ``start`` (a size of the log), by method
    and the first segment of the path: ``GET sync``, ``PUT rooms``, ``POST keys``."""
    with synapse.log_path.open("rb") as log:
        log.seek(start)
        lines = log.read().decode(errors="replace").splitlines()
    counts: Counter[str] = Counter()
    for line in lines:
        match = _ACCESS.search(line)
        if match and match["who"] == user_id:
            path = match["path"].split("?", 1)[0].removeprefix("/_matrix/client/v3")
            counts[f"{match['method']} {path.split('/')[1] if '/' in path else path}"] += 1
    return counts


def reply_target(event: RoomEvent) -> str | None:
    """The event an encrypted event answers (its relation is in the clear)."""
    relates = event.content.get("m.relates_to")
    if not isinstance(relates, dict):
        return None
    reply = relates.get("m.in_reply_to")
    return reply.get("event_id") if isinstance(reply, dict) else None


async def _ask(alice: EncryptedPerson, room: RoomID, bot: str, body: str) -> EventID:
    """A message with its key sent first; returns once the bot answered it."""
    asked = await alice.send_encrypted(room, text(body), encryption=MEGOLM)
    await alice.wait_until(
        lambda: any(reply_target(e) == asked for e in alice.encrypted_from(room, bot)),
        what=f"the answer to {body!r}",
    )
    return asked


async def _greeted_room(alice: EncryptedPerson, bot: str) -> RoomID:
    """An encrypted direct chat with the bot, once its greeting decrypted."""
    room = await alice.client.create_room(
        preset="trusted_private_chat",
        is_direct=True,
        invite=[bot],
        initial_state=[StateEventSpec("m.room.encryption", MEGOLM)],
    )
    alice.machine.update_tracked_users([bot])
    await alice.wait_until(
        lambda: bool(alice.encrypted_from(room, bot)), what="the encrypted greeting"
    )
    [greeting] = alice.encrypted_from(room, bot)
    plain = await alice.decrypt(room, greeting)
    assert (plain.sender, plain.content["body"]) == (bot, GREETING)
    assert plain.content["msgtype"] == "m.notice"
    return room


async def _forge_keys(
    synapse: SynapseServer,
    mallory: RegisteredUser,
    bot: RegisteredUser,
    alice: EncryptedPerson,
    room: RoomID,
    waiting: RoomEvent,
) -> None:
    """To the bot's device from Mallory: an unencrypted m.room_key claiming the
    session of the ``waiting`` message (with another key), and an Olm message that
    is garbage, claiming Alice's curve key."""
    [device] = alice.machine.devices(bot.user_id)
    assert device.device_id == bot.device_id
    content = waiting.content
    room_key = {
        "algorithm": MEGOLM["algorithm"],
        "room_id": room,
        "session_id": content["session_id"],
        "session_key": vodozemac.GroupSession().session_key.to_base64(),
    }
    garbage = {
        "algorithm": "m.olm.v1.curve25519-aes-sha2",
        "sender_key": alice.machine.curve25519,
        "ciphertext": {device.curve25519: {"type": 0, "body": "AwogAAAA" * 8}},
    }
    async with client_for(synapse, mallory) as client:
        for event_type, forged in (("m.room_key", room_key), ("m.room.encrypted", garbage)):
            messages = {bot.user_id: {bot.device_id: forged}}
            await client.send_to_device(event_type, messages, new_txn_id())


async def test_a_message_whose_room_key_comes_late_is_answered_when_it_comes(
    synapse: SynapseServer, make_user: MakeUser, tmp_path: Path
) -> None:
    bot_user, alice_user, mallory_user = make_user("bot"), make_user("alice"), make_user("mal")
    bot, me = bot_user.user_id, alice_user.user_id
    settings = bot_settings(synapse, bot_user, tmp_path / "store.sqlite3")
    start = synapse.log_path.stat().st_size
    with trio.fail_after(SCENARIO_S), capture_logs() as logs:
        async with running_bot(settings), open_encrypted_person(synapse, alice_user) as alice:
            room = await _greeted_room(alice, bot)
            other = await _greeted_room(alice, bot)
            # The log is read right: the bot's start and greetings are in it.
            assert requests_of(synapse, bot, start)["GET sync"] >= 1

            # The key is made, claimed for and encrypted for the bot's device, but held.
            held = await alice.prepare_share(room, [me, bot], MEGOLM)
            assert [list(r.messages) for r in held] == [[bot]], "one share, to the bot"
            late = await alice.send_prepared(room, text("the key follows"))
            mark = synapse.log_path.stat().st_size
            said = len(alice.encrypted_from(room, bot))
            await trio.sleep(HOLD_S)
            # Nothing said meanwhile: no answer, no "could not decrypt" notice.
            assert len(alice.encrypted_from(room, bot)) == said
            waiting = requests_of(synapse, bot, mark)
            # Waiting is not polling: the long-poll sync that brought the message and
            # the one after it, perhaps a devices query, nothing else.
            assert sum(n for k, n in waiting.items() if k != "GET sync") <= 1, waiting
            assert waiting["GET sync"] <= 2, waiting

            # Someone else offers a key for that very session: in the clear (no Olm
            # session proves who sent it), and as Olm garbage. Neither is taken.
            await alice.wait_until(
                lambda: any(e.event_id == late for e in alice.timeline.get(room, [])),
                what="the late message in the timeline",
            )
            [sent] = [e for e in alice.timeline[room] if e.event_id == late]
            await _forge_keys(synapse, mallory_user, bot_user, alice, room, sent)
            # Another room's key wakes the waiting message, which must go on waiting
            # (not be given up as undecryptable); that room is not held up by it.
            await _ask(alice, other, bot, "meanwhile, elsewhere")
            refused = [e for e in logs if e["event"] == "to_device_refused"]
            assert [e["sender"] for e in refused] == [mallory_user.user_id], refused
            await trio.sleep(1)
            assert len(alice.encrypted_from(room, bot)) == said

            await alice.release(held)
            await alice.wait_until(
                lambda: any(reply_target(e) == late for e in alice.encrypted_from(room, bot)),
                what="the answer once the key came",
            )
            [answer] = [e for e in alice.encrypted_from(room, bot) if reply_target(e) == late]
            plain = await alice.decrypt(room, answer)
            assert plain.sender == bot
            assert plain.content["body"] == "the key follows"  # the echo backend
            assert plain.content["msgtype"] == "m.notice"

            # The room goes on; by the time the next answer is in, the late message
            # has still been answered once.
            await _ask(alice, room, bot, "and this one")
            answers = [e for e in alice.encrypted_from(room, bot) if reply_target(e) == late]
            assert len(answers) == 1, f"{len(answers)} answers to the late message"
            assert not alice.refused, [r.refused for r in alice.refused]
