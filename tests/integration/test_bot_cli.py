"""``python -m bot run`` as an operator runs it: a real process, real signals, exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bot_harness import bot_process_env
from conftest import MakeUser
from matrix_api.testing.synapse import SynapseServer


def _start(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "bot", "run"], env=env, stdout=sink, stderr=sink
        )


def _events(log: Path) -> list[dict[str, object]]:
    records = []
    for line in log.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def _wait_for_event(proc: subprocess.Popen[bytes], log: Path, event: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(r.get("event") == event for r in _events(log)):
            return
        assert proc.poll() is None, f"bot exited early: {log.read_text()[-2000:]}"
        time.sleep(0.05)
    raise AssertionError(f"no {event} within 30 s: {log.read_text()[-2000:]}")


def test_sigterm_drains_and_exits_zero(
    synapse: SynapseServer, make_user: MakeUser, tmp_path: Path
) -> None:
    bot = make_user("bot")
    log = tmp_path / "bot.log"
    proc = _start(bot_process_env(synapse, bot, tmp_path / "store.sqlite3"), log)
    try:
        _wait_for_event(proc, log, "bot_ready")
        names = [r["event"] for r in _events(log)]
        assert names.index("matrix_reconcile_complete") < names.index("bot_ready")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    names = [r["event"] for r in _events(log)]
    assert names[-3:] == ["stop_requested", "bot_draining", "bot_stopped"] or (
        names.index("stop_requested") < names.index("bot_stopped")
    )
    # Every line is JSON, and none carries the access token.
    text = log.read_text()
    assert bot.access_token not in text
    assert all(line.startswith("{") for line in text.splitlines())


def test_a_second_bot_on_a_running_bots_store_is_refused_and_the_first_goes_on(
    synapse: SynapseServer, make_user: MakeUser, tmp_path: Path
) -> None:
    bot = make_user("bot")
    store = tmp_path / "store.sqlite3"
    env = bot_process_env(synapse, bot, store)
    first_log, third_log = tmp_path / "first.log", tmp_path / "third.log"
    first = _start(env, first_log)
    third: subprocess.Popen[bytes] | None = None
    try:
        _wait_for_event(first, first_log, "bot_ready")
        second = subprocess.run(
            [sys.executable, "-m", "bot", "run"],
            env={**env, "BOT_DRAIN_TIMEOUT_S": "1"},  # how long it waits for the store
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert second.returncode == 3
        records = [json.loads(line) for line in second.stderr.decode().splitlines()]
        (refused,) = [r for r in records if r["event"] == "store_unusable"]
        assert f"in use by another process (pid {first.pid})" in str(refused["error"])
        assert [r["event"] for r in records if r["event"] == "store_lock_wait"] == [
            "store_lock_wait"
        ]

        assert first.poll() is None
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=20) == 0
        # Once the first has stopped, the store is free at once.
        third = _start(env, third_log)
        _wait_for_event(third, third_log, "bot_ready")
    finally:
        for proc in (first, third):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert not any(r.get("level") in ("error", "warning") for r in _events(first_log))


def test_rejected_token_without_password_exits_non_zero_with_a_clear_message(
    synapse: SynapseServer, make_user: MakeUser, tmp_path: Path
) -> None:
    bot = make_user("bot")
    env = bot_process_env(
        synapse, bot, tmp_path / "store.sqlite3", MATRIX_ACCESS_TOKEN="syt_not_a_token"
    )
    result = subprocess.run(
        [sys.executable, "-m", "bot", "run"], env=env, capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 4
    fatal = [
        r for r in map(json.loads, result.stderr.decode().splitlines()) if r["event"] == "fatal"
    ]
    assert "M_UNKNOWN_TOKEN" in str(fatal[0]["error"])
    assert "syt_not_a_token" not in result.stderr.decode()


def test_unusable_store_exits_non_zero_and_leaves_the_file_alone(
    synapse: SynapseServer, make_user: MakeUser, tmp_path: Path
) -> None:
    bot = make_user("bot")
    store = tmp_path / "store.sqlite3"
    store.write_bytes(b"this is not a database" * 100)
    before = store.read_bytes()
    result = subprocess.run(
        [sys.executable, "-m", "bot", "run"],
        env=bot_process_env(synapse, bot, store),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 3
    assert b"store_unusable" in result.stderr
    assert store.read_bytes() == before


def test_missing_settings_are_named(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MATRIX_", "BOT_"))}
    result = subprocess.run(
        [sys.executable, "-m", "bot", "run"], env=env, capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 2
    err = result.stderr.decode()
    for name in ("MATRIX_HOMESERVER", "MATRIX_USER_ID", "MATRIX_ACCESS_TOKEN", "MATRIX_PASSWORD"):
        assert name in err
