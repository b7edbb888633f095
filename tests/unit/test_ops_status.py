"""``python -m bot status``: the running bot's listener read back for a person; the exit
code is the verdict."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator

import httpx
import pytest
import structlog
import trio

from bot.__main__ import main
from bot.config import Settings
from bot.ops.http import start_ops
from bot.ops.status import (
    EXIT_NOT_CONFIGURED,
    EXIT_NOT_READY,
    EXIT_READY,
    listener_url,
    run_status,
)
from test_ops_app import STEP_S, make_app


def settings(address: tuple[str, int] | None) -> Settings:
    return Settings(
        homeserver="https://hs.example.org",
        user_id="@bot:example.org",
        access_token="t",
        http_listen=address,
    )


async def test_not_configured_says_how_to_configure_it() -> None:
    said: list[str] = []
    assert await run_status(settings(None), said.append) == EXIT_NOT_CONFIGURED
    (line,) = said
    assert "BOT_HTTP_LISTEN" in line


async def test_reads_the_running_listener_and_exits_with_its_verdict() -> None:
    app, facts, metrics, phase = make_app()
    metrics.took_in("message", 3)
    metrics.finished("replied")
    metrics.finished("ignored")
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        with trio.fail_after(STEP_S):
            (bound,) = await start_ops(nursery, app, ("127.0.0.1", 0), stop.wait)
            port = int(bound.rpartition(":")[2])

            said: list[str] = []
            assert await run_status(settings(("127.0.0.1", port)), said.append) == EXIT_NOT_READY
            assert said[0] == f"surfaces-bot listener at http://127.0.0.1:{port}"
            assert "  ready:    no (phase reconciling)" in said
            assert "  healthy:  yes" in said

            facts.ready.set()
            facts.lanes_started = facts.sync_started = True
            phase[0] = "ready"
            facts.taking_messages()
            facts.sync_ok()
            facts.store_ok()
            said.clear()
            # A listener bound to every address is asked on loopback.
            assert await run_status(settings(("0.0.0.0", port)), said.append) == EXIT_READY  # noqa: S104
            assert "  ready:    yes (phase ready)" in said
            assert "  healthy:  yes" in said
            assert any(line.startswith("  sync:     last completed 0.") for line in said)
            assert (
                "  messages: received 3; replied 1, notified 0, ignored 1, failed 0, quarantined 0"
            ) in said
            assert "  version:  0.1.0" in said

            facts.store_failed(OSError("disk full"))
            said.clear()
            assert await run_status(settings(("127.0.0.1", port)), said.append) == EXIT_NOT_READY
            assert "  healthy:  no (store_unwritable)" in said
        stop.set()


async def test_no_listener_is_not_ready_with_the_reason() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    said: list[str] = []
    with trio.fail_after(STEP_S):
        assert await run_status(settings(("127.0.0.1", port)), said.append) == EXIT_NOT_READY
    assert said[1].startswith("  error:    no answer from http://127.0.0.1:")
    assert "ConnectError" in said[1]


async def test_something_else_on_the_port_is_not_taken_for_the_bot() -> None:
    def other(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, html="<html>hello</html>")

    said: list[str] = []
    code = await run_status(
        settings(("127.0.0.1", 9464)), said.append, transport=httpx.MockTransport(other)
    )
    assert code == EXIT_NOT_READY
    assert "does not answer as the bot's listener does" in said[1]


def test_ipv6_listeners_are_asked_with_brackets() -> None:
    assert listener_url(("::1", 9464)) == "http://[::1]:9464"
    assert listener_url(("::", 9464)) == "http://[::1]:9464"
    assert listener_url(("localhost", 1)) == "http://localhost:1"


@pytest.fixture
def bot_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A configured bot in the environment, no listener; the process's logging put back
    after `main` configured it."""
    for name in list(os.environ):
        if name.startswith(("MATRIX_", "BOT_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MATRIX_HOMESERVER", "https://hs.invalid")
    monkeypatch.setenv("MATRIX_USER_ID", "@bot:hs.invalid")
    monkeypatch.setenv("MATRIX_ACCESS_TOKEN", "syt_secret_token_value")
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_noisy = {name: logging.getLogger(name).level for name in ("httpx", "httpcore")}
    yield
    structlog.reset_defaults()
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)
    for name, level in saved_noisy.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.usefixtures("bot_environment")
def test_the_command_line_without_a_listener_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status"]) == EXIT_NOT_CONFIGURED
    assert "BOT_HTTP_LISTEN" in capsys.readouterr().out


@pytest.mark.usefixtures("bot_environment")
def test_the_command_line_with_nothing_listening_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("BOT_HTTP_LISTEN", f"127.0.0.1:{port}")
    assert main(["status"]) == EXIT_NOT_READY
    out = capsys.readouterr().out
    assert "no answer from" in out
    assert "syt_secret" not in out
