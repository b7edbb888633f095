"""The default backend: answers with what it was told. Proves the plumbing."""

from __future__ import annotations

from ..chats import Chat
from ..messages import IncomingMessage


class EchoBackend:
    name = "echo"
    instant = True  # no timeout needed (see `Backend`)

    async def reply(self, chat: Chat, message: IncomingMessage) -> str:
        return message.body
