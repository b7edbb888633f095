"""The operator's commands against a real Synapse: dev, reset --local/--server, doctor."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import trio

from bot.invites import GREETING
from bot_harness import Person, bot_process_env, bot_settings, running_bot
from conftest import MakeUser
from matrix_api import MatrixClient
from matrix_api.testing.synapse import RegisteredUser, SynapseServer


def _bot(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        stdin=subprocess.DEVNULL,
    )


async def _a_chat(
    synapse: SynapseServer, bot: RegisteredUser, make_user: MakeUser, store: Path
) -> str:
    """One chat made the usual way: a fresh user invites the bot, which greets; and
    the bot's start-up work is done (its device cross-signed)."""
    alice = Person(synapse, make_user("alice"))
    try:
        async with running_bot(bot_settings(synapse, bot, store)) as runtime:
            room_id = await alice.client.create_room(name="chat", invite=[bot.user_id])
            await alice.wait_until(
                lambda: any(
                    e.content.get("body") == GREETING
                    for e in alice.bot_notices(room_id, bot.user_id)
                ),
                what="the greeting",
            )
            crypto = runtime._crypto
            assert crypto is not None
            with trio.fail_after(60):
                while crypto.own.get("cross_signed_device") != bot.device_id:
                    await runtime._store.wait_for_change()
    finally:
        await alice.aclose()
    return room_id


async def test_reset_local_deletes_the_store_only_when_confirmed(
    synapse: SynapseServer, make_user: MakeUser, tmp_path: Path
) -> None:
    bot = make_user("bot")
    store = tmp_path / "store.sqlite3"
    await _a_chat(synapse, bot, make_user, store)
    env = bot_process_env(synapse, bot, store)

    refused = await trio.to_thread.run_sync(lambda: _bot("reset", "--local", env=env))
    assert refused.returncode == 1
    assert store.exists()

    done = await trio.to_thread.run_sync(lambda: _bot("reset", "--local", "--yes", env=env))
    assert done.returncode == 0, done.stderr
    assert not store.exists()
    assert "restores the chats from the server" in done.stdout


async def test_reset_server_is_a_dry_run_until_yes_then_releases_every_room(
    synapse: SynapseServer, make_user: MakeUser, tmp_path: Path
) -> None:
    bot = make_user("bot")
    store = tmp_path / "store.sqlite3"
    room_id = await _a_chat(synapse, bot, make_user, store)
    env = bot_process_env(synapse, bot, store)

    dry = await trio.to_thread.run_sync(lambda: _bot("reset", "--server", env=env))
    assert dry.returncode == 0, dry.stderr
    assert f"Would clear the marker of chat {room_id}" in dry.stdout
    # It says what it leaves: the encryption identity and its secret storage.
    assert "cross-signing keys and its secret storage" in dry.stdout
    async with MatrixClient(
        synapse.base_url, access_token=bot.access_token, user_id=bot.user_id
    ) as client:
        assert room_id in await client.joined_rooms()

        done = await trio.to_thread.run_sync(lambda: _bot("reset", "--server", "--yes", env=env))
        assert done.returncode == 0, done.stdout + done.stderr
        assert "1 of 1 room(s) released" in done.stdout
        assert await client.joined_rooms() == []
        again = await trio.to_thread.run_sync(lambda: _bot("reset", "--server", env=env))
        assert "manages no rooms" in again.stdout


async def test_doctor_reports_healthy_and_broken_setups(
    synapse: SynapseServer, make_user: MakeUser, tmp_path: Path
) -> None:
    bot = make_user("bot")
    store = tmp_path / "store.sqlite3"
    await _a_chat(synapse, bot, make_user, store)
    before = store.read_bytes()

    healthy = await trio.to_thread.run_sync(
        lambda: _bot("doctor", env=bot_process_env(synapse, bot, store))
    )
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert "FAIL" not in healthy.stdout
    assert "known 1" in healthy.stdout  # the one chat, as the store has it
    # The device the bot made its keys for, as the store and the server have it.
    assert re.search(r"ok\s+encryption: device \S+, keys published", healthy.stdout)
    # The bot ran: its account has cross-signing keys, its device is signed, and the
    # recovery key is in its file.
    assert re.search(
        r"ok\s+cross-signing: master key \S+, device \S+ signed by it; recovery key: \S+",
        healthy.stdout,
    )
    # And its key backup (made after cross-signing; a stop before that: "none yet").
    assert re.search(r"ok\s+key backup: (version \S+, \d+ room keys|none yet)", healthy.stdout)
    assert store.read_bytes() == before, "doctor must not change the store"

    bad_token = await trio.to_thread.run_sync(
        lambda: _bot(
            "doctor", env=bot_process_env(synapse, bot, store, MATRIX_ACCESS_TOKEN="syt_wrong")
        )
    )
    assert bad_token.returncode != 0
    assert re.search(r"FAIL\s+credentials: .*M_UNKNOWN_TOKEN", bad_token.stdout)
    assert "syt_wrong" not in bad_token.stdout + bad_token.stderr

    no_server = await trio.to_thread.run_sync(
        lambda: _bot(
            "doctor",
            env=bot_process_env(synapse, bot, store, MATRIX_HOMESERVER="http://127.0.0.1:9"),
        )
    )
    assert no_server.returncode != 0
    assert "FAIL  homeserver: not reachable" in no_server.stdout


def test_dev_starts_a_homeserver_and_the_bot_and_stops_both_on_ctrl_c(tmp_path: Path) -> None:
    data_dir = tmp_path / "dev"
    log = tmp_path / "dev.out"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bot", "dev", "--data-dir", str(data_dir)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 90
        while "bot_ready" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        text = log.read_text()
        homeserver = re.search(r"homeserver\s+(http://127\.0\.0\.1:\d+)", text)
        user = re.search(r"user\s+(@\S+)", text)
        password = re.search(r"password\s+(\S+)", text)
        assert homeserver
        assert user
        assert password

        async def log_in_as_the_printed_user() -> str:
            async with MatrixClient(homeserver.group(1)) as client:
                login = await client.login_password(user.group(1), password.group(1))
                return login.user_id

        assert trio.run(log_in_as_the_printed_user) == user.group(1)
        synapse_pid = int((data_dir / "synapse" / "synapse.pid").read_text())
        # What a newcomer sees: what it is doing while it starts, logs without colour
        # codes in a file, the accounts file private from its creation, and a doctor
        # command that works as printed.
        assert text.index("starting a local Synapse") < text.index("Synapse is up after")
        assert "\x1b[" not in text
        assert (data_dir / "accounts.json").stat().st_mode & 0o777 == 0o600
        doctor_line = next(
            line.strip() for line in text.splitlines() if line.strip().endswith(" -m bot doctor")
        )
        *assignments, python, dash_m, module, command = shlex.split(doctor_line)
        assert (dash_m, module, command) == ("-m", "bot", "doctor")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MATRIX_", "BOT_"))}
        env.update(assignment.split("=", 1) for assignment in assignments)
        doctor = subprocess.run(
            [python, "-m", "bot", "doctor"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert doctor.stderr == ""
        assert "chats" in doctor.stdout

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The homeserver went with it.
    deadline = time.monotonic() + 15
    while Path(f"/proc/{synapse_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(f"/proc/{synapse_pid}").exists()
