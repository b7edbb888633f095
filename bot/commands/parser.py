"""Reading a command out of a message body, strictly.

The body is untrusted: it may be 64 KiB, hold control characters, bidi overrides
that make a title read differently from what it is, or HTML. A command is one line:
the prefix, a name of letters, and arguments; anything else is either not a
command at all or a `CommandError` whose message says what to fix.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from ..chats import MAX_TITLE, title_problem

__all__ = ["MAX_COMMAND_LENGTH", "CommandError", "ParsedCommand", "clean_title", "parse_command"]

MAX_COMMAND_LENGTH = 2048
_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")


class CommandError(ValueError):
    """A command that cannot run as written; the message is shown to the user."""


@dataclass(frozen=True, slots=True)
class ParsedCommand:
    name: str
    args: str


def parse_command(body: str, prefix: str) -> ParsedCommand | None:
    """The command in ``body``, or None when the body is not a command.

    Raises `CommandError` for a body that starts like a command but is not a valid
    one (too long, several lines, a malformed name).
    """
    if not body.startswith(prefix) or len(body) == len(prefix):
        return None
    rest = body[len(prefix) :]
    if rest[0].isspace() or rest.startswith(prefix):
        return None  # "! hello" or "!!": punctuation, not a command
    if len(body) > MAX_COMMAND_LENGTH:
        raise CommandError(f"That command is too long (at most {MAX_COMMAND_LENGTH} characters).")
    line, _, more = rest.partition("\n")
    if more.strip():
        raise CommandError("A command is one line; put its arguments on the same line.")
    name, *rest_of_line = line.strip().split(maxsplit=1)
    args = rest_of_line[0] if rest_of_line else ""
    name = name.lower()
    if not _NAME.fullmatch(name):
        raise CommandError(f"That is not a command name. Send {prefix}help for the list.")
    return ParsedCommand(name, args.strip())


def clean_title(raw: str) -> str:
    """A chat title from user text: one line, printable, at most `MAX_TITLE` characters.

    Raises `CommandError` saying what is wrong with it: an empty or too long title, or
    a character a title may not hold (see `bot.chats.title_problem`: control, format,
    private-use, unassigned characters, line and paragraph separators), named by its
    code point, since most of them cannot be seen.
    """
    title = unicodedata.normalize("NFC", raw).strip()
    if not title:
        raise CommandError("The title is empty.")
    problem = title_problem(title)
    if problem is not None:
        raise CommandError(f"The title contains {problem}; remove it and try again.")
    title = " ".join(title.split())
    if len(title) > MAX_TITLE:
        raise CommandError(
            f"The title is {len(title)} characters long; at most {MAX_TITLE} are allowed."
        )
    return title
