"""kill -9 while keys are being exchanged: after each restart every encrypted message is
decrypted and answered exactly once.

The bot runs as ``python -m bot run`` (`BotProcess`); the person is matrix-js-sdk with its
Rust crypto. Each round opens a new encrypted direct chat (so keys are exchanged both ways:
the person's room key to the bot's device, the bot's to the person's), sends a few
messages, and kills the bot at a seeded random moment shortly after, while that exchange is
in flight, then starts it again at once.
"""

from __future__ import annotations

import trio

from faults.harness.lab import FaultLab
from js_client import JsClient, Message, open_js_client
from matrix_api.testing.synapse import SynapseServer

ROUNDS = 3
MESSAGES_PER_ROUND = 4
SCENARIO_S = 300


def _answers(messages: list[Message], bot: str, asked: str) -> list[Message]:
    return [
        m
        for m in messages
        if m.sender == bot
        and (m.wire_relates_to or {}).get("m.in_reply_to", {}).get("event_id") == asked
    ]


async def _all_answered(person: JsClient, room_id: str, bot: str, asked: list[str]) -> None:
    """Wait until each of ``asked`` has an answer; then none may have two."""
    with trio.fail_after(120):
        while True:
            messages = await person.messages(room_id)
            if all(_answers(messages, bot, event_id) for event_id in asked):
                break
            await trio.sleep(0.5)
    await trio.sleep(2)  # a duplicate would come soon after the first answer
    messages = await person.messages(room_id)
    for event_id in asked:
        [answer] = _answers(messages, bot, event_id)
        assert answer.encrypted
        assert not answer.decryption_failure, answer.decryption_failure_reason


async def test_kill_9_during_key_exchanges_loses_nothing_and_repeats_nothing(
    lab: FaultLab, synapse: SynapseServer
) -> None:
    bot_user = synapse.register_user(f"bot-{lab.rng.randrange(16**8):08x}")
    alice_user = synapse.register_user(f"alice-{lab.rng.randrange(16**8):08x}")
    bot_id = bot_user.user_id
    bot = lab.bot(
        synapse.base_url, bot_id, access_token=bot_user.access_token, device_id=bot_user.device_id
    )
    with trio.fail_after(SCENARIO_S):
        await bot.start()
        await bot.wait_ready()
        async with open_js_client("alice") as alice:
            await alice.login(synapse.base_url, alice_user.user_id, alice_user.password)
            rooms: list[tuple[str, list[str]]] = []
            for round_number in range(ROUNDS):
                room_id = await alice.create_encrypted_dm(bot_id)
                asked = [
                    await alice.send_text(room_id, f"round {round_number} message {n}")
                    for n in range(MESSAGES_PER_ROUND)
                ]
                rooms.append((room_id, asked))
                await trio.sleep(lab.rng.uniform(0.0, 1.5))
                await bot.kill()
                await bot.start()
                await bot.wait_ready()
            for room_id, asked in rooms:
                await _all_answered(alice, room_id, bot_id, asked)
    # The bot never wrote what it read into its logs.
    assert "round 0 message" not in bot.text()
