"""``!forget``: start this chat's conversation over.

In a thread it forgets the thread's conversation; in the main timeline, the main
timeline's (threads keep theirs). The command itself stays in the room's history,
where a rebuild of the context (after a lost store) also starts over, so the
forgetting survives a reset too.
"""

from __future__ import annotations

from .base import Command, CommandContext, Reply
from .guards import changeable_chat


async def run(ctx: CommandContext, args: str) -> Reply:
    chat = changeable_chat(ctx)
    await ctx.store.replace_conversation(chat.chat_id, [], thread=ctx.thread)
    if ctx.thread is not None:
        return Reply("Forgotten: the next message in this thread starts a new conversation.")
    return Reply("Forgotten: the next message starts a new conversation.")


COMMAND = Command("forget", "", "clear the conversation context (of this thread, in a thread)", run)
