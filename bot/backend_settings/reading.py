"""Reading a backend's settings from a TOML table or the environment, with clear errors.

Shared by the model and webhook backends. Values come either typed (TOML) or as strings
(environment variables); both are accepted where they make sense. Every problem names
its setting the way `bot.config` does (``model.temperature (MODEL_TEMPERATURE)``), and a
secret's value never appears in a problem.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "DEFAULT_MAX_ANSWER_CHARS",
    "MAX_BYTES_CEILING",
    "FieldReader",
    "SettingsError",
    "shown_url",
    "values_from_env",
    "without_userinfo",
]

DEFAULT_MAX_ANSWER_CHARS = 100_000
"""About 25,000 tokens: more than any usual ``max_tokens``, and four Matrix events."""
MAX_BYTES_CEILING = 1 << 30
"""No byte limit may be set above 1 GiB (a non-streamed answer is held whole)."""

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def shown_url(value: str) -> str:
    """``value`` as a problem may quote it: not at all when it may hold credentials
    (any ``@``: ``user:password@host``, even in a URL too broken to parse)."""
    return "(not shown: it contains '@')" if "@" in value else repr(value)


def without_userinfo(url: str) -> str:
    """``url`` with any ``user:password@`` replaced by ``***@`` (for output only)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


class SettingsError(ValueError):
    """A backend's settings are invalid; ``problems`` has one line per bad setting."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def values_from_env(environ: Mapping[str, str], names: Mapping[str, str]) -> dict[str, str]:
    """The settings set in ``environ``: ``{key: value}`` for each ``names[key]`` present
    and non-empty."""
    values: dict[str, str] = {}
    for key, var in names.items():
        value = environ.get(var)
        if value is not None and value != "":
            values[key] = value
    return values


class FieldReader:
    """Reads and checks ``values`` (one section's keys) and collects the problems.

    Unknown keys are problems too. Call the readers, then `raise_if_problems`.
    """

    def __init__(self, section: str, values: Mapping[str, Any], env: Mapping[str, str]) -> None:
        self.section = section
        self.values = values
        self.env = env
        self.problems: list[str] = [
            f"{section}.{key}: unknown setting" for key in values if key not in env
        ]

    def name(self, key: str) -> str:
        return f"{self.section}.{key} ({self.env[key]})"

    def _bad(self, key: str, what: str, value: Any, *, secret: bool = False) -> None:
        shown = "" if secret else f", got {value!r}"
        self.problems.append(f"{self.name(key)}: {what}{shown}")

    def text(
        self, key: str, *, required: bool = False, secret: bool = False, strip: bool = True
    ) -> str | None:
        value = self.values.get(key)
        if value is None:
            if required:
                self.problems.append(f"{self.name(key)}: required")
            return None
        if not isinstance(value, str) or not value.strip():
            self._bad(key, "expected a non-empty string", value, secret=secret)
            return None
        return value.strip() if strip else value

    def url(self, key: str, *, required: bool = False) -> str | None:
        value = self.text(key, required=required)
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.username is not None or parts.password is not None or "@" in parts.netloc:
            # Credentials in a URL end up in logs and tracebacks; never echo them.
            self.problems.append(
                f"{self.name(key)}: must not contain credentials (user:password@); "
                "use the key/secret setting"
            )
            return None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            self.problems.append(
                f"{self.name(key)}: expected an http(s) URL, got {shown_url(value)}"
            )
            return None
        return value.rstrip("/")

    def number(self, key: str, default: float | None, low: float, high: float) -> float | None:
        value = self.values.get(key)
        if value is None:
            return default
        if isinstance(value, bool):  # float(True) would pass as 1.0
            self._bad(key, "expected a number", value)
            return default
        try:
            result = float(value)
        except (TypeError, ValueError):
            self._bad(key, "expected a number", value)
            return default
        if not low <= result <= high:
            self._bad(key, f"must be between {low:g} and {high:g}", value)
            return default
        return result

    def whole(self, key: str, default: int | None, low: int, high: int) -> int | None:
        value = self.values.get(key)
        if value is None:
            return default
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            value = int(value.strip())
        if isinstance(value, bool) or not isinstance(value, int):
            self._bad(key, "expected a whole number", value)
            return default
        if not low <= value <= high:
            self._bad(key, f"must be between {low} and {high}", value)
            return default
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.values.get(key)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        self._bad(key, "expected true or false", value)
        return default

    def raise_if_problems(self) -> None:
        if self.problems:
            raise SettingsError(self.problems)
