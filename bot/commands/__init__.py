"""Chat commands: one module per command, one registry, one entry point."""

from __future__ import annotations

import structlog

from matrix_api import MatrixAPIError

from . import archive, chats, forget, help, new, rename, settings, status
from .base import Command, CommandContext, Reply
from .parser import CommandError, ParsedCommand, clean_title, parse_command

__all__ = [
    "COMMANDS",
    "Command",
    "CommandContext",
    "CommandError",
    "ParsedCommand",
    "Reply",
    "clean_title",
    "parse_command",
    "run_command",
]

log = structlog.get_logger("bot.commands")

COMMANDS: dict[str, Command] = {
    command.name: command
    for command in (
        help.COMMAND,
        new.COMMAND,
        rename.COMMAND,
        chats.COMMAND,
        archive.ARCHIVE,
        archive.UNARCHIVE,
        status.COMMAND,
        settings.MODEL,
        settings.SYSTEM,
        forget.COMMAND,
        settings.SETTINGS,
    )
}


async def run_command(ctx: CommandContext, parsed: ParsedCommand) -> Reply:
    """Run ``parsed``; every outcome is a reply, whatever the input.

    A command is not retried once it may have changed something on the server (a
    second ``!new`` would create a second room): a failed request becomes a reply
    saying so, not an error for the dispatcher to retry.
    """
    command = COMMANDS.get(parsed.name)
    if command is None:
        return Reply(
            f"Unknown command {ctx.command(parsed.name)}. Send {ctx.command('help')} for the list."
        )
    try:
        return await command.run(ctx, parsed.args)
    except CommandError as exc:
        return Reply(str(exc))
    except MatrixAPIError as exc:
        log.warning("command_failed", command=parsed.name, error=str(exc))
        return Reply(f"Sorry, {ctx.command(parsed.name)} did not work: the homeserver said no.")
