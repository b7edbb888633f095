"""The ``webhook`` backend's settings: the ``[webhook]`` table and ``WEBHOOK_*``.

Apart from `bot.backends.webhook` so that reading the configuration does not import
the backend when another backend is chosen.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .settings import FieldReader, values_from_env

__all__ = ["MIN_SECRET", "WEBHOOK_ENV", "WebhookSettings", "webhook_settings_from_env"]

MIN_SECRET = 16

WEBHOOK_ENV: dict[str, str] = {
    "url": "WEBHOOK_URL",
    "secret": "WEBHOOK_SECRET",
    "timeout_s": "WEBHOOK_TIMEOUT_S",
    "context_turns": "WEBHOOK_CONTEXT_TURNS",
}
"""Setting (key of the ``[webhook]`` TOML table) -> environment variable."""


@dataclass(frozen=True)
class WebhookSettings:
    url: str
    secret: str = field(repr=False)
    timeout_s: float = 30.0
    """The longest one attempt may take, from connecting to the whole answer."""
    context_turns: int = 20
    """How many recent turns go with each message."""

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> WebhookSettings:
        """Validate ``values`` (the ``[webhook]`` table, env values overlaid); raises
        `SettingsError` naming each bad key. The secret's value is never shown."""
        read = FieldReader("webhook", values, WEBHOOK_ENV)
        url = read.url("url", required=True)
        secret = read.text("secret", required=True, secret=True, strip=False)
        if secret is not None and len(secret) < MIN_SECRET:
            read.problems.append(f"{read.name('secret')}: at least {MIN_SECRET} characters")
        timeout = read.number("timeout_s", 30.0, 0.1, 600.0)
        turns = read.whole("context_turns", 20, 0, 1000)
        read.raise_if_problems()
        assert url is not None
        assert secret is not None
        assert timeout is not None
        assert turns is not None
        return cls(url=url, secret=secret, timeout_s=timeout, context_turns=turns)


def webhook_settings_from_env(
    environ: Mapping[str, str], file_values: Mapping[str, Any] | None = None
) -> WebhookSettings:
    """`WebhookSettings` from the ``[webhook]`` table with ``WEBHOOK_*`` overlaid."""
    values: dict[str, Any] = dict(file_values or {})
    values.update(values_from_env(environ, WEBHOOK_ENV))
    return WebhookSettings.from_mapping(values)
