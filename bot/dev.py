"""``python -m bot dev``: try the bot against a throwaway local Synapse.

Everything lives in one folder (``.surfaces-dev/`` by default): the homeserver's
data, the two accounts made for it (kept in ``accounts.json``, so a second run
reuses them and their rooms), and the bot's store, all created private to the user
(files 0600, directories 0700: bot.file_modes). Ctrl-C stops the bot (draining
as usual) and then the homeserver.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from matrix_api.testing.synapse import SynapseServer

from .config import AllowList, Settings
from .file_modes import PRIVATE_UMASK, make_private_dir

__all__ = ["DevAccounts", "dev_settings", "maintenance_command", "run_dev"]

DEFAULT_DATA_DIR = Path(".surfaces-dev")
BOT_LOCALPART = "surfaces-bot"
USER_LOCALPART = "me"


@dataclass(frozen=True)
class DevAccounts:
    bot_user_id: str
    bot_password: str
    user_id: str
    user_password: str


def _accounts(hs: SynapseServer, data_dir: Path) -> DevAccounts:
    path = data_dir / "accounts.json"
    if path.exists():
        saved = json.loads(path.read_text())
        return DevAccounts(**saved)
    bot = hs.register_user(BOT_LOCALPART, secrets.token_urlsafe(12))
    user = hs.register_user(USER_LOCALPART, secrets.token_urlsafe(9))
    accounts = DevAccounts(bot.user_id, bot.password, user.user_id, user.password)
    # Created 0600 (the run's umask would narrow it anyway): never readable by others,
    # not even between a write and a chmod.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(json.dumps(accounts.__dict__, indent=2))
    return accounts


def dev_settings(hs: SynapseServer, accounts: DevAccounts, data_dir: Path) -> Settings:
    return Settings(
        homeserver=hs.base_url,
        user_id=accounts.bot_user_id,
        password=accounts.bot_password,
        store_path=data_dir / "bot.sqlite3",
        allowed=AllowList(servers=frozenset({hs.server_name})),
        admins=frozenset({accounts.user_id}),
        log_format="console",
    )


def maintenance_command(settings: Settings, command: str) -> str:
    """The shell line that runs ``python -m bot <command>`` against this dev setup."""
    env = {
        "MATRIX_HOMESERVER": settings.homeserver,
        "MATRIX_USER_ID": settings.user_id,
        "MATRIX_PASSWORD": settings.password or "",
        "BOT_STORE_PATH": str(settings.store_path),
    }
    assignments = " ".join(f"{name}={shlex.quote(value)}" for name, value in env.items())
    return f"{assignments} {shlex.quote(sys.executable)} -m bot {command}"


def run_dev(data_dir: Path, serve: Callable[[Settings], int], out: TextIO = sys.stdout) -> int:
    """Start Synapse in ``data_dir``, make the accounts, print how to connect, and
    run ``serve(settings)`` (the CLI's service runner) until it returns its exit code.
    The homeserver is stopped whatever happens."""
    data_dir = data_dir.absolute()
    # Everything made during the run (Synapse's database and signing key, the accounts,
    # the bot's store) is private to this user: the umask is set before any of it is
    # created, for the whole run (Synapse inherits it), and restored after.
    previous_umask = os.umask(PRIVATE_UMASK)
    try:
        return _run_dev(data_dir, serve, out)
    finally:
        os.umask(previous_umask)


def _run_dev(data_dir: Path, serve: Callable[[Settings], int], out: TextIO) -> int:
    make_private_dir(data_dir)
    mode = stat.S_IMODE(data_dir.stat().st_mode)
    if mode & 0o077:  # made by an earlier version, or by hand: left as it is
        out.write(
            f"surfaces-bot dev: note: {data_dir} is {mode:04o}: other users may read the "
            f"passwords and data in it; to fix: chmod -R go-rwx {shlex.quote(str(data_dir))}\n"
        )
    started = time.monotonic()
    out.write(
        "surfaces-bot dev: starting a local Synapse in "
        f"{data_dir} (the first time, installing it takes a minute or two) ...\n"
    )
    out.flush()
    with SynapseServer(data_dir / "synapse") as hs:
        accounts = _accounts(hs, data_dir)
        settings = dev_settings(hs, accounts, data_dir)
        out.write(f"surfaces-bot dev: Synapse is up after {time.monotonic() - started:.0f} s.\n")
        out.write(
            "\n".join(
                [
                    "",
                    "surfaces-bot dev: a local Synapse is running for you.",
                    f"  homeserver  {hs.base_url}",
                    f"  user        {accounts.user_id}",
                    f"  password    {accounts.user_password}",
                    f"  bot         {accounts.bot_user_id}",
                    "",
                    "Log in with any Matrix client (e.g. Element: 'Sign in', edit the "
                    "homeserver), create a room and invite the bot. Ctrl-C stops everything.",
                    f"Everything is kept in {data_dir}.",
                    "",
                    "To check on the bot or reset it, in another terminal while this runs:",
                    f"  {maintenance_command(settings, 'doctor')}",
                    f"  {maintenance_command(settings, 'reset --local')}  (after Ctrl-C)",
                    "",
                    "",
                ]
            )
        )
        out.flush()
        return serve(settings)
