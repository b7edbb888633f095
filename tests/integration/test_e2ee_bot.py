"""The bot in encrypted rooms, against Synapse, with an independent client on the human side.

The person is matrix-js-sdk with its Rust crypto (js_client.py): it makes an encrypted
direct chat the way Element does, and it is the one that says whether the bot's answers
decrypt. The bot runs in-process (bot_harness.running_bot) on its own store.
"""

from __future__ import annotations

from pathlib import Path

import trio

from bot.invites import GREETING
from bot_harness import bot_settings, running_bot
from js_client import JsClient, Message, open_js_client
from matrix_api.testing.synapse import RegisteredUser, SynapseServer
from matrix_helpers import MakeUser

# Each scenario is bounded as a whole: a broken exchange fails, it does not hang.
SCENARIO_S = 180


async def _logged_in(client: JsClient, synapse: SynapseServer, user: RegisteredUser) -> None:
    await client.login(synapse.base_url, user.user_id, user.password)


async def _greeted_dm(person: JsClient, bot_id: str) -> str:
    """An encrypted direct chat with the bot, once its (encrypted) greeting decrypted."""
    room_id = await person.create_encrypted_dm(bot_id)
    greeting = await person.wait_for_message(room_id, sender=bot_id, timeout=60)
    _assert_readable(greeting)
    assert greeting.body == GREETING
    return room_id


def _assert_readable(message: Message) -> None:
    assert message.encrypted, "sent in the clear into an encrypted room"
    assert not message.decryption_failure, message.decryption_failure_reason
    assert message.msgtype == "m.notice"


async def _ask(person: JsClient, room_id: str, bot_id: str, text: str) -> Message:
    """Send ``text``; the bot's answer to it (a reply pointing at it), decrypted."""
    event_id = await person.send_text(room_id, text)
    for _ in range(20):
        seen = {m.event_id for m in await person.messages(room_id)}
        answer = await person.wait_for_message(
            room_id, sender=bot_id, exclude_event_ids=sorted(seen), timeout=60
        )
        replied_to = (answer.wire_relates_to or {}).get("m.in_reply_to", {}).get("event_id")
        if replied_to == event_id:
            _assert_readable(answer)
            return answer
    raise AssertionError(f"no answer to {text!r}")


async def test_an_encrypted_direct_chat_is_a_chat_like_any_other(
    synapse: SynapseServer, make_user: MakeUser, tmp_path: Path
) -> None:
    bot_user, alice_user = make_user("bot"), make_user("alice")
    bot = bot_user.user_id
    settings = bot_settings(synapse, bot_user, tmp_path / "store.sqlite3")
    with trio.fail_after(SCENARIO_S):
        async with running_bot(settings) as runtime, open_js_client("alice") as alice:
            await _logged_in(alice, synapse, alice_user)
            room_id = await _greeted_dm(alice, bot)
            assert runtime._store.chat_for_room(room_id) is not None

            answer = await _ask(alice, room_id, bot, "hello, encrypted")
            assert answer.body == "hello, encrypted"  # the echo backend
            # The relation stays in the clear, as the spec says for encrypted events.
            assert answer.wire_relates_to is not None

            status = await _ask(alice, room_id, bot, "!status")
            assert status.body is not None
            assert "chat" in status.body.lower()


async def test_answers_survive_a_restart_exactly_once(
    synapse: SynapseServer, make_user: MakeUser, tmp_path: Path
) -> None:
    bot_user, alice_user = make_user("bot"), make_user("alice")
    bot = bot_user.user_id
    settings = bot_settings(synapse, bot_user, tmp_path / "store.sqlite3")
    with trio.fail_after(SCENARIO_S):
        async with open_js_client("alice") as alice:
            await _logged_in(alice, synapse, alice_user)
            async with running_bot(settings):
                room_id = await _greeted_dm(alice, bot)
                await _ask(alice, room_id, bot, "before")
            # Written while the bot is down: the room key reaches its device by to-device
            # message, delivered when it syncs again.
            while_down = await alice.send_text(room_id, "while you were away")
            async with running_bot(settings):
                answer = await alice.wait_for_message(
                    room_id, sender=bot, body_contains="while you were away", timeout=60
                )
                _assert_readable(answer)
                assert (answer.wire_relates_to or {})["m.in_reply_to"]["event_id"] == while_down
                again = await _ask(alice, room_id, bot, "after")
                assert again.body == "after"
            answers = [
                m
                for m in await alice.messages(room_id)
                if m.sender == bot and m.body == "while you were away"
            ]
            assert len(answers) == 1
