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

from ..chats import MAX_TITLE

__all__ = ["MAX_COMMAND_LENGTH", "CommandError", "ParsedCommand", "clean_title", "parse_command"]

MAX_COMMAND_LENGTH = 2048
_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
# Characters that change how text reads without being visible: bidi embeddings,
# overrides and isolates, and the BOM / zero-width no-break space.
_INVISIBLE = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\ufeff"
)


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

    Raises `CommandError` saying what is wrong with it.
    """
    title = unicodedata.normalize("NFC", raw).strip()
    if not title:
        raise CommandError("The title is empty.")
    for char in title:
        if char in _INVISIBLE:
            raise CommandError("The title contains invisible direction-changing characters.")
        category = unicodedata.category(char)
        if category == "Cc" or category in ("Cs", "Co", "Cn"):
            raise CommandError("The title contains control or unassigned characters.")
    title = " ".join(title.split())
    if len(title) > MAX_TITLE:
        raise CommandError(
            f"The title is {len(title)} characters long; at most {MAX_TITLE} are allowed."
        )
    return title
