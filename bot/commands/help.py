"""``!help``: the list of commands."""

from __future__ import annotations

from ..messages import escape
from .base import Command, CommandContext, Reply


async def run(ctx: CommandContext, args: str) -> Reply:
    from . import COMMANDS  # the registry imports this module

    lines = []
    html = []
    for command in COMMANDS.values():
        usage = f"{ctx.command(command.name)} {command.usage}".rstrip()
        lines.append(f"{usage} — {command.summary}")
        html.append(f"<li><code>{escape(usage)}</code> — {escape(command.summary)}</li>")
    return Reply(
        "Commands:\n" + "\n".join(lines),
        "<p>Commands:</p><ul>" + "".join(html) + "</ul>",
    )


COMMAND = Command("help", "", "list the commands", run)
