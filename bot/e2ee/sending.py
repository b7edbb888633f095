"""Every room event the bot sends goes through here: encrypted in an encrypted room.

One place, so that no reply, notice, edit or greeting can reach an encrypted room in
the clear because its call site forgot. The event keeps its transaction id: a retry
(or a re-send after a crash) encrypts again, and the server answers with the event
it already has for that id.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from matrix_api import MatrixClient
from matrix_api.models import EventID, RoomID

from ..store_api import BotStore
from .crypto import BotCrypto

__all__ = ["EncryptingClient"]

ENCRYPTED = "m.room.encrypted"


class EncryptingClient(MatrixClient):
    """A `MatrixClient` whose `send_event` encrypts for rooms the store knows to be
    encrypted, once `attach` has given it the crypto (until then, and with end-to-end
    encryption turned off, it sends as it is asked)."""

    _crypto: BotCrypto | None = None
    _store: BotStore | None = None

    def attach(self, crypto: BotCrypto, store: BotStore) -> None:
        self._crypto = crypto
        self._store = store

    @property
    def encrypts(self) -> bool:
        return self._crypto is not None

    async def send_event(
        self,
        room_id: RoomID,
        event_type: str,
        content: Mapping[str, Any],
        txn_id: str,
    ) -> EventID:
        crypto, store = self._crypto, self._store
        if (
            crypto is not None
            and store is not None
            and event_type != ENCRYPTED
            and store.room_encryption(room_id) is not None
        ):
            content = await crypto.encrypt(room_id, event_type, dict(content))
            event_type = ENCRYPTED
        return await super().send_event(room_id, event_type, content, txn_id)
