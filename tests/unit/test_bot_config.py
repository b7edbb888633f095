"""bot.config: settings from the environment and a TOML file, every problem named at once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bot.config import AllowList, ConfigError, Settings, load_settings

TOKEN = "syt_Ym90_SeCrEtToKeN_4f2a9c"
PASSWORD = "correct horse battery staple"

MINIMAL_ENV = {
    "MATRIX_HOMESERVER": "https://matrix.example.org",
    "MATRIX_USER_ID": "@bot:example.org",
    "MATRIX_ACCESS_TOKEN": TOKEN,
}


def env(**overrides: str) -> dict[str, str]:
    return {**MINIMAL_ENV, **overrides}


def problems_of(config_path: Path | None, environ: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(config_path, environ)
    # The message lists every problem, one per line.
    for problem in caught.value.problems:
        assert problem in str(caught.value)
    return caught.value.problems


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bot.toml"
    path.write_text(text, encoding="utf-8")
    return path


# --- the environment alone ---------------------------------------------------------


def test_the_environment_alone_is_enough() -> None:
    settings = load_settings(
        None,
        {
            "MATRIX_HOMESERVER": "https://matrix.example.org/",
            "MATRIX_USER_ID": "@bot:example.org",
            "MATRIX_ACCESS_TOKEN": TOKEN,
            "MATRIX_DEVICE_ID": "SURFACESBOT",
            "BOT_STORE_PATH": "/var/lib/bot/state.sqlite3",
            "BOT_ALLOWED_USERS": "@alice:example.org, :partner.org ,@bob:other.org,",
        },
    )

    assert settings.homeserver == "https://matrix.example.org"  # trailing slash dropped
    assert settings.user_id == "@bot:example.org"
    assert settings.server_name == "example.org"
    assert settings.access_token == TOKEN
    assert settings.password is None
    assert settings.device_id == "SURFACESBOT"
    assert settings.store_path == Path("/var/lib/bot/state.sqlite3")
    assert settings.allowed == AllowList(
        users=frozenset({"@alice:example.org", "@bob:other.org"}),
        servers=frozenset({"partner.org"}),
    )


def test_a_password_instead_of_a_token_is_enough() -> None:
    environ = env(MATRIX_PASSWORD=PASSWORD)
    del environ["MATRIX_ACCESS_TOKEN"]

    settings = load_settings(None, environ)

    assert settings.password == PASSWORD
    assert settings.access_token is None


def test_defaults_apply_to_what_is_not_set() -> None:
    settings = load_settings(None, MINIMAL_ENV)

    assert settings.device_id is None
    assert settings.store_path == Path("surfaces-bot.sqlite3")
    assert settings.admins == frozenset()
    assert settings.command_prefix == "!"
    assert settings.max_concurrent_answers == 16
    assert settings.drain_timeout_s == 10.0
    assert settings.backend == "echo"
    assert settings.log_level == "info"
    assert settings.log_format == "auto"


def test_without_environ_the_process_environment_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in MINIMAL_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("BOT_MAX_CONCURRENT_ANSWERS", "7")

    assert load_settings().max_concurrent_answers == 7


def test_the_retired_workers_setting_says_what_replaced_it(tmp_path: Path) -> None:
    config = tmp_path / "bot.toml"
    config.write_text("[bot]\nworkers = 4\n")

    with pytest.raises(ConfigError) as from_file:
        load_settings(config, MINIMAL_ENV)
    with pytest.raises(ConfigError) as from_env:
        load_settings(None, {**MINIMAL_ENV, "BOT_WORKERS": "4"})

    assert from_file.value.problems == [
        "bot.workers: no longer used: each room has its own lane now; "
        "bot.max_concurrent_answers (BOT_MAX_CONCURRENT_ANSWERS) bounds the backend calls"
    ]
    assert from_env.value.problems[0].startswith("BOT_WORKERS: no longer used")


def test_settings_are_frozen() -> None:
    settings = load_settings(None, MINIMAL_ENV)

    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.max_concurrent_answers = 9  # type: ignore[misc]


# --- the file and the environment ----------------------------------------------------


def test_a_file_alone_is_enough(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        """
        [matrix]
        homeserver = "https://file.example.org"
        user_id = "@bot:example.org"
        password = "from-the-file"

        [bot]
        allowed_users = ["@alice:example.org", ":example.com"]
        admins = ["@ops:example.org"]
        command_prefix = "?"
        max_concurrent_answers = 2
        drain_timeout_s = 2.5

        [logging]
        level = "DEBUG"
        format = "json"
        """,
    )

    settings = load_settings(path, {})

    assert settings.homeserver == "https://file.example.org"
    assert settings.password == "from-the-file"
    assert settings.allowed.users == {"@alice:example.org"}
    assert settings.allowed.servers == {"example.com"}
    assert settings.admins == {"@ops:example.org"}
    assert settings.command_prefix == "?"
    assert settings.max_concurrent_answers == 2
    assert settings.drain_timeout_s == 2.5
    assert settings.log_level == "debug"
    assert settings.log_format == "json"


def test_the_environment_wins_over_the_file(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        """
        [matrix]
        homeserver = "https://file.example.org"
        user_id = "@bot:example.org"
        access_token = "file-token"
        device_id = "FILEDEVICE"

        [bot]
        allowed_users = ["@alice:example.org"]
        max_concurrent_answers = 2
        """,
    )

    settings = load_settings(
        path,
        {
            "MATRIX_HOMESERVER": "https://env.example.org",
            "MATRIX_ACCESS_TOKEN": "env-token",
            "BOT_ALLOWED_USERS": "@carol:example.org",
            "BOT_MAX_CONCURRENT_ANSWERS": "8",
            # An empty variable does not count as set: the file's value stays.
            "MATRIX_DEVICE_ID": "",
        },
    )

    assert settings.homeserver == "https://env.example.org"
    assert settings.access_token == "env-token"
    assert settings.allowed.users == {"@carol:example.org"}
    assert settings.max_concurrent_answers == 8
    assert settings.user_id == "@bot:example.org"  # only in the file
    assert settings.device_id == "FILEDEVICE"


def test_unknown_keys_and_sections_in_the_file_are_rejected(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        """
        stray = 1

        [matrix]
        homeservr = "https://typo.example.org"

        [extras]
        colour = "blue"
        """,
    )

    # The environment is complete: the file's mistakes alone make the settings invalid.
    problems = problems_of(path, MINIMAL_ENV)

    assert sorted(problems) == sorted(
        [
            "stray: expected a [stray] table",
            "matrix.homeservr: unknown setting",
            "extras.colour: unknown setting",
        ]
    )


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    problems = problems_of(tmp_path / "nowhere.toml", MINIMAL_ENV)

    assert len(problems) == 1
    assert "--config" in problems[0]
    assert "no such file" in problems[0]


def test_a_file_that_is_not_toml_is_a_config_error(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[matrix\nhomeserver = ")

    problems = problems_of(path, MINIMAL_ENV)

    assert len(problems) == 1
    assert "cannot be read as TOML" in problems[0]


@pytest.mark.parametrize(
    ("toml", "setting"),
    [
        ('[bot]\nallowed_users = "@alice:example.org"', "bot.allowed_users (BOT_ALLOWED_USERS)"),
        ("[bot]\nallowed_users = [1, 2]", "bot.allowed_users (BOT_ALLOWED_USERS)"),
        ('[bot]\nadmins = "@ops:example.org"', "bot.admins (BOT_ADMINS)"),
        (
            '[bot]\nmax_concurrent_answers = "four"',
            "bot.max_concurrent_answers (BOT_MAX_CONCURRENT_ANSWERS)",
        ),
        ("[bot]\nstore_path = 5", "bot.store_path (BOT_STORE_PATH)"),
        ("[matrix]\ndevice_id = 12", "matrix.device_id (MATRIX_DEVICE_ID)"),
    ],
)
def test_a_wrongly_typed_file_value_names_its_setting(
    tmp_path: Path, toml: str, setting: str
) -> None:
    problems = problems_of(write_toml(tmp_path, toml), MINIMAL_ENV)

    assert len(problems) == 1
    assert problems[0].startswith(setting)


@pytest.mark.parametrize(
    ("toml", "setting"),
    [
        (
            "[bot]\nmax_concurrent_answers = true",
            "bot.max_concurrent_answers (BOT_MAX_CONCURRENT_ANSWERS)",
        ),
        ("[bot]\ndrain_timeout_s = false", "bot.drain_timeout_s (BOT_DRAIN_TIMEOUT_S)"),
    ],
)
def test_a_boolean_is_not_a_number(tmp_path: Path, toml: str, setting: str) -> None:
    problems = problems_of(write_toml(tmp_path, toml), MINIMAL_ENV)

    assert len(problems) == 1
    assert problems[0].startswith(setting)


# --- invalid and missing settings ----------------------------------------------------


def test_nothing_set_reports_every_required_setting_at_once() -> None:
    problems = problems_of(None, {})

    assert problems == [
        "matrix.homeserver (MATRIX_HOMESERVER): required",
        "matrix.user_id (MATRIX_USER_ID): required",
        "matrix.access_token (MATRIX_ACCESS_TOKEN) or matrix.password (MATRIX_PASSWORD): "
        "one of them is required",
    ]


@pytest.mark.parametrize(
    ("variable", "value", "setting"),
    [
        ("MATRIX_HOMESERVER", "matrix.example.org", "matrix.homeserver"),
        ("MATRIX_HOMESERVER", "ftp://matrix.example.org", "matrix.homeserver"),
        ("MATRIX_HOMESERVER", "https://", "matrix.homeserver"),
        ("MATRIX_HOMESERVER", "   ", "matrix.homeserver"),
        ("MATRIX_USER_ID", "bot", "matrix.user_id"),
        ("MATRIX_USER_ID", "@bot", "matrix.user_id"),
        ("MATRIX_USER_ID", "bot:example.org", "matrix.user_id"),
        ("MATRIX_DEVICE_ID", " ", "matrix.device_id"),
        ("BOT_ALLOWED_USERS", "alice", "bot.allowed_users"),
        ("BOT_ALLOWED_USERS", "@alice:example.org,example.org", "bot.allowed_users"),
        ("BOT_ALLOWED_USERS", ":bad server", "bot.allowed_users"),
        ("BOT_ADMINS", ":example.org", "bot.admins"),
        ("BOT_COMMAND_PREFIX", "a b", "bot.command_prefix"),
        ("BOT_COMMAND_PREFIX", "ninechars", "bot.command_prefix"),
        ("BOT_MAX_CONCURRENT_ANSWERS", "0", "bot.max_concurrent_answers"),
        ("BOT_MAX_CONCURRENT_ANSWERS", "1025", "bot.max_concurrent_answers"),
        ("BOT_MAX_CONCURRENT_ANSWERS", "2.5", "bot.max_concurrent_answers"),
        ("BOT_MAX_CONCURRENT_ANSWERS", "many", "bot.max_concurrent_answers"),
        ("BOT_MAX_CONCURRENT_ANSWERS", "nan", "bot.max_concurrent_answers"),
        ("BOT_DRAIN_TIMEOUT_S", "-1", "bot.drain_timeout_s"),
        ("BOT_DRAIN_TIMEOUT_S", "601", "bot.drain_timeout_s"),
        ("BOT_DRAIN_TIMEOUT_S", "soon", "bot.drain_timeout_s"),
        ("BOT_BACKEND", "gpt", "bot.backend"),
        ("BOT_LOG_LEVEL", "verbose", "logging.level"),
        ("BOT_LOG_FORMAT", "xml", "logging.format"),
    ],
)
def test_an_invalid_setting_names_the_setting_and_its_variable(
    variable: str, value: str, setting: str
) -> None:
    problems = problems_of(None, env(**{variable: value}))

    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{setting} ({variable}): ")


def test_every_problem_is_reported_at_once() -> None:
    problems = problems_of(
        None,
        {
            "MATRIX_HOMESERVER": "not a url",
            "MATRIX_USER_ID": "nobody",
            "BOT_ALLOWED_USERS": "alice",
            "BOT_MAX_CONCURRENT_ANSWERS": "0",
            "BOT_LOG_FORMAT": "xml",
        },
    )

    named = [problem.split(" ", 1)[0] for problem in problems]
    assert named == [
        "matrix.homeserver",
        "matrix.user_id",
        "matrix.access_token",
        "bot.allowed_users",
        "bot.max_concurrent_answers",
        "logging.format",
    ]


def test_a_blank_token_is_invalid_and_does_not_count_as_given() -> None:
    problems = problems_of(None, env(MATRIX_ACCESS_TOKEN="  "))

    assert problems == [
        "matrix.access_token (MATRIX_ACCESS_TOKEN): expected a non-empty string",
        "matrix.access_token (MATRIX_ACCESS_TOKEN) or matrix.password (MATRIX_PASSWORD): "
        "one of them is required",
    ]


def test_a_config_error_never_shows_the_secrets() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(
            None,
            env(MATRIX_USER_ID="nobody", MATRIX_PASSWORD=PASSWORD, BOT_MAX_CONCURRENT_ANSWERS="x"),
        )

    assert TOKEN not in str(caught.value)
    assert PASSWORD not in str(caught.value)


# --- who may use the bot ---------------------------------------------------------------


def test_the_default_allow_list_is_the_bots_own_server() -> None:
    settings = load_settings(None, env(MATRIX_USER_ID="@bot:example.org:8448"))

    assert settings.allowed == AllowList(users=frozenset(), servers=frozenset({"example.org:8448"}))


def test_an_explicit_allow_list_replaces_the_default() -> None:
    settings = load_settings(None, env(BOT_ALLOWED_USERS="@alice:other.org"))

    assert settings.allowed.servers == frozenset()
    assert not settings.allowed.allows("@carol:example.org")


@pytest.mark.parametrize(
    ("user_id", "allowed"),
    [
        ("@alice:example.org", True),  # listed by id
        ("@anyone:partner.org", True),  # listed by server
        ("@anyone:partner.org:8448", False),  # another server (port) is another server
        ("@anyone:sub.partner.org", False),  # no sub-domains
        ("@anyone:partner.org.evil.com", False),
        ("@alice:other.org", False),  # the localpart alone means nothing
        ("@mallory:example.org", False),
        ("partner.org", False),  # not a user id
        ("", False),
    ],
)
def test_allow_list_semantics(user_id: str, allowed: bool) -> None:
    allow = AllowList(users=frozenset({"@alice:example.org"}), servers=frozenset({"partner.org"}))

    assert allow.allows(user_id) is allowed


def test_an_empty_allow_list_allows_nobody() -> None:
    assert not AllowList().allows("@alice:example.org")


# --- secrets ---------------------------------------------------------------------------


def test_the_settings_repr_never_shows_the_token_or_password() -> None:
    settings = load_settings(None, env(MATRIX_PASSWORD=PASSWORD))

    for text in (repr(settings), str(settings), f"{settings}"):
        assert TOKEN not in text
        assert PASSWORD not in text
        assert "@bot:example.org" in text  # the repr still says which bot it is


def test_a_hand_built_settings_hides_its_secrets_too() -> None:
    settings = Settings(
        homeserver="https://hs", user_id="@b:hs", access_token=TOKEN, password=PASSWORD
    )

    assert TOKEN not in repr(settings)
    assert PASSWORD not in repr(settings)


# --- credentials in URLs ---------------------------------------------------------------

URL_SECRET = "hunter2-in-the-url"


@pytest.mark.parametrize(
    ("variable", "value", "setting", "extra"),
    [
        (
            "MATRIX_HOMESERVER",
            f"https://bot:{URL_SECRET}@matrix.example.org",
            "matrix.homeserver",
            {},
        ),
        ("MATRIX_HOMESERVER", f"https://{URL_SECRET}@matrix.example.org", "matrix.homeserver", {}),
        (
            "MATRIX_HOMESERVER",
            f"https://:{URL_SECRET}@matrix.example.org:8448",
            "matrix.homeserver",
            {},
        ),
        (
            "MODEL_BASE_URL",
            f"http://key:{URL_SECRET}@127.0.0.1:8080/v1",
            "model.base_url",
            {"BOT_BACKEND": "model", "MODEL_NAME": "m"},
        ),
        (
            "WEBHOOK_URL",
            f"https://svc:{URL_SECRET}@hooks.example.org/x",
            "webhook.url",
            {"BOT_BACKEND": "webhook", "WEBHOOK_SECRET": "s" * 20},
        ),
    ],
)
def test_credentials_in_a_url_are_refused_and_never_echoed(
    variable: str, value: str, setting: str, extra: dict[str, str]
) -> None:
    problems = problems_of(None, env(**{variable: value}, **extra))

    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{setting} ({variable}): must not contain credentials")
    assert URL_SECRET not in problems[0]


@pytest.mark.parametrize(
    "value",
    [
        f"ftp://bot:{URL_SECRET}@matrix.example.org",  # not http(s) either
        f"bot:{URL_SECRET}@matrix.example.org",  # no scheme: parsed as "bot:" + a path
        f"https://matrix.example.org@{URL_SECRET}",  # the "host" is what follows @
    ],
)
def test_a_broken_url_with_an_at_sign_is_not_echoed(value: str) -> None:
    problems = problems_of(None, env(MATRIX_HOMESERVER=value))

    assert len(problems) == 1, problems
    assert problems[0].startswith("matrix.homeserver (MATRIX_HOMESERVER): ")
    assert URL_SECRET not in problems[0]


def test_a_broken_url_without_credentials_is_still_shown() -> None:
    problems = problems_of(None, env(MATRIX_HOMESERVER="matrix.example.org"))

    assert problems == [
        "matrix.homeserver (MATRIX_HOMESERVER): expected an http(s) URL, got 'matrix.example.org'"
    ]


def test_credentials_in_the_homeserver_url_exit_with_code_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bot.__main__ import EXIT_CONFIG, main

    for variable, value in env(MATRIX_HOMESERVER=f"https://u:{URL_SECRET}@hs.example").items():
        monkeypatch.setenv(variable, value)
    assert main(["doctor"]) == EXIT_CONFIG
    out, err = capsys.readouterr()
    assert "matrix.homeserver (MATRIX_HOMESERVER): must not contain credentials" in err
    assert URL_SECRET not in out + err


# --- limits on what comes from outside -------------------------------------------------


def test_the_limits_have_defaults_for_a_real_model_server() -> None:
    settings = load_settings(
        None, env(BOT_BACKEND="model", MODEL_BASE_URL="http://127.0.0.1:8080", MODEL_NAME="m")
    )

    assert settings.max_reply_parts == 16
    assert settings.model is not None
    assert settings.model.max_response_bytes == 16 * 1024 * 1024
    assert settings.model.max_line_bytes == 1024 * 1024
    assert settings.model.max_answer_chars == 100_000


def test_the_limits_come_from_the_environment_and_the_file(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        """
        [bot]
        max_reply_parts = 4
        backend = "webhook"
        [webhook]
        url = "https://hooks.example.org/x"
        secret = "a-secret-long-enough"
        max_response_bytes = 65536
        max_answer_chars = 5000
        """,
    )
    settings = load_settings(path, env(WEBHOOK_MAX_ANSWER_CHARS="7000"))

    assert settings.max_reply_parts == 4
    assert settings.webhook is not None
    assert settings.webhook.max_response_bytes == 65536
    assert settings.webhook.max_answer_chars == 7000  # the environment wins

    model = load_settings(
        None,
        env(
            BOT_BACKEND="model",
            BOT_MAX_REPLY_PARTS="2",
            MODEL_BASE_URL="http://127.0.0.1:8080",
            MODEL_NAME="m",
            MODEL_MAX_RESPONSE_BYTES="1048576",
            MODEL_MAX_LINE_BYTES="4096",
            MODEL_MAX_ANSWER_CHARS="300",
        ),
    )
    assert model.max_reply_parts == 2
    assert model.model is not None
    assert (
        model.model.max_response_bytes,
        model.model.max_line_bytes,
        model.model.max_answer_chars,
    ) == (1048576, 4096, 300)


MODEL_ENV = {"BOT_BACKEND": "model", "MODEL_BASE_URL": "http://127.0.0.1:8080", "MODEL_NAME": "m"}
HOOK_ENV = {
    "BOT_BACKEND": "webhook",
    "WEBHOOK_URL": "https://h.example",
    "WEBHOOK_SECRET": "s" * 20,
}


@pytest.mark.parametrize(
    ("variable", "value", "setting", "backend"),
    [
        ("BOT_MAX_REPLY_PARTS", "0", "bot.max_reply_parts", {}),
        ("BOT_MAX_REPLY_PARTS", "1001", "bot.max_reply_parts", {}),
        ("BOT_MAX_REPLY_PARTS", "2.5", "bot.max_reply_parts", {}),
        ("BOT_MAX_REPLY_PARTS", "lots", "bot.max_reply_parts", {}),
        ("MODEL_MAX_RESPONSE_BYTES", "1023", "model.max_response_bytes", MODEL_ENV),
        ("MODEL_MAX_RESPONSE_BYTES", str(2**30 + 1), "model.max_response_bytes", MODEL_ENV),
        ("MODEL_MAX_RESPONSE_BYTES", "16MB", "model.max_response_bytes", MODEL_ENV),
        ("MODEL_MAX_LINE_BYTES", "100", "model.max_line_bytes", MODEL_ENV),
        ("MODEL_MAX_LINE_BYTES", str(32 * 1024 * 1024), "model.max_line_bytes", MODEL_ENV),
        ("MODEL_MAX_ANSWER_CHARS", "99", "model.max_answer_chars", MODEL_ENV),
        ("MODEL_MAX_ANSWER_CHARS", "-5", "model.max_answer_chars", MODEL_ENV),
        ("WEBHOOK_MAX_RESPONSE_BYTES", "0", "webhook.max_response_bytes", HOOK_ENV),
        ("WEBHOOK_MAX_ANSWER_CHARS", "many", "webhook.max_answer_chars", HOOK_ENV),
    ],
)
def test_an_invalid_limit_names_its_setting(
    variable: str, value: str, setting: str, backend: dict[str, str]
) -> None:
    problems = problems_of(None, env(**backend, **{variable: value}))

    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{setting} ({variable}): ")


@pytest.mark.parametrize("toml", ["max_reply_parts = true", "max_reply_parts = 4.5"])
def test_a_limit_in_the_file_must_be_a_whole_number(tmp_path: Path, toml: str) -> None:
    problems = problems_of(write_toml(tmp_path, f"[bot]\n{toml}\n"), env())

    assert len(problems) == 1, problems
    assert problems[0].startswith("bot.max_reply_parts (BOT_MAX_REPLY_PARTS): ")


# --- per-user limits ---------------------------------------------------------------


def test_the_per_user_limits_have_generous_defaults() -> None:
    settings = load_settings(None, MINIMAL_ENV)

    assert settings.user_messages_burst == 20
    assert settings.user_messages_per_s == 1.0
    assert settings.max_chats_per_user == 50
    assert settings.limits_exempt_admins is False


def test_the_per_user_limits_come_from_the_file_and_the_environment(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        "[bot]\nuser_messages_burst = 5\nuser_messages_per_s = 0.25\n"
        "max_chats_per_user = 3\nlimits_exempt_admins = true\n",
    )
    from_file = load_settings(path, MINIMAL_ENV)
    assert (
        from_file.user_messages_burst,
        from_file.user_messages_per_s,
        from_file.max_chats_per_user,
        from_file.limits_exempt_admins,
    ) == (5, 0.25, 3, True)

    from_env = load_settings(
        path,
        env(
            BOT_USER_MESSAGES_BURST="100",
            BOT_USER_MESSAGES_PER_S="2",
            BOT_MAX_CHATS_PER_USER="7",
            BOT_LIMITS_EXEMPT_ADMINS="off",
        ),
    )
    assert (
        from_env.user_messages_burst,
        from_env.user_messages_per_s,
        from_env.max_chats_per_user,
        from_env.limits_exempt_admins,
    ) == (100, 2.0, 7, False)


@pytest.mark.parametrize("value", ["1", "true", "YES", " on "])
def test_admins_are_exempted_by_any_spelling_of_true(value: str) -> None:
    assert load_settings(None, env(BOT_LIMITS_EXEMPT_ADMINS=value)).limits_exempt_admins


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("BOT_USER_MESSAGES_BURST", "0"),
        ("BOT_USER_MESSAGES_BURST", "-20"),
        ("BOT_USER_MESSAGES_BURST", "100001"),
        ("BOT_USER_MESSAGES_BURST", "2.5"),
        ("BOT_USER_MESSAGES_BURST", "lots"),
        ("BOT_USER_MESSAGES_PER_S", "0"),
        ("BOT_USER_MESSAGES_PER_S", "-1"),
        ("BOT_USER_MESSAGES_PER_S", "0.0001"),
        ("BOT_USER_MESSAGES_PER_S", "1001"),
        ("BOT_USER_MESSAGES_PER_S", "nan"),
        ("BOT_USER_MESSAGES_PER_S", "inf"),
        ("BOT_MAX_CHATS_PER_USER", "0"),
        ("BOT_MAX_CHATS_PER_USER", "1e9"),
        ("BOT_MAX_CHATS_PER_USER", "4.5"),
        ("BOT_LIMITS_EXEMPT_ADMINS", "maybe"),
        ("BOT_LIMITS_EXEMPT_ADMINS", "2"),
    ],
)
def test_an_invalid_per_user_limit_names_its_setting(variable: str, value: str) -> None:
    setting = {
        "BOT_USER_MESSAGES_BURST": "bot.user_messages_burst",
        "BOT_USER_MESSAGES_PER_S": "bot.user_messages_per_s",
        "BOT_MAX_CHATS_PER_USER": "bot.max_chats_per_user",
        "BOT_LIMITS_EXEMPT_ADMINS": "bot.limits_exempt_admins",
    }[variable]
    problems = problems_of(None, env(**{variable: value}))

    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{setting} ({variable}): ")


@pytest.mark.parametrize(
    ("toml", "setting"),
    [
        ("user_messages_burst = true", "bot.user_messages_burst (BOT_USER_MESSAGES_BURST)"),
        ('user_messages_burst = "20"', None),
        ("user_messages_per_s = false", "bot.user_messages_per_s (BOT_USER_MESSAGES_PER_S)"),
        ("max_chats_per_user = 50.5", "bot.max_chats_per_user (BOT_MAX_CHATS_PER_USER)"),
        ("limits_exempt_admins = 1", "bot.limits_exempt_admins (BOT_LIMITS_EXEMPT_ADMINS)"),
        ('limits_exempt_admins = "yes"', None),
    ],
)
def test_per_user_limits_in_the_file_are_checked_too(
    tmp_path: Path, toml: str, setting: str | None
) -> None:
    path = write_toml(tmp_path, f"[bot]\n{toml}\n")
    if setting is None:  # the same text as the environment would give: accepted
        load_settings(path, MINIMAL_ENV)
        return
    problems = problems_of(path, MINIMAL_ENV)

    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{setting}: ")


def test_e2ee_is_on_by_default_and_can_be_turned_off() -> None:
    assert load_settings(None, env()).e2ee is True
    assert load_settings(None, env(BOT_E2EE="off")).e2ee is False
    assert any("BOT_E2EE" in p for p in problems_of(None, env(BOT_E2EE="maybe")))


def test_a_pickle_key_is_32_bytes_of_base64_and_never_shown() -> None:
    import base64

    key = bytes(range(32))
    settings = load_settings(None, env(BOT_PICKLE_KEY=base64.b64encode(key).decode()))
    assert settings.pickle_key == key
    assert str(key) not in repr(settings)
    # Unpadded base64 is accepted too.
    unpadded = base64.b64encode(key).decode().rstrip("=")
    assert load_settings(None, env(BOT_PICKLE_KEY=unpadded)).pickle_key == key

    for bad in ["short", base64.b64encode(b"x" * 31).decode(), "not base64 at all!!" * 3]:
        problems = problems_of(None, env(BOT_PICKLE_KEY=bad))
        assert any("BOT_PICKLE_KEY" in p and "32 random bytes" in p for p in problems)
        assert not any(bad in p for p in problems)


def test_a_recovery_key_is_checked_and_a_typo_named_without_the_key() -> None:
    from matrix_crypto.cross_signing import SecretStorageKey

    key = SecretStorageKey.create().recovery_key
    assert load_settings(None, env(MATRIX_RECOVERY_KEY=key)).recovery_key == key
    assert key not in repr(load_settings(None, env(MATRIX_RECOVERY_KEY=key)))
    typo = key[:5] + "0" + key[6:]  # base58 has no zero: always caught
    problems = problems_of(None, env(MATRIX_RECOVERY_KEY=typo))
    assert any("MATRIX_RECOVERY_KEY" in p for p in problems)
    assert not any(typo in p or key in p for p in problems)
    problems = problems_of(None, env(MATRIX_RECOVERY_KEY="not a recovery key"))
    assert any("MATRIX_RECOVERY_KEY" in p for p in problems)
