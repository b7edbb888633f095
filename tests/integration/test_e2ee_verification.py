"""A person verifies the bot from their client (SAS, emoji), against Synapse.

The person is matrix-js-sdk with its Rust crypto (js_client.py), doing what Element's
"verify this device" does: a to-device request to the bot's device, emoji, "they
match". The bot runs in-process; what it shows the operator is read from its log.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio
from structlog.testing import capture_logs

from bot.config import AllowList
from bot.runtime import BotRuntime
from bot_harness import bot_settings, running_bot
from js_client import JsClient, JsClientError, Login, Verification, open_js_client
from matrix_api.models import UserID
from matrix_api.testing.synapse import RegisteredUser, SynapseServer
from matrix_helpers import MakeUser, client_for

SCENARIO_S = 180


async def _cross_signed(runtime: BotRuntime, device_id: str) -> None:
    """Until the bot's device is signed by its account's keys (a background step)."""
    crypto = runtime._crypto
    assert crypto is not None
    with trio.fail_after(60):
        while crypto.own.get("cross_signed_device") != device_id:
            await runtime._store.wait_for_change()


async def _person(
    synapse: SynapseServer, js: JsClient, user: RegisteredUser, bot: RegisteredUser
) -> Login:
    """Logged in, with an encrypted direct chat with the bot: the client follows the
    bot's devices from then on (it verifies only devices it follows, as Element)."""
    login = await js.login(synapse.base_url, user.user_id, user.password)
    await js.create_encrypted_dm(bot.user_id)
    return login


async def _request(js: JsClient, bot: RegisteredUser) -> Verification:
    with trio.fail_after(30):
        while True:
            try:
                request = await js.request_device_verification(bot.user_id, bot.device_id)
                break
            except JsClientError as exc:
                if "Not a known device" not in exc.message:
                    raise
            await trio.sleep(0.5)  # the client's first query of the bot's keys is on its way
    return await js.wait_verification(request, ["ready", "cancelled"], timeout=60)


@contextmanager
def _bot_log() -> Iterator[list[dict[str, Any]]]:
    with capture_logs() as logs:
        yield logs


def _events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


async def _logged(logs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The bot's first log line ``name``, once it is written."""
    with trio.fail_after(30):
        while not _events(logs, name):  # noqa: ASYNC110  # a log line: nothing to wait on
            await trio.sleep(0.1)
    return _events(logs, name)[0]


async def test_a_user_verifies_the_bot_with_emoji(
    synapse: SynapseServer, make_user: MakeUser, tmp_path: Path
) -> None:
    bot, alice = make_user("bot"), make_user("alice")
    settings = bot_settings(synapse, bot, tmp_path / "store.sqlite3", password=bot.password)
    with trio.fail_after(SCENARIO_S), _bot_log() as logs:
        async with running_bot(settings) as runtime, open_js_client("alice") as js:
            await _cross_signed(runtime, bot.device_id)
            device = await _person(synapse, js, alice, bot)
            # Alice has her own cross-signing, so verifying the bot's identity means her
            # user-signing key signs it (as Element does).
            assert await js.bootstrap_cross_signing(alice.password)
            before = await js.verification_status(bot.user_id, bot.device_id)
            assert before.device_signed_by_owner
            assert not before.device_verified
            assert not before.user_cross_signing_verified

            # First the emoji do not match (Alice says so): nothing is verified.
            ready = await _request(js, bot)
            assert ready.phase == "ready"
            assert ready.other_supports_sas
            shown = await js.start_sas(ready, timeout=60)
            assert shown.emoji is not None
            ended = await js.confirm_sas(shown, match=False, timeout=60)
            assert ended.verify_error is not None
            cancelled = await _logged(logs, "verification_cancelled")
            assert cancelled["code"] == "m.mismatched_sas"
            assert cancelled["by_bot"] is False
            assert not (await js.verification_status(bot.user_id, bot.device_id)).device_verified

            # Then they match.
            ready = await _request(js, bot)
            assert ready.phase == "ready"
            shown = await js.start_sas(ready, timeout=60)
            # Both sides show the same numbers and emoji: Alice's screen and the line the
            # operator reads in the bot's log.
            sas_lines = _events(logs, "verification_sas")
            assert len(sas_lines) == 2
            line = sas_lines[-1]
            assert line["user_id"] == alice.user_id
            assert line["device_id"] == device.device_id
            assert line["decimals"] == shown.decimals
            assert line["emoji"] == shown.emoji
            assert line["transaction_id"] == shown.transaction_id
            finished = await js.confirm_sas(shown, timeout=60)
            assert finished.verify_done, finished
            assert finished.verify_error is None
            done = await js.wait_verification(finished, ["done"])
            assert done.phase == "done"

            # Alice's client now trusts the bot: its device, and its identity (the bot's
            # MAC covered its master key, which signs the device).
            # (Her client uploads its signature of the bot's key, then reads it back.)
            with trio.fail_after(30):
                while True:
                    after = await js.verification_status(bot.user_id, bot.device_id)
                    if after.user_cross_signing_verified:
                        break
                    await trio.sleep(0.2)
            assert after.device_locally_verified
            assert after.device_verified
            assert after.user_cross_signing_verified
            assert after.device_cross_signing_verified

            # The bot verified Alice's device and her master key, and signed that key
            # with its user-signing key.
            await _logged(logs, "verification_user_signed")
        [verified] = _events(logs, "verification_done")
        assert verified["user_id"] == alice.user_id
        assert verified["device_id"] == device.device_id
        assert verified["decimals"] == shown.decimals
        async with client_for(synapse, bot) as as_bot:
            keys = await as_bot.query_keys({alice.user_id: []})
        master = keys.master_keys[UserID(alice.user_id)]
        assert verified["master_key"] in [k.split(":", 1)[1] for k in master["keys"]]
        assert bot.user_id in master.get("signatures", {})
        assert not _events(logs, "verification_send_failed")


async def test_a_user_who_may_not_use_the_bot_is_refused(
    synapse: SynapseServer, make_user: MakeUser, tmp_path: Path
) -> None:
    bot, eve = make_user("bot"), make_user("eve")
    only_someone_else = AllowList(users=frozenset({f"@someone:{synapse.server_name}"}))
    settings = bot_settings(synapse, bot, tmp_path / "store.sqlite3", allowed=only_someone_else)
    with trio.fail_after(SCENARIO_S), _bot_log() as logs:
        async with running_bot(settings), open_js_client("eve") as js:
            await _person(synapse, js, eve, bot)
            refused = await _request(js, bot)
            assert refused.phase == "cancelled"
            assert refused.cancellation_code == "m.user"
            assert refused.cancelling_user_id == bot.user_id
            status = await js.verification_status(bot.user_id, bot.device_id)
            assert not status.device_verified
        [cancelled] = _events(logs, "verification_cancelled")
        assert cancelled["user_id"] == eve.user_id
        assert cancelled["by_bot"] is True
        assert cancelled["code"] == "m.user"
        assert not _events(logs, "verification_sas")


async def test_a_user_verifies_the_bot_in_their_direct_chat(
    synapse: SynapseServer, make_user: MakeUser, tmp_path: Path
) -> None:
    """Element's "verify user": the verification runs as (encrypted) events in the
    direct chat, and the bot answers there."""
    bot, alice = make_user("bot"), make_user("alice")
    settings = bot_settings(synapse, bot, tmp_path / "store.sqlite3", password=bot.password)
    with trio.fail_after(SCENARIO_S), _bot_log() as logs:
        async with running_bot(settings) as runtime, open_js_client("alice") as js:
            await _cross_signed(runtime, bot.device_id)
            device = await js.login(synapse.base_url, alice.user_id, alice.password)
            assert await js.bootstrap_cross_signing(alice.password)
            room_id = await js.create_encrypted_dm(bot.user_id)
            greeting = await js.wait_for_message(room_id, sender=bot.user_id, timeout=60)
            assert not greeting.decryption_failure
            request = await js.request_verification_dm(bot.user_id, room_id)
            ready = await js.wait_verification(request, ["ready", "cancelled"], timeout=60)
            assert ready.phase == "ready", ready
            assert ready.transaction_id is not None  # the request's event id
            shown = await js.start_sas(ready, timeout=60)
            line = await _logged(logs, "verification_sas")
            assert (line["user_id"], line["device_id"]) == (alice.user_id, device.device_id)
            assert line["decimals"] == shown.decimals
            assert line["emoji"] == shown.emoji
            assert line["transaction_id"] == shown.transaction_id
            finished = await js.confirm_sas(shown, timeout=60)
            assert finished.verify_done, finished
            with trio.fail_after(30):
                while True:
                    status = await js.verification_status(bot.user_id, bot.device_id)
                    if status.user_cross_signing_verified:
                        break
                    await trio.sleep(0.2)
            assert status.device_cross_signing_verified
            await _logged(logs, "verification_user_signed")
            # The verification's messages are not chat messages: the bot answered none.
            from_bot = [m for m in await js.messages(room_id) if m.sender == bot.user_id]
            assert [m.body for m in from_bot if m.type == "m.room.message"] == [greeting.body]
            # And the bot's verification messages went encrypted, like everything it sends
            # into an encrypted room.
            steps = [m for m in from_bot if m.type.startswith("m.key.verification.")]
            assert {m.type for m in steps} >= {
                "m.key.verification.ready",
                "m.key.verification.accept",
                "m.key.verification.key",
                "m.key.verification.mac",
                "m.key.verification.done",
            }
            assert all(m.encrypted and not m.decryption_failure for m in steps)
        [verified] = _events(logs, "verification_done")
        assert verified["master_key"] is not None
        assert not _events(logs, "verification_send_failed")
