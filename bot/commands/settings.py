"""``!model``, ``!system`` and ``!settings``: a chat's own backend settings.

They live in the chat's marker on the server (``settings``), so they survive a lost
store and come back with reconciliation. ``default`` goes back to the configured value.
"""

from __future__ import annotations

from dataclasses import replace

from ..chats import write_marker
from ..messages import escape
from .base import Command, CommandContext, Reply
from .guards import changeable_chat
from .parser import CommandError

MAX_MODEL_NAME = 128
MAX_SYSTEM_PROMPT = 4000
_DEFAULT = "default"


def _configured(ctx: CommandContext, key: str) -> str:
    model = ctx.settings.model
    if model is None:
        return "(not used by this backend)"
    return model.model if key == "model" else model.system_prompt


async def _set(ctx: CommandContext, key: str, value: str | None) -> Reply:
    chat = changeable_chat(ctx)
    settings = dict(chat.settings)
    if value is None:
        settings.pop(key, None)
    else:
        settings[key] = value
    changed = replace(chat, settings=settings)
    await write_marker(ctx.client, changed)
    await ctx.store.apply_chats(put=[changed])
    shown = value if value is not None else f"{_configured(ctx, key)} (the default)"
    label = "Model" if key == "model" else "System prompt"
    return Reply(f"{label} for this chat: {shown}", f"{label} for this chat: {escape(shown)}")


async def model(ctx: CommandContext, args: str) -> Reply:
    if not args:
        return await settings(ctx, args)
    if args == _DEFAULT:
        return await _set(ctx, "model", None)
    if len(args) > MAX_MODEL_NAME or any(c.isspace() or not c.isprintable() for c in args):
        raise CommandError(f"A model name is one word of at most {MAX_MODEL_NAME} characters.")
    return await _set(ctx, "model", args)


async def system(ctx: CommandContext, args: str) -> Reply:
    if not args:
        return await settings(ctx, args)
    if args == _DEFAULT:
        return await _set(ctx, "system", None)
    if len(args) > MAX_SYSTEM_PROMPT or any(not c.isprintable() for c in args):
        raise CommandError(
            f"A system prompt is one line of at most {MAX_SYSTEM_PROMPT} printable characters."
        )
    return await _set(ctx, "system", args)


async def settings(ctx: CommandContext, args: str) -> Reply:
    chat = ctx.chat
    if chat is None:
        raise CommandError("This room is not a chat.")
    facts = [
        ("Backend", ctx.backend_name),
        ("Model", chat.settings.get("model") or f"{_configured(ctx, 'model')} (default)"),
        ("System prompt", chat.settings.get("system") or f"{_configured(ctx, 'system')} (default)"),
    ]
    return Reply(
        "\n".join(f"{key}: {value}" for key, value in facts),
        "<ul>"
        + "".join(f"<li><b>{key}</b>: {escape(value)}</li>" for key, value in facts)
        + "</ul>",
    )


MODEL = Command("model", "[name|default]", "show or set this chat's model", model)
SYSTEM = Command("system", "[prompt|default]", "show or set this chat's system prompt", system)
SETTINGS = Command("settings", "", "show this chat's backend settings", settings)
