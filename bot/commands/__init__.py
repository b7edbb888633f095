"""Chat commands: one module per command, one registry, one entry point."""

from __future__ import annotations

import structlog

from matrix_api import MatrixAPIError

from ..dispatch import is_transient
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
    """Run ``parsed``; every outcome is a reply, whatever the input, except an error
    that may pass (`bot.dispatch.is_transient`: the homeserver unreachable, a 5xx, a
    rate limit), which is raised for the dispatcher to run the command again later.

    Running one again is safe: the changes commands make are whole values put in
    place, and ``!new`` finishes the rooms an earlier run made (`create_chat`)
    instead of making more. Any other failed request becomes a reply saying so.
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
        if is_transient(exc):
            raise
        log.warning("command_failed", command=parsed.name, error=str(exc))
        return Reply(f"Sorry, {ctx.command(parsed.name)} did not work: the homeserver said no.")
