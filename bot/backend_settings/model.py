"""The ``model`` backend's settings: the ``[model]`` table and the ``MODEL_*`` variables.

Apart from `bot.backends.model` (which re-exports them), below both it and `bot.config`:
reading the configuration does not import the backend (and what it needs) when another
backend is chosen.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .reading import DEFAULT_MAX_ANSWER_CHARS, MAX_BYTES_CEILING, FieldReader, values_from_env
from .timeouts import MODEL_ANSWER_CEILING_S, MODEL_REQUEST_TIMEOUT_S

__all__ = ["DEFAULT_SYSTEM_PROMPT", "MODEL_ENV", "ModelSettings", "model_settings_from_env"]

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant in a Matrix chat. Answer clearly and concisely; "
    "Markdown is rendered."
)

MODEL_ENV: dict[str, str] = {
    "base_url": "MODEL_BASE_URL",
    "api_key": "MODEL_API_KEY",
    "model": "MODEL_NAME",
    "system_prompt": "MODEL_SYSTEM_PROMPT",
    "temperature": "MODEL_TEMPERATURE",
    "max_tokens": "MODEL_MAX_TOKENS",
    "request_timeout_s": "MODEL_TIMEOUT_S",
    "stream": "MODEL_STREAM",
    "edit_interval_s": "MODEL_EDIT_INTERVAL_S",
    "context_budget_chars": "MODEL_CONTEXT_BUDGET_CHARS",
    "max_response_bytes": "MODEL_MAX_RESPONSE_BYTES",
    "max_line_bytes": "MODEL_MAX_LINE_BYTES",
    "max_answer_chars": "MODEL_MAX_ANSWER_CHARS",
    "vision": "MODEL_VISION",
    "vision_models": "MODEL_VISION_MODELS",
}
"""Setting (key of the ``[model]`` TOML table) -> environment variable."""


@dataclass(frozen=True)
class ModelSettings:
    """How to reach the model and how to use it; build with `from_mapping`."""

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    temperature: float | None = None
    max_tokens: int | None = None
    request_timeout_s: float = MODEL_REQUEST_TIMEOUT_S
    """The longest the server may stay silent: before its answer starts, and between
    two pieces of a streamed answer (a whole non-streamed answer must come within it)."""
    stream: bool = True
    edit_interval_s: float = 1.5
    """At most one edit of the growing reply per this many seconds."""
    context_budget_chars: int = 24_000
    max_response_bytes: int = 16 << 20
    """The most read from one answer: a non-streamed body, or a whole stream (whose
    per-token JSON is ~50 times its text: 16 MiB carry well over 100,000 characters)."""
    max_line_bytes: int = 1 << 20
    """The longest one line (or one event) of a stream may be."""
    max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS
    """An answer is cut here, with a note saying so."""
    vision: bool = False
    """Whether ``model`` reads images (sent as image parts, `bot.attachments`)."""
    vision_models: frozenset[str] = frozenset()
    """Other models that read images, for chats that choose one with ``!model``."""

    @property
    def completions_url(self) -> str:
        """``base_url`` + ``/chat/completions``; a bare host gets ``/v1`` first."""
        base = self.base_url.rstrip("/")
        if urlsplit(base).path in ("", "/"):
            base += "/v1"
        return base + "/chat/completions"

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ModelSettings:
        """Validate ``values`` (the ``[model]`` table, env values overlaid).

        Raises `bot.backend_settings.reading.SettingsError` listing every bad or unknown key,
        each named as ``model.<key> (<ENV_VAR>)``; the API key's value is never shown.
        """
        # Each default is the field's own (one place); `cls.<field>` reads it.
        read = FieldReader("model", values, MODEL_ENV)
        base_url = read.url("base_url", required=True)
        model = read.text("model", required=True)
        api_key = read.text("api_key", secret=True)
        if api_key is not None and any(c.isspace() for c in api_key):
            read.problems.append(f"{read.name('api_key')}: must not contain whitespace")
        system_prompt = values.get("system_prompt", DEFAULT_SYSTEM_PROMPT)
        if not isinstance(system_prompt, str):
            read.problems.append(f"{read.name('system_prompt')}: expected a string")
            system_prompt = DEFAULT_SYSTEM_PROMPT
        temperature = read.number("temperature", None, 0.0, 2.0)
        max_tokens = read.whole("max_tokens", None, 1, 1_000_000)
        timeout = read.number(
            "request_timeout_s", cls.request_timeout_s, 0.1, MODEL_ANSWER_CEILING_S
        )
        stream = read.flag("stream", cls.stream)
        interval = read.number("edit_interval_s", cls.edit_interval_s, 0.1, 60.0)
        budget = read.whole("context_budget_chars", cls.context_budget_chars, 100, 10_000_000)
        max_bytes = read.whole(
            "max_response_bytes", cls.max_response_bytes, 1024, MAX_BYTES_CEILING
        )
        max_line = read.whole("max_line_bytes", cls.max_line_bytes, 1024, MAX_BYTES_CEILING)
        if max_bytes is not None and max_line is not None and max_line > max_bytes:
            read.problems.append(
                f"{read.name('max_line_bytes')}: must not be more than "
                f"{read.name('max_response_bytes')} ({max_bytes})"
            )
        max_chars = read.whole("max_answer_chars", cls.max_answer_chars, 100, 10_000_000)
        vision = read.flag("vision", cls.vision)
        vision_models = _model_names(read, values.get("vision_models"))
        read.raise_if_problems()
        assert base_url is not None
        assert model is not None
        assert timeout is not None
        assert interval is not None
        assert budget is not None
        assert max_bytes is not None
        assert max_line is not None
        assert max_chars is not None
        return cls(
            base_url=base_url,
            model=model,
            api_key=api_key,
            system_prompt=system_prompt.strip(),
            temperature=temperature,
            max_tokens=max_tokens,
            request_timeout_s=timeout,
            stream=stream,
            edit_interval_s=interval,
            context_budget_chars=budget,
            max_response_bytes=max_bytes,
            max_line_bytes=max_line,
            max_answer_chars=max_chars,
            vision=vision,
            vision_models=vision_models,
        )


def _model_names(read: FieldReader, value: Any) -> frozenset[str]:
    """A list of model names (TOML) or a comma-separated string (environment)."""
    if value is None:
        return frozenset()
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        read.problems.append(f"{read.name('vision_models')}: expected a list of model names")
        return frozenset()
    cleaned = frozenset(n.strip() for n in names if n.strip())
    if any(len(n) > 128 or any(c.isspace() for c in n) for n in cleaned):
        read.problems.append(f"{read.name('vision_models')}: a model name is one word")
        return frozenset()
    return cleaned


def model_settings_from_env(
    environ: Mapping[str, str], file_values: Mapping[str, Any] | None = None
) -> ModelSettings:
    """`ModelSettings` from the ``[model]`` table ``file_values`` with the ``MODEL_*``
    variables of ``environ`` overlaid (the environment wins, as in `bot.config`).

    Raises `SettingsError` (see `ModelSettings.from_mapping`).
    """
    values: dict[str, Any] = dict(file_values or {})
    values.update(values_from_env(environ, MODEL_ENV))
    return ModelSettings.from_mapping(values)
