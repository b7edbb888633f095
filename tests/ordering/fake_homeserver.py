"""A scripted homeserver for the ordering tests: spec-shaped answers, every request recorded.

    hs = FakeHomeserver(logs)            # logs: the list `capture_logs()` fills
    hs.add_room(ROOM, marker=marker_content(chat))
    hs.delays["joined_rooms"] = 30.0     # virtual seconds, under the mock clock
    transport = hs.transport()           # for MatrixClient(..., transport=...) or run_bot
    ...
    hs.queue_sync({ROOM: [text_event("$m1", ALICE, "hello")]})   # the next long-poll answers it
    await hs.wait_for(lambda call: call.endpoint == "receipt")

It answers what the bot asks of a homeserver: whoami, the initial full-state /sync (it sends
``full_state=true``), the long-poll /sync (``timeout=30000``: held for `long_poll_s` virtual
seconds, or until a batch is queued, then an empty batch with a new ``next_batch``), joined_rooms,
room account data (the chat marker: GET and PUT), sends, receipts, /messages, join, leave and
filter uploads. Every request is recorded in order as a `Call`: when it arrived (trio's clock),
method, path, query, and how many log entries had been captured by then, so a test can put
requests and log events in one order. Anything else is answered ``404 M_UNRECOGNIZED`` and listed
in `unexpected`; ``POST /createRoom`` and room state PUTs are recognised (and refused) so that
tests can assert the bot never provisions anything when it should only read.
"""

from __future__ import annotations

import itertools
import json
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import httpx
import trio
from trio_util import RepeatedEvent

from bot.chats import CHAT_MARKER

__all__ = [
    "ALICE",
    "BASE_TS",
    "BOT",
    "DEVICE",
    "HOMESERVER",
    "Call",
    "FakeHomeserver",
    "FakeRoom",
    "Sent",
    "notice_event",
    "text_event",
]

HOMESERVER = "http://hs.test"
BOT = "@bot:hs.test"
DEVICE = "BOTDEVICE"
ALICE = "@alice:hs.test"
# origin_server_ts of scripted events: after the chats in the tests were created.
BASE_TS = 1_700_000_000_000
LONG_POLL_TIMEOUT_MS = "30000"
_V3 = ["", "_matrix", "client", "v3"]
_SPACE_STATE = frozenset({"m.space.child", "m.space.parent"})

Answer = tuple[int, dict[str, Any]]
"""An HTTP status and its JSON body."""


def text_event(event_id: str, sender: str, body: str, *, ts: int = BASE_TS) -> dict[str, Any]:
    """An ``m.text`` message as /sync delivers it (``ClientEventWithoutRoomID``)."""
    return {
        "type": "m.room.message",
        "event_id": event_id,
        "sender": sender,
        "origin_server_ts": ts,
        "content": {"msgtype": "m.text", "body": body},
        "unsigned": {"age": 1000},
    }


def notice_event(
    event_id: str, sender: str, body: str, *, reply_to: str | None = None, ts: int = BASE_TS
) -> dict[str, Any]:
    event = text_event(event_id, sender, body, ts=ts)
    event["content"]["msgtype"] = "m.notice"
    if reply_to is not None:
        event["content"]["m.relates_to"] = {"m.in_reply_to": {"event_id": reply_to}}
    return event


@dataclass
class Call:
    """One request as the server saw it."""

    at: float
    """trio's clock when the request arrived."""
    method: str
    path: str
    """Percent-decoded, segment by segment."""
    query: dict[str, str]
    endpoint: str
    """What the server took it for: ``whoami``, ``initial_sync``, ``long_poll``, ``joined_rooms``,
    ``get_room_account_data``, ``put_room_account_data``, ``send``, ``receipt``, ``messages``,
    ``join``, ``leave``, ``upload_filter``, ``create_room``, ``put_state``, ``put_account_data``,
    ``unexpected``."""
    room_id: str | None = None
    event_type: str | None = None
    """The event type of a send or state PUT, the account data type of an account data call."""
    body: Any = None
    logs_before: int = 0
    """How many log entries had been captured when the request arrived."""
    ended: float | None = None
    """trio's clock when the answer left; None while pending (or if the client gave up)."""
    status: int | None = None

    def after_log(self, index: int) -> bool:
        """Whether this request arrived after log entry number ``index`` was written."""
        return self.logs_before > index


@dataclass(frozen=True)
class Sent:
    """An event the bot sent."""

    room_id: str
    event_type: str
    txn_id: str
    content: dict[str, Any]
    event_id: str
    at: float

    @property
    def reply_to(self) -> str | None:
        relates = self.content.get("m.relates_to") or {}
        return (relates.get("m.in_reply_to") or {}).get("event_id")

    @property
    def msgtype(self) -> str | None:
        return self.content.get("msgtype")

    @property
    def body(self) -> str | None:
        return self.content.get("body")


@dataclass
class FakeRoom:
    room_id: str
    joined: bool = True
    account_data: dict[str, dict[str, Any]] = field(default_factory=dict)
    """This user's room account data on the server (what a GET answers)."""
    account_data_in_sync: bool = True
    """Whether the initial sync delivers the account data (False: only a GET shows it)."""
    timeline: list[dict[str, Any]] = field(default_factory=list)
    """What the initial sync's timeline carries."""
    invited_by: str | None = None


class FakeHomeserver:
    """The homeserver of ``@bot:hs.test``; see the module docstring.

    ``delays`` maps an endpoint name (see `Call.endpoint`) to the virtual seconds the answer
    takes after the server has acted on the request (so a send cut off by the client has still
    created its event, as on a real server). ``observers`` are called with each `Call` as it
    arrives.
    """

    def __init__(self, logs: list[Any] | None = None, *, long_poll_s: float = 30.0) -> None:
        self.calls: list[Call] = []
        self.sent: list[Sent] = []
        self.rooms: dict[str, FakeRoom] = {}
        self.delays: dict[str, float] = {}
        self.date: str | None = None
        """A ``Date`` header for every answer (the server's clock), if set."""
        self.observers: list[Callable[[Call], None]] = []
        self.long_poll_s = long_poll_s
        self.device_keys: dict[str, Any] = {}
        """The bot's device keys, once it uploaded them."""
        self.one_time_keys = 0
        self._logs = logs if logs is not None else []
        self._batches: deque[dict[str, Any]] = deque()
        self._batch_queued = RepeatedEvent()
        self._changed = RepeatedEvent()
        self._tokens = itertools.count(1)
        self._event_ids = itertools.count(1)
        self._filter_ids = itertools.count(1)
        self._txns: dict[tuple[str, str, str], str] = {}

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    # --- scripting ------------------------------------------------------------------------

    def add_room(
        self,
        room_id: str,
        *,
        marker: dict[str, Any] | None = None,
        marker_in_sync: bool = True,
        timeline: Sequence[dict[str, Any]] = (),
        joined: bool = True,
    ) -> FakeRoom:
        """A room; ``marker`` is the chat marker the bot keeps in its room account data."""
        room = FakeRoom(
            room_id,
            joined=joined,
            account_data={CHAT_MARKER: marker} if marker is not None else {},
            account_data_in_sync=marker_in_sync,
            timeline=list(timeline),
        )
        self.rooms[room_id] = room
        return room

    def add_invite(self, room_id: str, inviter: str) -> FakeRoom:
        """A pending invite of the bot to ``room_id``, shown by the initial sync."""
        room = self.add_room(room_id, joined=False)
        room.invited_by = inviter
        return room

    def queue_sync(self, timelines: Mapping[str, Sequence[dict[str, Any]]]) -> None:
        """The next long-poll answers at once with these events (room id -> timeline)."""
        self._batches.append({room_id: list(events) for room_id, events in timelines.items()})
        self._batch_queued.set()

    # --- what happened ----------------------------------------------------------------------

    def of(self, endpoint: str) -> list[Call]:
        return [call for call in self.calls if call.endpoint == endpoint]

    @property
    def unexpected(self) -> list[Call]:
        return self.of("unexpected")

    def provisioning_calls(self) -> list[Call]:
        """Requests that create rooms or Spaces or link them."""
        return [
            call
            for call in self.calls
            if call.endpoint == "create_room"
            or (call.endpoint == "put_state" and call.event_type in _SPACE_STATE)
        ]

    def account_data_writes(self) -> list[Call]:
        return [
            call
            for call in self.calls
            if call.endpoint in ("put_room_account_data", "put_account_data")
        ]

    def sent_in(self, room_id: str) -> list[Sent]:
        return [sent for sent in self.sent if sent.room_id == room_id]

    async def wait_for(self, predicate: Callable[[Call], bool], *, ended: bool = False) -> Call:
        """The first recorded request matching ``predicate`` (answered, if ``ended``); waits
        for it to arrive if there is none yet."""
        while True:
            for call in self.calls:
                if predicate(call) and (not ended or call.ended is not None):
                    return call
            await self._changed.wait()

    # --- the server ---------------------------------------------------------------------------

    async def handle(self, request: httpx.Request) -> httpx.Response:
        raw_path = request.url.raw_path.decode("ascii").partition("?")[0]
        segments = [unquote(part) for part in raw_path.split("/")]
        call = Call(
            at=trio.current_time(),
            method=request.method,
            path="/".join(segments),
            query=dict(request.url.params),
            endpoint="unexpected",
            body=json.loads(request.content) if request.content else None,
            logs_before=len(self._logs),
        )
        route = self._route(call, segments)
        self.calls.append(call)
        for observe in self.observers:
            observe(call)
        self._changed.set()
        status, body = await route()
        # The server has acted (a send is an event from now on); the answer takes a while.
        delay = self.delays.get(call.endpoint, 0.0)
        if delay:
            await trio.sleep(delay)
        call.ended = trio.current_time()
        call.status = status
        self._changed.set()
        headers = {"Date": self.date} if self.date is not None else None
        return httpx.Response(status, json=body, headers=headers)

    def _route(self, call: Call, segments: list[str]) -> Callable[[], Awaitable[Answer]]:
        """Name the endpoint on ``call`` and return the coroutine function answering it."""
        if segments[:4] != _V3:
            return self._unrecognized
        rest = segments[4:]
        method = call.method
        match rest:
            case ["account", "whoami"] if method == "GET":
                call.endpoint = "whoami"
                return self._whoami
            case ["sync"] if method == "GET":
                if call.query.get("full_state") == "true":
                    call.endpoint = "initial_sync"
                    return self._initial_sync
                if call.query.get("timeout") == LONG_POLL_TIMEOUT_MS:
                    call.endpoint = "long_poll"
                    return self._long_poll
            case ["joined_rooms"] if method == "GET":
                call.endpoint = "joined_rooms"
                return self._joined_rooms
            case ["user", user, "rooms", room_id, "account_data", data_type] if user == BOT:
                call.room_id, call.event_type = room_id, data_type
                if method == "GET":
                    call.endpoint = "get_room_account_data"
                    return lambda: self._get_room_account_data(room_id, data_type)
                if method == "PUT":
                    call.endpoint = "put_room_account_data"
                    return lambda: self._put_room_account_data(room_id, data_type, call.body)
            case ["user", user, "filter"] if user == BOT and method == "POST":
                call.endpoint = "upload_filter"
                return self._upload_filter
            case ["user", user, "account_data", data_type] if user == BOT and method == "PUT":
                call.endpoint, call.event_type = "put_account_data", data_type
                return self._empty
            case ["rooms", room_id, "send", event_type, txn_id] if method == "PUT":
                call.endpoint, call.room_id, call.event_type = "send", room_id, event_type
                return lambda: self._send(room_id, event_type, txn_id, call.body)
            case ["rooms", room_id, "receipt", _, _] if method == "POST":
                call.endpoint, call.room_id = "receipt", room_id
                return self._empty
            case ["rooms", room_id, "messages"] if method == "GET":
                call.endpoint, call.room_id = "messages", room_id
                return lambda: self._messages(call.query)
            case ["rooms", room_id, "state", event_type, *_] if method == "PUT":
                # Recognised so that tests can see it; the bot never needs it.
                call.endpoint, call.room_id, call.event_type = "put_state", room_id, event_type
                return self._unrecognized
            case ["join", room_id] if method == "POST":
                call.endpoint, call.room_id = "join", room_id
                return lambda: self._join(room_id)
            case ["rooms", room_id, "leave"] if method == "POST":
                call.endpoint, call.room_id = "leave", room_id
                return lambda: self._leave(room_id)
            case ["keys", "upload"] if method == "POST":
                call.endpoint = "keys_upload"
                return lambda: self._keys_upload(call.body)
            case ["keys", "query"] if method == "POST":
                call.endpoint = "keys_query"
                return self._keys_query
            case ["createRoom"] if method == "POST":
                # Recognised so that tests can see it; the bot never needs it.
                call.endpoint = "create_room"
                return self._unrecognized
        return self._unrecognized

    async def _unrecognized(self) -> Answer:
        return 404, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}

    async def _empty(self) -> Answer:
        return 200, {}

    async def _keys_upload(self, body: Any) -> Answer:
        """The bot's device keys are kept (a query shows them); one-time keys counted."""
        if isinstance(body, dict):
            if isinstance(body.get("device_keys"), dict):
                self.device_keys = body["device_keys"]
            self.one_time_keys += len(body.get("one_time_keys") or {})
        return 200, {"one_time_key_counts": {"signed_curve25519": self.one_time_keys}}

    async def _keys_query(self) -> Answer:
        devices = {BOT: {DEVICE: self.device_keys}} if self.device_keys else {}
        return 200, {"device_keys": devices, "failures": {}}

    async def _whoami(self) -> Answer:
        return 200, {"user_id": BOT, "device_id": DEVICE, "is_guest": False}

    async def _initial_sync(self) -> Answer:
        join = {
            room.room_id: self._joined_room(
                room.timeline,
                account_data=room.account_data if room.account_data_in_sync else {},
                state=self._room_state(room),
            )
            for room in self.rooms.values()
            if room.joined
        }
        invite = {
            room.room_id: {
                "invite_state": {
                    "events": [
                        {
                            "type": "m.room.member",
                            "state_key": BOT,
                            "sender": room.invited_by,
                            "content": {"membership": "invite"},
                        }
                    ]
                }
            }
            for room in self.rooms.values()
            if not room.joined and room.invited_by is not None
        }
        return 200, self._sync_body(join, invite)

    async def _long_poll(self) -> Answer:
        with trio.move_on_after(self.long_poll_s):
            while not self._batches:
                await self._batch_queued.wait()
        join: dict[str, Any] = {}
        if self._batches:
            join = {
                room_id: self._joined_room(events)
                for room_id, events in self._batches.popleft().items()
            }
        return 200, self._sync_body(join, {})

    async def _upload_filter(self) -> Answer:
        return 200, {"filter_id": f"filter{next(self._filter_ids)}"}

    async def _joined_rooms(self) -> Answer:
        return 200, {"joined_rooms": [r.room_id for r in self.rooms.values() if r.joined]}

    async def _get_room_account_data(self, room_id: str, data_type: str) -> Answer:
        room = self.rooms.get(room_id)
        content = room.account_data.get(data_type) if room is not None else None
        if content is None:
            return 404, {"errcode": "M_NOT_FOUND", "error": "Room account data not found."}
        return 200, content

    async def _put_room_account_data(
        self, room_id: str, data_type: str, content: dict[str, Any]
    ) -> Answer:
        room = self.rooms.setdefault(room_id, FakeRoom(room_id, joined=False))
        room.account_data[data_type] = content
        return 200, {}

    async def _send(
        self, room_id: str, event_type: str, txn_id: str, content: dict[str, Any]
    ) -> Answer:
        key = (room_id, event_type, txn_id)
        if key not in self._txns:  # a re-sent transaction gets the first event's id
            event_id = f"$bot{next(self._event_ids)}"
            self._txns[key] = event_id
            self.sent.append(
                Sent(room_id, event_type, txn_id, content, event_id, trio.current_time())
            )
        return 200, {"event_id": self._txns[key]}

    async def _messages(self, query: dict[str, str]) -> Answer:
        # Nothing further back: no ``end``.
        return 200, {"start": query.get("from", "t0"), "chunk": [], "state": []}

    async def _join(self, room_id: str) -> Answer:
        room = self.rooms.setdefault(room_id, FakeRoom(room_id))
        room.joined = True
        room.invited_by = None
        return 200, {"room_id": room_id}

    async def _leave(self, room_id: str) -> Answer:
        room = self.rooms.get(room_id)
        if room is not None:
            room.joined = False
            room.invited_by = None
        return 200, {}

    # --- response shapes (sync.yaml) ----------------------------------------------------------

    def _sync_body(self, join: dict[str, Any], invite: dict[str, Any]) -> dict[str, Any]:
        return {
            "next_batch": f"s{next(self._tokens)}",
            "rooms": {"join": join, "invite": invite, "leave": {}, "knock": {}},
            "account_data": {"events": []},
            "presence": {"events": []},
            "to_device": {"events": []},
            "device_lists": {"changed": [], "left": []},
            "device_one_time_keys_count": {},
        }

    @staticmethod
    def _joined_room(
        timeline: Sequence[dict[str, Any]],
        *,
        account_data: Mapping[str, dict[str, Any]] | None = None,
        state: Sequence[dict[str, Any]] = (),
    ) -> dict[str, Any]:
        return {
            "summary": {"m.joined_member_count": 2, "m.invited_member_count": 0},
            "state": {"events": list(state)},
            "timeline": {"events": list(timeline), "limited": False, "prev_batch": "t0"},
            "ephemeral": {"events": []},
            "account_data": {
                "events": [
                    {"type": data_type, "content": content}
                    for data_type, content in (account_data or {}).items()
                ]
            },
            "unread_notifications": {"highlight_count": 0, "notification_count": 0},
        }

    @staticmethod
    def _room_state(room: FakeRoom) -> list[dict[str, Any]]:
        return [
            {
                "type": "m.room.create",
                "state_key": "",
                "event_id": f"$create-{room.room_id}",
                "sender": ALICE,
                "origin_server_ts": BASE_TS - 86_400_000,
                "content": {"room_version": "11"},
            },
            {
                "type": "m.room.member",
                "state_key": BOT,
                "event_id": f"$join-{room.room_id}",
                "sender": BOT,
                "origin_server_ts": BASE_TS - 86_400_000,
                "content": {"membership": "join"},
            },
        ]
