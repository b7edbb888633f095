"""Reading a backend's settings from a TOML table or the environment, with clear errors.

Shared by the model and webhook backends. Values come either typed (TOML) or as strings
(environment variables); both are accepted where they make sense. Every problem names
its setting the way `bot.config` does (``model.temperature (MODEL_TEMPERATURE)``), and a
secret's value never appears in a problem.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

__all__ = ["FieldReader", "SettingsError", "values_from_env"]

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


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
        if parts.scheme not in ("http", "https") or not parts.hostname:
            self._bad(key, "expected an http(s) URL", value)
            return None
        if parts.username is not None or parts.password is not None:
            # Credentials in a URL end up in logs and tracebacks.
            self.problems.append(
                f"{self.name(key)}: must not contain credentials; use the key/secret setting"
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
