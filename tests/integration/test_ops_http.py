"""The operators' listener of a real ``python -m bot run`` process against the real Synapse:
it answers on its loopback port through a run (/readyz, /healthz, /metrics counting the
real exchange), ``python -m bot status`` reads it, and it is gone after SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
import sys
from pathlib import Path

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from bot.invites import GREETING
from bot_harness import Person, bot_process_env, replies_to
from conftest import MakeUser
from matrix_api.testing.synapse import SynapseServer

LIMIT_S = 90.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_the_listener_answers_during_a_real_run_and_status_reads_it(
    synapse: SynapseServer, make_user: MakeUser, tmp_path: Path
) -> None:
    bot = make_user("bot")
    alice = Person(synapse, make_user("alice"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = bot_process_env(
        synapse, bot, tmp_path / "store.sqlite3", BOT_HTTP_LISTEN=f"127.0.0.1:{port}"
    )
    log = tmp_path / "bot.log"
    with log.open("wb") as sink:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "bot", "run"], env=env, stdout=sink, stderr=sink
        )
    try:
        with trio.fail_after(LIMIT_S):
            async with httpx.AsyncClient(base_url=base, timeout=5.0, trust_env=False) as http:
                # Ready once reconciled and taking messages (503 or no answer before).
                while True:
                    assert proc.returncode is None, log.read_text()[-2000:]
                    try:
                        if (await http.get("/readyz")).status_code == 200:
                            break
                    except httpx.ConnectError:
                        pass
                    await trio.sleep(0.1)

                room_id = await alice.client.create_room(
                    name="ops", invite=[bot.user_id], preset="private_chat"
                )
                await alice.wait_until(
                    lambda: any(
                        e.content.get("body") == GREETING
                        for e in alice.bot_notices(room_id, bot.user_id)
                    ),
                    what="the bot's greeting",
                )
                asked = [await alice.say(room_id, f"question {i}") for i in range(3)]
                await alice.wait_until(
                    lambda: set(asked) <= set(replies_to(alice.bot_notices(room_id, bot.user_id))),
                    what="three answers",
                )

                health = await http.get("/healthz")
                assert health.status_code == 200, health.text
                metrics = await http.get("/metrics")
                assert metrics.status_code == 200
                found = samples(metrics.text)
                handled = found["surfaces_messages_handled_total", (("outcome", "replied"),)]
                # The answers go out before the store records them: at most a moment behind.
                while handled < 3:
                    await trio.sleep(0.1)
                    found = samples((await http.get("/metrics")).text)
                    handled = found["surfaces_messages_handled_total", (("outcome", "replied"),)]
                assert handled == 3
                assert found["surfaces_messages_received_total", (("kind", "invite"),)] == 1
                assert found["surfaces_chats_managed", ()] == 1
                assert found["surfaces_answer_latency_seconds_count", (("backend", "echo"),)] == 3
                send = "/_matrix/client/v3/rooms/{}/send/{}/{}"
                sent_ok = found[
                    "surfaces_matrix_requests_total",
                    (("endpoint", send), ("method", "PUT"), ("status", "200")),
                ]
                assert sent_ok >= 4  # the greeting and three answers
                assert room_id not in metrics.text
                assert bot.user_id not in metrics.text
                assert (await http.post("/metrics")).status_code == 405
                assert (await http.get(f"/rooms/{room_id}")).status_code == 404

                status = await trio.run_process(
                    [sys.executable, "-m", "bot", "status"],
                    env=env,
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
                out = status.stdout.decode()
                assert status.returncode == 0, out + status.stderr.decode()
                assert "  ready:    yes (phase ready)" in out
                assert "  healthy:  yes" in out
                assert "replied 3" in out
                assert bot.access_token not in out

            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
        with trio.fail_after(10):
            async with httpx.AsyncClient(base_url=base, timeout=2.0, trust_env=False) as http:
                try:
                    await http.get("/readyz")
                except httpx.ConnectError:
                    pass
                else:
                    raise AssertionError("the listener still answers after the bot exited")
        with trio.fail_after(30):
            status = await trio.run_process(
                [sys.executable, "-m", "bot", "status"],
                env=env,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        assert status.returncode == 1
        assert "no answer from" in status.stdout.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await alice.aclose()
    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    (listening,) = [r for r in records if r.get("event") == "ops_listening"]
    assert listening["addresses"] == [base]
    assert bot.access_token not in log.read_text()
