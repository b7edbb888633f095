"""`StubClient`: a stand-in for `MatrixClient` for the code that provisions rooms."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from matrix_api import MatrixAPIError
from matrix_api.models import EventID, RoomID

STUB_SERVER = "example.org"


@dataclass
class StubClient:
    """Stands in for `MatrixClient`: records calls, returns made-up ids, and fails
    the call named ``fail_on`` with ``error``."""

    fail_on: str | None = None
    error: MatrixAPIError | None = None
    calls: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    server_clock_ms: int | None = None
    """What `server_time_ms` answers (None: no answer told the server's clock)."""
    _next: int = 0

    def server_time_ms(self) -> int | None:
        return self.server_clock_ms

    def _record(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        if name == self.fail_on and self.error is not None:
            raise self.error

    def _id(self, sigil: str) -> str:
        self._next += 1
        return f"{sigil}stub{self._next}:{STUB_SERVER}"

    async def create_space(self, *, name: str, invite: Any = (), **kwargs: Any) -> RoomID:
        self._record("create_space", name, tuple(invite))
        return RoomID(self._id("!"))

    async def create_room(self, **kwargs: Any) -> RoomID:
        self._record("create_room", kwargs)
        return RoomID(self._id("!"))

    async def put_room_account_data(self, room_id: RoomID, event_type: str, content: Any) -> None:
        self._record("put_room_account_data", room_id, event_type, content)

    async def put_state_event(
        self, room_id: RoomID, event_type: str, content: Any, state_key: str = ""
    ) -> EventID:
        self._record("put_state_event", room_id, event_type, content, state_key)
        return EventID(self._id("$"))

    async def get_displayname(self, user_id: str) -> str | None:
        self._record("get_displayname", user_id)
        return "Alice <b>&amp;</b>"
