"""A chat's conversation as a backend sends it: turns, and a character budget.

`Turn` is one message of the conversation (chat-completions roles); `trim_context` fits
a conversation into the configured budget. Where the turns come from (the store, or a
room's history rebuilt by `bot.replies.history`) is not a backend's business. Pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["Role", "Turn", "context_chars", "trim_context"]

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class Turn:
    """One message of a conversation, in the chat-completions sense."""

    role: Role
    content: str

    def as_json(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def context_chars(turns: Iterable[Turn]) -> int:
    """The size of ``turns`` as the budget counts it: characters of content."""
    return sum(len(turn.content) for turn in turns)


def trim_context(turns: Sequence[Turn], budget_chars: int) -> list[Turn]:
    """The newest part of ``turns`` that fits in ``budget_chars`` characters of content.

    Kept whatever the budget: the leading system turns (the system prompt) and the
    newest user turn. Then turns are taken from the newest back while they fit; the
    first one that does not fit ends the history (no older turn is taken past a gap).
    A kept history never starts with an assistant turn, since chat templates expect a
    user turn first. Pure; the input is not changed.
    """
    head = 0
    while head < len(turns) and turns[head].role == "system":
        head += 1
    system = list(turns[:head])
    rest = list(turns[head:])
    last_user = max((i for i, turn in enumerate(rest) if turn.role == "user"), default=None)
    if last_user is None:
        # Nothing to answer: keep what fits, newest first.
        pinned: list[Turn] = []
        tail = rest
    else:
        pinned = [rest[last_user]]
        tail = rest[:last_user]
        after = rest[last_user + 1 :]
        # Turns after the newest user turn (rare: a prefilled assistant turn) stay too.
        pinned.extend(after)
    remaining = budget_chars - context_chars(system) - context_chars(pinned)
    kept: list[Turn] = []
    for turn in reversed(tail):
        if len(turn.content) > remaining:
            break
        kept.append(turn)
        remaining -= len(turn.content)
    kept.reverse()
    while kept and kept[0].role == "assistant":
        kept.pop(0)
    return system + kept + pinned
