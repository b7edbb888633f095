"""What can go wrong in the crypto layer, as exceptions the caller can act on.

Messages name what failed (room, session id, reason) and never quote plaintext,
ciphertext, keys or pickles.
"""

from __future__ import annotations

__all__ = ["CryptoError", "DecryptionError", "MissingRoomKey", "UnverifiedSender"]


class CryptoError(Exception):
    """Base class of the crypto layer's errors."""


class DecryptionError(CryptoError):
    """An encrypted event that cannot be decrypted and never will be (malformed,
    replayed, for another room, a bad MAC...). ``reason`` is short and safe to log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MissingRoomKey(CryptoError):
    """The room key for an event has not arrived (yet): retry when it does."""

    def __init__(self, room_id: str, session_id: str) -> None:
        super().__init__(f"no room key for session {session_id} in {room_id}")
        self.room_id = room_id
        self.session_id = session_id


class UnverifiedSender(DecryptionError):
    """Decrypted, but the claimed sender or device does not own the keys that
    encrypted it (spoofing, or a device the bot does not know yet)."""
