"""The bot in encrypted rooms, against Synapse, with an independent client on the human side.

The person is matrix-js-sdk with its Rust crypto (js_client.py): it makes an encrypted
direct chat the way Element does, and it is the one that says whether the bot's answers
decrypt. The bot runs in-process (bot_harness.running_bot) on its own store.
"""

from __future__ import annotations

from pathlib import Path

import trio
from structlog.testing import capture_logs

from bot.backends.model import ModelSettings
from bot.e2ee.crypto import BotCrypto
from bot.handler import UNDECRYPTABLE_NO_KEY_NOTICE
from bot.invites import GREETING
from bot_harness import bot_settings, running_bot
from fake_openai import API_KEY, FakeOpenAI
from js_client import JsClient, Message, open_js_client
from matrix_api.models import RoomID, UserID
from matrix_api.testing.synapse import RegisteredUser, SynapseServer
from matrix_crypto.canonical import verify
from matrix_crypto.cross_signing import (
    device_signed_by_self_signing_key,
    verify_cross_signing_keys,
)
from matrix_helpers import MakeUser, client_for

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


async def test_a_second_device_of_the_user_reads_the_next_answers(
    synapse: SynapseServer, make_user: MakeUser, tmp_path: Path
) -> None:
    bot_user, alice_user = make_user("bot"), make_user("alice")
    bot = bot_user.user_id
    settings = bot_settings(synapse, bot_user, tmp_path / "store.sqlite3")
    with trio.fail_after(SCENARIO_S):
        async with running_bot(settings), open_js_client("alice") as alice:
            await _logged_in(alice, synapse, alice_user)
            room_id = await _greeted_dm(alice, bot)
            await _ask(alice, room_id, bot, "from my laptop")
            async with open_js_client("alice-phone") as phone:
                await _logged_in(phone, synapse, alice_user)  # a new device, keys uploaded
                answer = await _ask(alice, room_id, bot, "now on my phone too")
                on_phone = await phone.wait_for_message(
                    room_id, sender=bot, body_contains="now on my phone too", timeout=60
                )
                _assert_readable(on_phone)
                assert on_phone.event_id == answer.event_id


async def test_a_member_leaving_gets_no_key_to_what_follows(
    synapse: SynapseServer, make_user: MakeUser, tmp_path: Path
) -> None:
    bot_user, alice_user, bob_user = make_user("bot"), make_user("alice"), make_user("bob")
    bot = bot_user.user_id
    settings = bot_settings(synapse, bot_user, tmp_path / "store.sqlite3")
    with trio.fail_after(SCENARIO_S):
        async with (
            running_bot(settings) as runtime,
            open_js_client("alice") as alice,
            open_js_client("bob") as bob,
        ):
            await _logged_in(alice, synapse, alice_user)
            await _logged_in(bob, synapse, bob_user)
            room_id = await alice.create_room(
                encrypted=True, name="team", invite=[bob_user.user_id]
            )
            await bob.join(room_id)
            await alice.invite(room_id, bot)
            greeting = await alice.wait_for_message(room_id, sender=bot, timeout=60)
            _assert_readable(greeting)
            before = await _ask(alice, room_id, bot, "all three of us")
            seen_by_bob = await bob.wait_for_message(
                room_id, sender=bot, body_contains="all three of us", timeout=60
            )
            _assert_readable(seen_by_bob)
            crypto = runtime._crypto
            assert crypto is not None
            session_before = _outbound_session(crypto, room_id)

            await bob.leave(room_id)
            after = await _ask(alice, room_id, bot, "just us now")
            assert after.event_id != before.event_id
            # A new room key, which Bob's device was never given.
            assert _outbound_session(crypto, room_id) != session_before


def _outbound_session(crypto: BotCrypto, room_id: str) -> str:
    info = crypto.machine._groups.outbound(room_id)
    assert info is not None
    return info.session_id


async def test_new_from_an_encrypted_chat_makes_an_encrypted_chat(
    synapse: SynapseServer, make_user: MakeUser, tmp_path: Path
) -> None:
    bot_user, alice_user = make_user("bot"), make_user("alice")
    bot = bot_user.user_id
    settings = bot_settings(synapse, bot_user, tmp_path / "store.sqlite3")
    with trio.fail_after(SCENARIO_S):
        async with running_bot(settings), open_js_client("alice") as alice:
            await _logged_in(alice, synapse, alice_user)
            room_id = await _greeted_dm(alice, bot)
            made = await _ask(alice, room_id, bot, "!new Secrets")
            assert made.body is not None
            new_room = made.body.split("https://matrix.to/#/")[1].split("?")[0]
            await alice.join(new_room)
            assert await alice.room_encrypted(new_room)
            answer = await _ask(alice, new_room, bot, "in the new one")
            assert answer.body == "in the new one"


async def test_a_lost_store_comes_back_as_a_new_device_restores_its_keys_and_keeps_answering(
    synapse: SynapseServer, make_user: MakeUser, tmp_path: Path
) -> None:
    bot_user, alice_user = make_user("bot"), make_user("alice")
    bot = bot_user.user_id
    store = tmp_path / "store.sqlite3"
    settings = bot_settings(synapse, bot_user, store, password=bot_user.password)
    with trio.fail_after(SCENARIO_S):
        async with open_js_client("alice") as alice:
            await _logged_in(alice, synapse, alice_user)
            async with running_bot(settings):
                room_id = await _greeted_dm(alice, bot)
                await _ask(alice, room_id, bot, "before the loss")
            for lost in tmp_path.iterdir():
                # All of it (the pickle key too) but the recovery key, which the
                # operator keeps elsewhere.
                if not lost.name.endswith(".recovery-key"):
                    lost.unlink()
            # Written before the new device exists: encrypted for the old one only, with
            # the session the old device had (and backed up).
            in_the_gap = await alice.send_text(room_id, "in the gap")
            with capture_logs() as logs:
                async with running_bot(settings) as runtime:
                    # Its key came back from the key backup: answered, not "could not
                    # decrypt".
                    answered = await alice.wait_for_message(
                        room_id, sender=bot, body_contains="in the gap", timeout=60
                    )
                    _assert_readable(answered)
                    assert answered.body == "in the gap"
                    replied = (answered.wire_relates_to or {})["m.in_reply_to"]["event_id"]
                    assert replied == in_the_gap
                    answer = await _ask(alice, room_id, bot, "after the loss")
                    assert answer.body == "after the loss"
                    crypto = runtime._crypto
                    assert crypto is not None
                    new_device = crypto.machine.device_id
                    # Signed again from secret storage: users see it as the bot's own.
                    while crypto.own.get("cross_signed_device") != new_device:
                        await runtime._store.wait_for_change()
                    [seen] = [d for d in await alice.devices(bot) if d.device_id == new_device]
                    assert seen.signed_by_owner
            assert new_device != bot_user.device_id
            # Exactly once: one reply to the message written in the gap.
            replies = [
                m
                for m in await alice.messages(room_id)
                if m.sender == bot
                and (m.wire_relates_to or {}).get("m.in_reply_to", {}).get("event_id") == in_the_gap
            ]
            assert [m.body for m in replies] == ["in the gap"]
            [restored] = [e for e in logs if e["event"] == "key_backup_restored"]
            assert restored["authenticated"] == restored["sessions"] >= 2
            assert restored["refused"] == 0
            [warning] = [e for e in logs if e["event"] == "e2ee_new_device"]
            assert warning["device_id"] == new_device
            assert [e["event"] for e in logs if e["event"].startswith("cross_signing")] == [
                "cross_signing_restored"
            ]
            # Both devices are on the server, each with its own keys: the old one's
            # were never replaced.
            devices = {d.device_id: d for d in await alice.devices(bot)}
            assert {bot_user.device_id, new_device} <= set(devices)
            assert devices[bot_user.device_id].ed25519 != devices[new_device].ed25519


async def test_a_lost_store_without_its_recovery_key_says_what_it_cannot_read(
    synapse: SynapseServer, make_user: MakeUser, tmp_path: Path
) -> None:
    """The recovery key lost with the store: the backup cannot be read, so a message
    written in the gap gets the could-not-decrypt notice (once), and the bot goes on."""
    bot_user, alice_user = make_user("bot"), make_user("alice")
    bot = bot_user.user_id
    settings = bot_settings(
        synapse, bot_user, tmp_path / "store.sqlite3", password=bot_user.password
    )
    with trio.fail_after(SCENARIO_S):
        async with open_js_client("alice") as alice:
            await _logged_in(alice, synapse, alice_user)
            async with running_bot(settings):
                room_id = await _greeted_dm(alice, bot)
                await _ask(alice, room_id, bot, "before the loss")
            for lost in tmp_path.iterdir():
                lost.unlink()
            in_the_gap = await alice.send_text(room_id, "in the gap")
            with capture_logs() as logs:
                async with running_bot(settings):
                    told = await alice.wait_for_message(
                        room_id, sender=bot, body_contains="could not decrypt", timeout=60
                    )
                    _assert_readable(told)
                    assert told.body == UNDECRYPTABLE_NO_KEY_NOTICE
                    assert (told.wire_relates_to or {})["m.in_reply_to"]["event_id"] == in_the_gap
                    answer = await _ask(alice, room_id, bot, "after the loss")
                    assert answer.body == "after the loss"
            unavailable = [e["event"] for e in logs if e["event"].endswith("_unavailable")]
            assert unavailable == ["cross_signing_unavailable", "key_backup_unavailable"]
            # No new secret storage key: what is stored under the lost one stays reachable
            # to whoever has that recovery key.
            assert not (tmp_path / "store.sqlite3.recovery-key").exists()


async def test_a_streamed_answer_grows_by_encrypted_edits(
    synapse: SynapseServer, make_user: MakeUser, tmp_path: Path
) -> None:
    bot_user, alice_user = make_user("bot"), make_user("alice")
    bot = bot_user.user_id
    server = FakeOpenAI(api_key=API_KEY, models=frozenset({"test-model"}))
    server.token_delay = 0.03
    question = "tell me a long story about encrypted mountains and their weather"
    with trio.fail_after(SCENARIO_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            model = ModelSettings(
                base_url=server.base_url,
                model="test-model",
                api_key=API_KEY,
                stream=True,
                edit_interval_s=0.3,
            )
            settings = bot_settings(
                synapse, bot_user, tmp_path / "store.sqlite3", backend="model", model=model
            )
            async with running_bot(settings), open_js_client("alice") as alice:
                await _logged_in(alice, synapse, alice_user)
                room_id = await _greeted_dm(alice, bot)
                reply = await _ask(alice, room_id, bot, question)
                final = await alice.wait_for_message(
                    room_id, sender=bot, body_contains=f"Echo: {question}", timeout=60
                )
                edits = [
                    m
                    for m in await alice.messages(room_id)
                    if (m.wire_relates_to or {}).get("rel_type") == "m.replace"
                    and (m.wire_relates_to or {}).get("event_id") == reply.event_id
                ]
                assert edits, "the answer should grow by edits"
                for edit in edits:
                    assert edit.encrypted
                    assert not edit.decryption_failure, edit.decryption_failure_reason
                assert edits[-1].content["m.new_content"]["body"] == f"Echo: {question}"
                assert final.sender == bot
            nursery.cancel_scope.cancel()


async def test_an_invited_member_gets_the_key_unless_history_is_for_joined_members_only(
    synapse: SynapseServer, make_user: MakeUser, tmp_path: Path
) -> None:
    bot_user, alice_user, bob_user = make_user("bot"), make_user("alice"), make_user("bob")
    bot, bob_id = bot_user.user_id, bob_user.user_id
    settings = bot_settings(synapse, bot_user, tmp_path / "store.sqlite3")
    with trio.fail_after(SCENARIO_S):
        async with (
            running_bot(settings) as runtime,
            open_js_client("alice") as alice,
            open_js_client("bob") as bob,
            client_for(synapse, alice_user) as alice_plain,
        ):
            await _logged_in(alice, synapse, alice_user)
            await _logged_in(bob, synapse, bob_user)
            crypto = runtime._crypto
            assert crypto is not None
            shared_with_bob = {}
            answers = {}
            for visibility in ("shared", "joined"):
                room_id = await _greeted_dm(alice, bot)
                await alice_plain.put_state_event(
                    RoomID(room_id), "m.room.history_visibility", {"history_visibility": visibility}
                )
                await alice.invite(room_id, bob_id)
                answer = await _ask(alice, room_id, bot, f"while bob is invited ({visibility})")
                answers[visibility] = (room_id, answer.event_id)
                outbound = crypto.machine._groups.outbound(room_id)
                assert outbound is not None
                shared_with_bob[visibility] = {d for u, d in outbound.shared_with if u == bob_id}
            assert shared_with_bob["shared"]  # his device had the key before he joined
            assert not shared_with_bob["joined"]

            # And it is the key he reads the answer with once he joins.
            room_id, answer_id = answers["shared"]
            await bob.join(room_id)
            seen = await bob.wait_for_message(
                room_id, sender=bot, body_contains="while bob is invited", timeout=60
            )
            assert seen.event_id == answer_id
            _assert_readable(seen)


async def test_the_bots_device_is_cross_signed_by_its_account(
    synapse: SynapseServer, make_user: MakeUser, tmp_path: Path
) -> None:
    bot_user, alice_user = make_user("bot"), make_user("alice")
    bot = UserID(bot_user.user_id)
    settings = bot_settings(synapse, bot_user, tmp_path / "store.sqlite3")
    with trio.fail_after(SCENARIO_S):
        async with client_for(synapse, alice_user) as alice:
            with capture_logs() as logs:
                async with running_bot(settings) as runtime:
                    crypto = runtime._crypto
                    assert crypto is not None
                    # Done after the bot is ready; each step is a store write.
                    while crypto.own.get("cross_signed_device") != bot_user.device_id:
                        await runtime._store.wait_for_change()
            answer = await alice.query_keys({bot: []})
            master, ssk = answer.master_keys[bot], answer.self_signing_keys[bot]
            assert verify_cross_signing_keys(bot, master, ssk)
            device = answer.device_keys[bot][bot_user.device_id]
            assert device_signed_by_self_signing_key(device, ssk)
            # And the device signed the master key (as matrix-rust-sdk's devices do);
            # Synapse shows a user's signatures of their own keys to that user only.
            async with client_for(synapse, bot_user) as itself:
                own_master = (await itself.query_keys({bot: []})).master_keys[bot]
            device_key_id = f"ed25519:{bot_user.device_id}"
            assert verify(own_master, bot, device_key_id, device["keys"][device_key_id])
            # A restart signs nothing again and makes no keys.
            with capture_logs() as again:
                async with running_bot(settings):
                    pass
            assert not [
                e for e in again if e["event"].startswith(("cross_signing", "device_cross"))
            ]

            # And a client nobody here wrote sees it so too (once it tracks the bot's
            # devices: a room shared with it).
            async with running_bot(settings), open_js_client("alice") as js:
                await _logged_in(js, synapse, alice_user)
                await _greeted_dm(js, bot)
                [seen] = [d for d in await js.devices(bot) if d.device_id == bot_user.device_id]
                assert seen.signed_by_owner
            created = [e for e in logs if e["event"] == "cross_signing_created"]
            assert len(created) == 1


async def test_a_client_that_excludes_insecure_devices_still_talks_with_the_bot(
    synapse: SynapseServer, make_user: MakeUser, tmp_path: Path
) -> None:
    # Element's "exclude insecure devices" (MSC4153): keys only for devices their owner
    # cross-signed, and only their events decrypt. The bot's device is cross-signed, so
    # the conversation works both ways. (Without the bot's cross-signing, the person's
    # client refuses the greeting: "the sending device was not signed by the user's
    # identity".)
    bot_user, alice_user = make_user("bot"), make_user("alice")
    bot = bot_user.user_id
    settings = bot_settings(synapse, bot_user, tmp_path / "store.sqlite3")
    with trio.fail_after(SCENARIO_S):
        async with running_bot(settings) as runtime, open_js_client("alice") as alice:
            crypto = runtime._crypto
            assert crypto is not None
            while crypto.own.get("cross_signed_device") != bot_user.device_id:
                await runtime._store.wait_for_change()
            await _logged_in(alice, synapse, alice_user)
            assert await alice.bootstrap_cross_signing(alice_user.password)
            await alice.set_device_isolation(only_signed=True)
            room_id = await _greeted_dm(alice, bot)
            answer = await _ask(alice, room_id, bot, "only to signed devices")
            assert answer.body == "only to signed devices"
