"""The ``webhook`` backend's settings: the ``[webhook]`` table and ``WEBHOOK_*``.

Apart from `bot.backends.webhook` (which re-exports them), below both it and
`bot.config`: reading the configuration does not import the backend when another
backend is chosen.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .reading import DEFAULT_MAX_ANSWER_CHARS, MAX_BYTES_CEILING, FieldReader, values_from_env
from .timeouts import WEBHOOK_TIMEOUT_S

__all__ = ["MIN_SECRET", "WEBHOOK_ENV", "WebhookSettings", "webhook_settings_from_env"]

MIN_SECRET = 16

WEBHOOK_ENV: dict[str, str] = {
    "url": "WEBHOOK_URL",
    "secret": "WEBHOOK_SECRET",
    "timeout_s": "WEBHOOK_TIMEOUT_S",
    "context_turns": "WEBHOOK_CONTEXT_TURNS",
    "max_response_bytes": "WEBHOOK_MAX_RESPONSE_BYTES",
    "max_answer_chars": "WEBHOOK_MAX_ANSWER_CHARS",
}
"""Setting (key of the ``[webhook]`` TOML table) -> environment variable."""


@dataclass(frozen=True)
class WebhookSettings:
    url: str
    secret: str = field(repr=False)
    timeout_s: float = WEBHOOK_TIMEOUT_S
    """The longest one attempt may take, from connecting to the whole answer."""
    context_turns: int = 20
    """How many recent turns go with each message."""
    max_response_bytes: int = 4 << 20
    """The most read from one answer (a JSON reply escapes each non-ASCII character in
    up to 12 bytes: 4 MiB carry 100,000 characters of any script)."""
    max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS
    """A reply is cut here, with a note saying so."""

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> WebhookSettings:
        """Validate ``values`` (the ``[webhook]`` table, env values overlaid); raises
        `SettingsError` naming each bad key. The secret's value is never shown."""
        # Each default is the field's own (one place); `cls.<field>` reads it.
        read = FieldReader("webhook", values, WEBHOOK_ENV)
        url = read.url("url", required=True)
        secret = read.text("secret", required=True, secret=True, strip=False)
        if secret is not None and len(secret) < MIN_SECRET:
            read.problems.append(f"{read.name('secret')}: at least {MIN_SECRET} characters")
        timeout = read.number("timeout_s", cls.timeout_s, 0.1, 600.0)
        turns = read.whole("context_turns", cls.context_turns, 0, 1000)
        max_bytes = read.whole(
            "max_response_bytes", cls.max_response_bytes, 1024, MAX_BYTES_CEILING
        )
        max_chars = read.whole("max_answer_chars", cls.max_answer_chars, 100, 10_000_000)
        read.raise_if_problems()
        assert url is not None
        assert secret is not None
        assert timeout is not None
        assert turns is not None
        assert max_bytes is not None
        assert max_chars is not None
        return cls(
            url=url,
            secret=secret,
            timeout_s=timeout,
            context_turns=turns,
            max_response_bytes=max_bytes,
            max_answer_chars=max_chars,
        )


def webhook_settings_from_env(
    environ: Mapping[str, str], file_values: Mapping[str, Any] | None = None
) -> WebhookSettings:
    """`WebhookSettings` from the ``[webhook]`` table with ``WEBHOOK_*`` overlaid."""
    values: dict[str, Any] = dict(file_values or {})
    values.update(values_from_env(environ, WEBHOOK_ENV))
    return WebhookSettings.from_mapping(values)
