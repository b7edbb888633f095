"""Validated, frozen settings from a TOML file and the environment.

The environment wins over the file, so a deployment can keep secrets out of the
file. Every problem is reported at once, each naming the setting it is about:

    [matrix]                      # or MATRIX_HOMESERVER, MATRIX_USER_ID, ...
    homeserver = "https://matrix.example.org"
    user_id = "@bot:example.org"
    password = "..."              # or access_token = "..."
    device_id = "SURFACESBOT"     # optional; kept across logins
                                  # recovery_key: MATRIX_RECOVERY_KEY, from the environment

    [bot]
    store_path = "surfaces-bot.sqlite3"        # BOT_STORE_PATH
    store_url = "postgresql://bot@db/bot"      # BOT_STORE_URL: PostgreSQL instead (README)
    allowed_users = ["@alice:example.org", ":example.org"]   # BOT_ALLOWED_USERS (comma-separated)
    admins = ["@ops:example.org"]              # BOT_ADMINS
    command_prefix = "!"                       # BOT_COMMAND_PREFIX
    max_concurrent_answers = 16                # BOT_MAX_CONCURRENT_ANSWERS
    user_messages_burst = 20                   # BOT_USER_MESSAGES_BURST
    user_messages_per_s = 1.0                  # BOT_USER_MESSAGES_PER_S
    max_chats_per_user = 50                    # BOT_MAX_CHATS_PER_USER
    limits_exempt_admins = false               # BOT_LIMITS_EXEMPT_ADMINS
    redact_answers = false                     # BOT_REDACT_ANSWERS: a deleted message's answer too
    drain_timeout_s = 10                       # BOT_DRAIN_TIMEOUT_S
    standby = false                            # BOT_STANDBY: wait as a hot standby (README)
    backend = "echo"                           # BOT_BACKEND: echo | model | webhook
    backend_timeout_s = 300                    # BOT_BACKEND_TIMEOUT_S
    max_reply_parts = 16                       # BOT_MAX_REPLY_PARTS
    e2ee = true                                # BOT_E2EE: answer in encrypted rooms
    http_listen = "127.0.0.1:9464"             # BOT_HTTP_LISTEN: /readyz, /healthz, /metrics
    max_image_bytes = 10485760                 # BOT_MAX_IMAGE_BYTES: images read (10 MiB)
    max_text_file_bytes = 1048576              # BOT_MAX_TEXT_FILE_BYTES: text files read
    media_timeout_s = 30                       # BOT_MEDIA_TIMEOUT_S: one attachment's download
                                               # pickle_key: BOT_PICKLE_KEY, from the environment

    [model]                                    # backend = "model": MODEL_BASE_URL, ...
    base_url = "http://127.0.0.1:8080/v1"      # any OpenAI-compatible server
    model = "llama-3.1-8b-instruct"            # MODEL_NAME
                                               # api_key: MODEL_API_KEY, from the environment

    [webhook]                                  # backend = "webhook": WEBHOOK_URL, WEBHOOK_SECRET

    [logging]
    level = "info"                             # BOT_LOG_LEVEL
    format = "auto"                            # BOT_LOG_FORMAT: auto | json | console
    messages = true                            # BOT_LOG_MESSAGES: an info line per message
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from matrix_crypto.cross_signing import RecoveryKeyError, decode_recovery_key

from .backend_settings.model import ModelSettings, model_settings_from_env
from .backend_settings.reading import SettingsError, shown_url
from .backend_settings.timeouts import BACKEND_TIMEOUT_S, MODEL_ANSWER_CEILING_S
from .backend_settings.webhook import WebhookSettings, webhook_settings_from_env
from .store_location import is_postgres_url, sqlite_path

__all__ = ["AllowList", "ConfigError", "Settings", "load_settings"]

_USER_ID = re.compile(r"^@[^:\s]+:[A-Za-z0-9.\-\[\]:]+$")
_SERVER = re.compile(r"^[A-Za-z0-9.\-\[\]:]+$")
_LOG_LEVELS = ("debug", "info", "warning", "error")
_LOG_FORMATS = ("auto", "json", "console")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
BACKENDS = ("echo", "model", "webhook")
# Tables handed whole to their backend's own validation.
_BACKEND_TABLES = ("model", "webhook")


class ConfigError(Exception):
    """One or more settings are missing or invalid; the message lists them all."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems


@dataclass(frozen=True)
class AllowList:
    """Who may use the bot: whole user ids and whole servers (``:server``)."""

    users: frozenset[str] = frozenset()
    servers: frozenset[str] = frozenset()

    def allows(self, user_id: str) -> bool:
        if user_id in self.users:
            return True
        _, sep, server = user_id.partition(":")
        return bool(sep) and server in self.servers


@dataclass(frozen=True)
class Settings:
    homeserver: str
    user_id: str
    access_token: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    device_id: str | None = None
    recovery_key: str | None = field(default=None, repr=False)
    """The secret storage recovery key (base58, as clients show it); None: a key file
    beside the store (`bot.e2ee.secret_storage`)."""
    store_path: Path = Path("surfaces-bot.sqlite3")
    store_url: str | None = field(default=None, repr=False)
    """A PostgreSQL URL: the store is there, not at ``store_path`` (`bot.store_api`).
    Never shown: it may hold a password. A ``sqlite:///`` URL sets ``store_path``."""
    allowed: AllowList = AllowList()
    admins: frozenset[str] = frozenset()
    command_prefix: str = "!"
    max_concurrent_answers: int = 16
    """Backend calls at once, across all rooms (each room has its own lane)."""
    user_messages_burst: int = 20
    """Messages one user may send at once before the per-user limit applies."""
    user_messages_per_s: float = 1.0
    """How fast one user's allowance comes back (`bot.user_limits`)."""
    max_chats_per_user: int = 50
    """The most unarchived chats one user may have for ``!new`` to make another."""
    limits_exempt_admins: bool = False
    """Whether the admins are exempt from the two limits above."""
    redact_answers: bool = False
    """Whether a user's deleting (redacting) a message the bot answered redacts the
    answer too; by default the answer stays (the message leaves the context either way)."""
    drain_timeout_s: float = 10.0
    standby: bool = False
    """Wait for the store while another instance holds it, and go back to waiting
    when deposed (`bot.lease`); needs a PostgreSQL store."""
    backend: str = "echo"
    backend_timeout_s: float = BACKEND_TIMEOUT_S
    """The longest one reply may take, retries included; then the user is told."""
    max_reply_parts: int = 16
    """The most messages one answer may become; past that it is cut, with a note."""
    e2ee: bool = True
    """Whether the bot reads and answers in end-to-end encrypted rooms."""
    pickle_key: bytes | None = field(default=None, repr=False)
    """The 32-byte key the crypto state is encrypted with in the store; None: a key
    file beside the store (`bot.e2ee.pickle_key`)."""
    model: ModelSettings | None = None
    webhook: WebhookSettings | None = None
    http_listen: tuple[str, int] | None = None
    """Host and port of the operators' HTTP listener (`bot.ops`); None: no listener."""
    max_image_bytes: int = 10 * 1024 * 1024
    """The largest image downloaded for a vision model (`bot.attachments`)."""
    max_text_file_bytes: int = 1024 * 1024
    """The largest text file downloaded as context."""
    media_timeout_s: float = 30.0
    """The longest one attachment's download may take."""
    log_level: str = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    log_messages: bool = True
    """An info line for every message handled (never its content); off: debug lines."""

    @property
    def store_location(self) -> str | Path:
        """Where the store is, for `bot.store_api.open_store`."""
        return self.store_url if self.store_url is not None else self.store_path

    @property
    def server_name(self) -> str:
        return self.user_id.partition(":")[2]


# (section, key) in the TOML file -> environment variable
_ENV = {
    ("matrix", "homeserver"): "MATRIX_HOMESERVER",
    ("matrix", "user_id"): "MATRIX_USER_ID",
    ("matrix", "access_token"): "MATRIX_ACCESS_TOKEN",
    ("matrix", "password"): "MATRIX_PASSWORD",
    ("matrix", "device_id"): "MATRIX_DEVICE_ID",
    ("matrix", "recovery_key"): "MATRIX_RECOVERY_KEY",
    ("bot", "store_path"): "BOT_STORE_PATH",
    ("bot", "store_url"): "BOT_STORE_URL",
    ("bot", "allowed_users"): "BOT_ALLOWED_USERS",
    ("bot", "admins"): "BOT_ADMINS",
    ("bot", "command_prefix"): "BOT_COMMAND_PREFIX",
    ("bot", "max_concurrent_answers"): "BOT_MAX_CONCURRENT_ANSWERS",
    ("bot", "user_messages_burst"): "BOT_USER_MESSAGES_BURST",
    ("bot", "user_messages_per_s"): "BOT_USER_MESSAGES_PER_S",
    ("bot", "max_chats_per_user"): "BOT_MAX_CHATS_PER_USER",
    ("bot", "limits_exempt_admins"): "BOT_LIMITS_EXEMPT_ADMINS",
    ("bot", "redact_answers"): "BOT_REDACT_ANSWERS",
    ("bot", "drain_timeout_s"): "BOT_DRAIN_TIMEOUT_S",
    ("bot", "standby"): "BOT_STANDBY",
    ("bot", "backend"): "BOT_BACKEND",
    ("bot", "backend_timeout_s"): "BOT_BACKEND_TIMEOUT_S",
    ("bot", "max_reply_parts"): "BOT_MAX_REPLY_PARTS",
    ("bot", "e2ee"): "BOT_E2EE",
    ("bot", "pickle_key"): "BOT_PICKLE_KEY",
    ("bot", "http_listen"): "BOT_HTTP_LISTEN",
    ("bot", "max_image_bytes"): "BOT_MAX_IMAGE_BYTES",
    ("bot", "max_text_file_bytes"): "BOT_MAX_TEXT_FILE_BYTES",
    ("bot", "media_timeout_s"): "BOT_MEDIA_TIMEOUT_S",
    ("logging", "level"): "BOT_LOG_LEVEL",
    ("logging", "format"): "BOT_LOG_FORMAT",
    ("logging", "messages"): "BOT_LOG_MESSAGES",
}
_LISTS = {("bot", "allowed_users"), ("bot", "admins")}
# Settings that once were, with what to set instead: naming one is a problem, so
# that an operator is not left believing it still does something.
_RETIRED = {
    ("bot", "workers", "BOT_WORKERS"): (
        "no longer used: each room has its own lane now; "
        "bot.max_concurrent_answers (BOT_MAX_CONCURRENT_ANSWERS) bounds the backend calls"
    ),
}


def load_settings(
    config_path: Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Read the file (if any), overlay the environment, validate, and freeze.

    Raises `ConfigError` listing every problem, each naming its setting.
    """
    env = os.environ if environ is None else environ
    raw: dict[tuple[str, str], Any] = {}
    tables: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    if config_path is not None:
        raw.update(_read_toml(config_path, problems, tables))
    for (_, _, var), instead in _RETIRED.items():
        if env.get(var):
            problems.append(f"{var}: {instead}")
    for key, var in _ENV.items():
        value = env.get(var)
        if value is None or value == "":
            continue
        raw[key] = [v.strip() for v in value.split(",") if v.strip()] if key in _LISTS else value
    settings = _validate(raw, problems)
    if settings is not None:
        settings = _with_backend(settings, env, tables, problems)
    if problems or settings is None:
        raise ConfigError(problems)
    return settings


def _with_backend(
    settings: Settings,
    env: Mapping[str, str],
    tables: dict[str, dict[str, Any]],
    problems: list[str],
) -> Settings | None:
    """Validate the chosen backend's own settings (only the chosen one's)."""
    try:
        if settings.backend == "model":
            return replace(settings, model=model_settings_from_env(env, tables.get("model")))
        if settings.backend == "webhook":
            return replace(settings, webhook=webhook_settings_from_env(env, tables.get("webhook")))
    except SettingsError as exc:
        problems.extend(exc.problems)
        return None
    return settings


def _read_toml(
    path: Path, problems: list[str], tables: dict[str, dict[str, Any]]
) -> dict[tuple[str, str], Any]:
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.append(f"--config {path}: no such file")
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        problems.append(f"--config {path}: cannot be read as TOML: {exc}")
        return {}
    values: dict[tuple[str, str], Any] = {}
    for section, table in document.items():
        if not isinstance(table, dict):
            problems.append(f"{section}: expected a [{section}] table")
            continue
        if section in _BACKEND_TABLES:
            tables[section] = table
            continue
        for key, value in table.items():
            retired = [text for (s, k, _), text in _RETIRED.items() if (s, k) == (section, key)]
            if retired:
                problems.append(f"{section}.{key}: {retired[0]}")
                continue
            if (section, key) not in _ENV:
                problems.append(f"{section}.{key}: unknown setting")
                continue
            values[(section, key)] = value
    return values


def _name(key: tuple[str, str]) -> str:
    return f"{key[0]}.{key[1]} ({_ENV[key]})"


def _recovery_key(value: str, problems: list[str]) -> str | None:
    try:
        decode_recovery_key(value)
    except RecoveryKeyError as exc:  # says where the typo is, never the key
        problems.append(f"{_name(('matrix', 'recovery_key'))}: {exc}")
        return None
    return value


def _pickle_key(value: str | None, problems: list[str]) -> bytes | None:
    if value is None:
        return None
    try:
        key = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
    except binascii.Error:
        key = b""
    if len(key) != 32:
        # The value is a secret: not shown.
        problems.append(
            f"{_name(('bot', 'pickle_key'))}: expected 32 random bytes in base64 "
            "(e.g. the output of: openssl rand -base64 32)"
        )
        return None
    return key


def _listen_address(value: str | None, problems: list[str]) -> tuple[str, int] | None:
    """``host:port`` or ``[v6]:port`` (a numeric port, 1-65535); None when unset."""
    if value is None:
        return None
    host, sep, port = value.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if (
        not sep
        or not host
        or (":" in host and not bracketed)  # an IPv6 address needs its brackets
        or any(c.isspace() or c in "[]/@" for c in host)
        or not (port.isascii() and port.isdigit() and 0 < int(port) < 65536)
    ):
        problems.append(
            f"{_name(('bot', 'http_listen'))}: expected host:port like 127.0.0.1:9464 "
            f"or [::1]:9464, got {value!r}"
        )
        return None
    return host, int(port)


def _validate(raw: dict[tuple[str, str], Any], problems: list[str]) -> Settings | None:
    def text(key: tuple[str, str], *, required: bool = False) -> str | None:
        value = raw.get(key)
        if value is None:
            if required:
                problems.append(f"{_name(key)}: required")
            return None
        if not isinstance(value, str) or not value.strip():
            problems.append(f"{_name(key)}: expected a non-empty string")
            return None
        return value.strip()

    def number(key: tuple[str, str], default: float, low: float, high: float) -> float:
        value = raw.get(key, default)
        if isinstance(value, bool):  # float(True) would pass as 1.0
            problems.append(f"{_name(key)}: expected a number, got {value!r}")
            return default
        try:
            result = float(value)
        except (TypeError, ValueError):
            problems.append(f"{_name(key)}: expected a number, got {value!r}")
            return default
        if not low <= result <= high:
            problems.append(f"{_name(key)}: must be between {low:g} and {high:g}, got {value!r}")
            return default
        return result

    def whole(key: tuple[str, str], default: int, low: int, high: int) -> int:
        value = number(key, default, low, high)
        if value != int(value):
            problems.append(f"{_name(key)}: expected a whole number")
            return default
        return int(value)

    def flag(key: tuple[str, str], default: bool) -> bool:
        value = raw.get(key, default)
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        problems.append(f"{_name(key)}: expected true or false, got {value!r}")
        return default

    def user_list(key: tuple[str, str]) -> list[str]:
        value = raw.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            problems.append(f"{_name(key)}: expected a list of strings")
            return []
        return value

    homeserver = text(("matrix", "homeserver"), required=True)
    if homeserver is not None:
        parts = urlsplit(homeserver)
        if "@" in parts.netloc:
            # user:password@ would be sent, logged and echoed; the bot signs in with
            # its own settings. The value is not shown: it holds the credentials.
            problems.append(
                f"{_name(('matrix', 'homeserver'))}: must not contain credentials "
                "(user:password@); use matrix.password or matrix.access_token"
            )
            homeserver = None
        elif parts.scheme not in ("http", "https") or not parts.hostname:
            problems.append(
                f"{_name(('matrix', 'homeserver'))}: expected an http(s) URL, "
                f"got {shown_url(homeserver)}"
            )
    user_id = text(("matrix", "user_id"), required=True)
    if user_id is not None and not _USER_ID.match(user_id):
        problems.append(
            f"{_name(('matrix', 'user_id'))}: expected a Matrix user id like "
            f"@bot:example.org, got {user_id!r}"
        )
    access_token = text(("matrix", "access_token"))
    password = text(("matrix", "password"))
    if access_token is None and password is None:
        problems.append(
            "matrix.access_token (MATRIX_ACCESS_TOKEN) or matrix.password (MATRIX_PASSWORD): "
            "one of them is required"
        )
    device_id = text(("matrix", "device_id"))
    recovery_key = text(("matrix", "recovery_key"))
    if recovery_key is not None:
        recovery_key = _recovery_key(recovery_key, problems)
    store_path = text(("bot", "store_path")) or "surfaces-bot.sqlite3"
    store_url = text(("bot", "store_url"))
    if store_url is not None and not is_postgres_url(store_url):
        try:
            named = str(sqlite_path(store_url))
        except ValueError as exc:
            problems.append(f"{_name(('bot', 'store_url'))}: {exc}, got {shown_url(store_url)}")
        else:
            if text(("bot", "store_path")) not in (None, named):
                problems.append(
                    f"{_name(('bot', 'store_url'))} and {_name(('bot', 'store_path'))} "
                    "name two different stores: set one of them"
                )
            store_path = named
        store_url = None

    users: set[str] = set()
    servers: set[str] = set()
    for entry in user_list(("bot", "allowed_users")):
        if entry.startswith(":") and _SERVER.match(entry[1:]):
            servers.add(entry[1:])
        elif _USER_ID.match(entry):
            users.add(entry)
        else:
            problems.append(
                f"{_name(('bot', 'allowed_users'))}: {entry!r} is neither a user id "
                "(@user:server) nor a server (:server)"
            )
    admins = set()
    for entry in user_list(("bot", "admins")):
        if _USER_ID.match(entry):
            admins.add(entry)
        else:
            problems.append(f"{_name(('bot', 'admins'))}: {entry!r} is not a user id")
    if not users and not servers and user_id is not None and _USER_ID.match(user_id):
        # By default the bot serves the users of its own homeserver.
        servers.add(user_id.partition(":")[2])

    prefix = text(("bot", "command_prefix")) or "!"
    if len(prefix) > 8 or any(c.isspace() for c in prefix):
        problems.append(f"{_name(('bot', 'command_prefix'))}: 1-8 characters, no spaces")
    answers = number(("bot", "max_concurrent_answers"), 16, 1, 1024)
    if answers != int(answers):
        problems.append(f"{_name(('bot', 'max_concurrent_answers'))}: expected a whole number")
    burst = whole(("bot", "user_messages_burst"), 20, 1, 100_000)
    per_s = number(("bot", "user_messages_per_s"), 1.0, 0.001, 1000)
    max_chats = whole(("bot", "max_chats_per_user"), 50, 1, 100_000)
    exempt_admins = flag(("bot", "limits_exempt_admins"), False)
    redact_answers = flag(("bot", "redact_answers"), False)
    drain = number(("bot", "drain_timeout_s"), 10.0, 0, 600)
    backend_timeout = number(
        ("bot", "backend_timeout_s"), BACKEND_TIMEOUT_S, 1, MODEL_ANSWER_CEILING_S
    )
    max_parts = number(("bot", "max_reply_parts"), 16, 1, 1000)
    if max_parts != int(max_parts):
        problems.append(f"{_name(('bot', 'max_reply_parts'))}: expected a whole number")
    e2ee = flag(("bot", "e2ee"), True)
    pickle_key = _pickle_key(text(("bot", "pickle_key")), problems)
    standby = flag(("bot", "standby"), False)
    if standby and store_url is None:
        problems.append(
            f"{_name(('bot', 'standby'))}: needs a PostgreSQL store "
            f"({_name(('bot', 'store_url'))}): a SQLite file cannot be shared by two machines"
        )
    # Their key files would be each machine's own: after a takeover the crypto state
    # would not open, and the account's secret storage would not open either.
    for needed, given in (("pickle_key", "bot"), ("recovery_key", "matrix")):
        if standby and e2ee and raw.get((given, needed)) is None:
            problems.append(
                f"{_name(('bot', 'standby'))}: with encryption on, set "
                f"{_name((given, needed))} (the same on every instance)"
            )
    http_listen = _listen_address(text(("bot", "http_listen")), problems)
    # Held whole in memory while answering (and base64 in the model request).
    max_image_bytes = whole(("bot", "max_image_bytes"), 10 * 1024 * 1024, 1024, 100 * 1024 * 1024)
    max_text_bytes = whole(("bot", "max_text_file_bytes"), 1024 * 1024, 1024, 100 * 1024 * 1024)
    media_timeout = number(("bot", "media_timeout_s"), 30.0, 1, 600)
    backend = text(("bot", "backend")) or "echo"
    if backend not in BACKENDS:
        problems.append(f"{_name(('bot', 'backend'))}: one of {', '.join(BACKENDS)}")
    level = (text(("logging", "level")) or "info").lower()
    if level not in _LOG_LEVELS:
        problems.append(f"{_name(('logging', 'level'))}: one of {', '.join(_LOG_LEVELS)}")
    log_format = (text(("logging", "format")) or "auto").lower()
    if log_format not in _LOG_FORMATS:
        problems.append(f"{_name(('logging', 'format'))}: one of {', '.join(_LOG_FORMATS)}")
    log_messages = flag(("logging", "messages"), True)

    if problems or homeserver is None or user_id is None:
        return None
    return Settings(
        homeserver=homeserver.rstrip("/"),
        user_id=user_id,
        access_token=access_token,
        password=password,
        device_id=device_id,
        recovery_key=recovery_key,
        store_path=Path(store_path).expanduser(),
        store_url=store_url,
        allowed=AllowList(frozenset(users), frozenset(servers)),
        admins=frozenset(admins),
        command_prefix=prefix,
        max_concurrent_answers=int(answers),
        user_messages_burst=burst,
        user_messages_per_s=per_s,
        max_chats_per_user=max_chats,
        limits_exempt_admins=exempt_admins,
        redact_answers=redact_answers,
        drain_timeout_s=drain,
        standby=standby,
        backend=backend,
        backend_timeout_s=backend_timeout,
        max_reply_parts=int(max_parts),
        e2ee=e2ee,
        pickle_key=pickle_key,
        http_listen=http_listen,
        max_image_bytes=max_image_bytes,
        max_text_file_bytes=max_text_bytes,
        media_timeout_s=media_timeout,
        log_level=level,
        log_format=log_format,  # type: ignore[arg-type]  # checked against _LOG_FORMATS
        log_messages=log_messages,
    )
