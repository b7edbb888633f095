"""What one scenario owns and stops on the way out (`FaultLab`, `fault_lab`), and the
set-up the scenarios share: seeds, managed rooms, admin requests, a `Stage`.

`fault_lab` stops every bot it started by pid, even after a failure, then scans every
log line the bots wrote for the secrets it handed out (access tokens, passwords) and
for lines that are not JSON log records (a raw traceback means a crash).
"""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import trio

from bot.chats import CHAT_MARKER, Chat, marker_content, new_chat_id, now_ms
from faults.harness.bot_process import BotProcess, bot_env
from faults.harness.proxy import FaultProxy, open_fault_proxy
from faults.harness.traffic import Traffic
from matrix_api import (
    MatrixClient,
    RetryPolicy,
)
from matrix_api.models import RoomID
from matrix_api.testing.synapse import RegisteredUser, SynapseServer

DEFAULT_SEED = 5
"""The issue's number; ``FAULT_SEED=<n>`` in the environment replays another run."""


def seed_from_env() -> int:
    return int(os.environ.get("FAULT_SEED", DEFAULT_SEED))


class FaultLab:
    """Owns what one scenario starts; see `fault_lab`."""

    def __init__(self, workdir: Path, seed: int) -> None:
        self.workdir = workdir
        self.seed = seed
        self.rng = random.Random(seed)
        self.bots: list[BotProcess] = []
        self.secrets: set[str] = set()
        self.captured: list[str] = []
        """Other captured output to scan (in-process bots' log records)."""
        self._clients: list[MatrixClient] = []

    def remember_secret(self, *values: str | None) -> None:
        self.secrets.update(v for v in values if v)

    async def user(
        self,
        hs: SynapseServer,
        prefix: str,
        *,
        admin: bool = False,
        password: str | None = None,
    ) -> RegisteredUser:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        user = await trio.to_thread.run_sync(partial(hs.register_user, name, password, admin=admin))
        self.remember_secret(user.access_token, user.password)
        return user

    def client(
        self,
        homeserver: str,
        user: RegisteredUser | None = None,
        *,
        access_token: str | None = None,
        user_id: str | None = None,
    ) -> MatrixClient:
        """A client the lab closes; as ``user`` or with an explicit token.

        It tries each request once: `Traffic` and the collector retry on their own,
        quietly, so the only retry logs are the bot's.
        """
        client = MatrixClient(
            homeserver,
            access_token=user.access_token if user is not None else access_token,
            user_id=user.user_id if user is not None else user_id,
            retry_policy=RetryPolicy(max_attempts=1),
        )
        self._clients.append(client)
        return client

    def bot(
        self,
        homeserver: str,
        user_id: str,
        *,
        access_token: str | None = None,
        password: str | None = None,
        device_id: str | None = None,
        name: str = "bot",
        store: Path | None = None,
        drain_s: float = 5.0,
        allowed: Sequence[str] = (),
        level: str = "info",
    ) -> BotProcess:
        self.remember_secret(access_token, password)
        taken = {bot.name for bot in self.bots}
        if name in taken:  # each bot its own store and log files
            name = next(f"{name}{n}" for n in range(2, 100) if f"{name}{n}" not in taken)
        log_dir = self.workdir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        env = bot_env(
            homeserver,
            user_id,
            store or self.workdir / f"{name}.sqlite3",
            access_token=access_token,
            password=password,
            device_id=device_id,
            drain_s=drain_s,
            allowed=allowed,
            level=level,
        )
        process = BotProcess(name, env, log_dir)
        self.bots.append(process)
        return process

    async def ready_bot(self, s: Stage, **options: Any) -> BotProcess:
        """`bot` for the stage's bot user (its token) on ``s.homeserver``, ``options``
        as there; started, and ready (it has logged ``bot_ready``)."""
        bot = self.bot(
            s.homeserver, s.bot_user.user_id, access_token=s.bot_user.access_token, **options
        )
        await bot.start()
        await bot.wait_ready()
        return bot

    @asynccontextmanager
    async def proxy(self, upstream: str) -> AsyncIterator[FaultProxy]:
        """`open_fault_proxy`, with every URL it saw kept for the secret scan."""
        async with open_fault_proxy(upstream) as proxy:
            try:
                yield proxy
            finally:
                self.captured.append("\n".join(proxy.targets))

    def leaks(self) -> list[str]:
        """Where a secret shows up in captured output (never the secret itself)."""
        found: list[str] = []
        texts: list[tuple[str, str]] = []
        for bot in self.bots:
            texts.extend(
                (run.log_path.name, run.log_path.read_text(errors="replace")) for run in bot.runs
            )
        texts.extend((f"captured #{i}", text) for i, text in enumerate(self.captured))
        for where, text in texts:
            for number, secret in enumerate(sorted(self.secrets)):
                if len(secret) >= 8 and secret in text:
                    found.append(f"secret #{number} ({len(secret)} chars) appears in {where}")
        return found

    def stray_output(self) -> list[str]:
        """Lines a bot wrote that are not JSON log records (a raw traceback, a warning)."""
        found: list[str] = []
        for bot in self.bots:
            for run in bot.runs:
                bot.records(run.number)
                found.extend(f"{run.log_path.name}: {line[:300]}" for line in run.stray_lines)
        return found

    async def aclose(self) -> None:
        """Stop every bot (by its process) and close every client, whatever fails."""
        async with AsyncExitStack() as stack:
            for client in self._clients:
                stack.push_async_callback(client.aclose)
            for bot in self.bots:
                stack.push_async_callback(bot.stop)


@asynccontextmanager
async def fault_lab(workdir: Path, seed: int | None = None) -> AsyncIterator[FaultLab]:
    """A `FaultLab` for the body; afterwards every bot is stopped (by pid), and the
    captured output is checked: no secret handed out appears in it, and every line a
    bot wrote is a JSON log record (a raw traceback would mean a crash)."""
    lab = FaultLab(workdir, seed_from_env() if seed is None else seed)
    print(f"\nfault seed {lab.seed} (FAULT_SEED=<n> replays another)", flush=True)
    try:
        yield lab
    finally:
        with trio.CancelScope(shield=True):
            await lab.aclose()
    leaks = lab.leaks()
    assert not leaks, "secrets in captured output:\n" + "\n".join(leaks)
    stray = lab.stray_output()
    assert not stray, "a bot wrote something other than JSON log lines:\n" + "\n".join(stray)


async def managed_rooms(
    homeserver: str,
    bots: Sequence[RegisteredUser],
    owner: RegisteredUser,
    count: int,
    *,
    members: Sequence[RegisteredUser] = (),
    name: str = "fault chat",
) -> list[RoomID]:
    """Rooms ``owner`` made and each bot took on (marker written, joined), as if the
    bot had accepted the invite; ``members`` join too."""
    rooms: list[RoomID] = []
    async with AsyncExitStack() as stack:

        def client(user: RegisteredUser) -> MatrixClient:
            return MatrixClient(homeserver, access_token=user.access_token, user_id=user.user_id)

        as_owner = await stack.enter_async_context(client(owner))
        as_bots = [await stack.enter_async_context(client(b)) for b in bots]
        as_members = [await stack.enter_async_context(client(m)) for m in members]
        for index in range(count):
            title = f"{name} {index}"
            room_id = await as_owner.create_room(
                name=title,
                preset="private_chat",
                invite=[u.user_id for u in (*bots, *members)],
            )
            for as_bot in as_bots:
                chat = Chat(new_chat_id(), room_id, owner.user_id, title, now_ms())
                await as_bot.put_room_account_data(room_id, CHAT_MARKER, marker_content(chat))
                await as_bot.join_room(room_id)
            for as_member in as_members:
                await as_member.join_room(room_id)
            rooms.append(room_id)
    return rooms


async def admin_request(
    homeserver: str, admin: RegisteredUser, method: str, path: str, body: Any = None
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=homeserver, timeout=30.0) as http:
        response = await http.request(
            method,
            path,
            json=body,
            headers={"Authorization": f"Bearer {admin.access_token}"},
        )
    if response.status_code >= 400:
        raise AssertionError(f"{method} {path}: HTTP {response.status_code} {response.text[:200]}")
    return response


def user_path(user_id: str) -> str:
    return quote(user_id, safe="")


@dataclass
class Stage:
    """A bot user, an owner, the chats between them, and the clients to drive them."""

    homeserver: str
    bot_user: RegisteredUser
    owner: RegisteredUser
    rooms: list[RoomID]
    sender: MatrixClient
    observer: MatrixClient
    traffic: Traffic


async def stage(
    lab: FaultLab,
    hs: SynapseServer,
    *,
    rooms: int,
    bot_user: RegisteredUser | None = None,
    owner: RegisteredUser | None = None,
    homeserver: str | None = None,
) -> Stage:
    homeserver = homeserver or hs.base_url
    bot_user = bot_user or await lab.user(hs, "bot")
    owner = owner or await lab.user(hs, "owner")
    room_ids = await managed_rooms(hs.base_url, [bot_user], owner, rooms)
    return Stage(
        homeserver,
        bot_user,
        owner,
        room_ids,
        lab.client(hs.base_url, owner),
        lab.client(hs.base_url, owner),
        Traffic([bot_user.user_id]),
    )
