"""surfaces-bot: Matrix rooms as chats with a backend assistant, restart-safe."""

__version__ = "0.1.0"
