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
room account data (the chat marker: GET and PUT), sends, receipts, /messages, join, leave,
joined_members, members, filter uploads, single events and relations. Every request is recorded
in order as a `Call`: when it arrived (trio's clock), method, path, query, and how many log
entries had been captured by then, so a test can put requests and log events in one order.
Anything else is answered ``404 M_UNRECOGNIZED`` and listed in `unexpected`; ``POST /createRoom``
and room state PUTs are recognised (and refused) so that tests can assert the bot never
provisions anything when it should only read. A room state GET finds nothing (the rooms here
have no state but their encryption).

End-to-end encryption, as a homeserver relays it: ``keys/upload`` keeps the device keys, one-time
keys and fallback key of the bot (and of the peer devices a test publishes with `upload_keys`),
``keys/query`` answers each asked user's devices, ``keys/claim`` hands out each one-time key once
(then the fallback key), ``sendToDevice`` records what the bot sends (`to_device_sent`) and keeps
it for the receiving device (`take_to_device`). A room made with ``encryption=`` shows its
``m.room.encryption`` state. To-device events for the bot ride in queued batches
(``queue_sync(..., to_device=...)``) and, as on a real server, are delivered again by every sync
until one comes with a ``since`` at or past the batch that carried them. Each sync states the
bot's unclaimed one-time keys (``device_one_time_keys_count``) once it has uploaded any. With
`clock_base_ms` set, every answer's ``Date`` is ``clock_base_ms`` plus trio's clock (the
server's clock moves with virtual time); with `repeat_answers`, a long-poll from a ``since``
answered before gets the same answer again (a batch the bot failed to commit comes back).

The events a room has (`FakeRoom.events`): its initial timeline, then every event queued for it
(from the moment it is queued, as on a server that has it before the bot syncs) and every event
the bot sends, in that order. ``GET /v3/rooms/{room}/event/{id}`` and
``GET /v1/rooms/{room}/relations/{id}[/{relType}[/{eventType}]]`` read them as Synapse 1.163
answers (tests/integration/test_matrix_api_messaging.py shows it): relations newest first
(``dir=f``: oldest first), ``limit`` 5 unless given, ``from``/``next_batch`` plain offsets;
``recurse=true`` follows relations of relating events too, and the ``relType``/``eventType``
filters apply to every event found (so a thread's replies' edits come only without a relType);
a redacted event relates to nothing; an unknown parent is ``404 M_UNKNOWN`` (the spec says
M_NOT_FOUND), an unknown event ``404 M_NOT_FOUND``. An event is served with its latest edit
by its sender bundled (``unsigned["m.relations"]["m.replace"]``), a thread root with its thread
summary, a redacted one without content and with ``redacted_because``.
"""

from __future__ import annotations

import email.utils
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
    "BOB",
    "BOT",
    "DEVICE",
    "HOMESERVER",
    "Call",
    "FakeHomeserver",
    "FakeRoom",
    "Sent",
    "ToDeviceSent",
    "notice_event",
    "text_event",
]

HOMESERVER = "http://hs.test"
BOT = "@bot:hs.test"
DEVICE = "BOTDEVICE"
ALICE = "@alice:hs.test"
BOB = "@bob:hs.test"
# origin_server_ts of scripted events: after the chats in the tests were created.
BASE_TS = 1_700_000_000_000
LONG_POLL_TIMEOUT_MS = "30000"
_V3 = ["", "_matrix", "client", "v3"]
_V1 = ["", "_matrix", "client", "v1"]
# Synapse 1.163's /relations: its default page, its cap, and the depth it says it recursed to
# (its query follows relations up to five levels down).
RELATIONS_DEFAULT_LIMIT = 5
RELATIONS_MAX_LIMIT = 1000
RELATIONS_RECURSION_DEPTH = 3
_RELATIONS_LEVELS = 5
_SPACE_STATE = frozenset({"m.space.child", "m.space.parent"})
SIGNED_CURVE25519 = "signed_curve25519"

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
    ``get_event``, ``relations``, ``join``, ``leave``, ``upload_filter``, ``create_room``,
    ``put_state``, ``put_account_data``, ``unexpected``."""
    room_id: str | None = None
    event_type: str | None = None
    """The event type of a send or state PUT, the account data type of an account data call."""
    body: Any = None
    logs_before: int = 0
    """How many log entries had been captured when the request arrived."""
    ended: float | None = None
    """trio's clock when the answer left; None while pending (or if the client gave up)."""
    status: int | None = None
    answer: Any = None
    """The JSON body of the answer, once it left."""

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


@dataclass(frozen=True)
class ToDeviceSent:
    """One device's message of a ``sendToDevice`` request."""

    sender: str
    event_type: str
    txn_id: str
    user_id: str
    device_id: str
    content: dict[str, Any]
    at: float


@dataclass
class _Batch:
    timelines: dict[str, list[dict[str, Any]]]
    to_device: list[dict[str, Any]]
    changed: list[str]


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
    members: list[str] = field(default_factory=lambda: [ALICE])
    """Joined members besides the bot (what joined_members answers)."""
    encryption: dict[str, Any] | None = None
    """The room's ``m.room.encryption`` content, shown in its state; None: not encrypted."""
    later: list[dict[str, Any]] = field(default_factory=list)
    """Events after the initial timeline: queued for a sync, or sent by the bot, in order."""

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every event the server has in this room, oldest first (see the module docstring)."""
        return [*self.timeline, *self.later]


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
        """How many one-time keys the bot uploaded, in all."""
        self.peer_device_keys: dict[str, dict[str, dict[str, Any]]] = {}
        """Other users' device keys: user id -> device id -> signed keys."""
        self.otk_pool: dict[tuple[str, str], dict[str, Any]] = {}
        """Unclaimed one-time keys by (user id, device id): key id -> key."""
        self.fallback_keys: dict[tuple[str, str], tuple[str, Any]] = {}
        self.fallback_used: set[tuple[str, str]] = set()
        self.claimed: list[tuple[str, str, str]] = []
        """(user id, device id, key id) of every key handed out, in order."""
        self.to_device_sent: list[ToDeviceSent] = []
        """What the bot sent to devices (one entry per device), in order."""
        self.clock_base_ms: int | None = None
        self.account_data: dict[str, Any] = {}
        """The bot's global account data, as it put it."""
        self.key_backups: list[dict[str, Any]] = []
        """Key backup versions made (``version``, ``algorithm``, ``auth_data``), the
        last one current, and the keys in each: ``room_keys[version][room][session]``."""
        self.room_keys: dict[str, dict[str, dict[str, Any]]] = {}
        self.repeat_answers = False
        self._to_device_inbox: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._to_device_txns: set[tuple[str, str]] = set()
        # The bot's to-device events not acknowledged yet: [token number that carried
        # it (None: not delivered yet), event].
        self._bot_to_device: list[list[Any]] = []
        self._answers: dict[str, dict[str, Any]] = {}
        self._logs = logs if logs is not None else []
        self._batches: deque[_Batch] = deque()
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
        encryption: dict[str, Any] | None = None,
    ) -> FakeRoom:
        """A room; ``marker`` is the chat marker the bot keeps in its room account data;
        ``encryption`` the content of its ``m.room.encryption`` state (None: not encrypted)."""
        room = FakeRoom(
            room_id,
            joined=joined,
            account_data={CHAT_MARKER: marker} if marker is not None else {},
            account_data_in_sync=marker_in_sync,
            timeline=list(timeline),
            encryption=encryption,
        )
        self.rooms[room_id] = room
        return room

    def add_invite(self, room_id: str, inviter: str) -> FakeRoom:
        """A pending invite of the bot to ``room_id``, shown by the initial sync."""
        room = self.add_room(room_id, joined=False)
        room.invited_by = inviter
        return room

    def queue_sync(
        self,
        timelines: Mapping[str, Sequence[dict[str, Any]]],
        *,
        to_device: Sequence[dict[str, Any]] = (),
        changed: Sequence[str] = (),
    ) -> None:
        """The next long-poll answers at once with these events (room id -> timeline),
        ``to_device`` events for the bot's device and ``device_lists.changed``."""
        self._batches.append(
            _Batch(
                {room_id: list(events) for room_id, events in timelines.items()},
                list(to_device),
                list(changed),
            )
        )
        for room_id, events in timelines.items():
            room = self.rooms.get(room_id)
            if room is not None:
                room.later.extend(events)
        self._batch_queued.set()

    def now_ms(self) -> int:
        """The server's clock (`clock_base_ms` plus trio's clock; set `clock_base_ms` first)."""
        assert self.clock_base_ms is not None, "the server's clock is not set"
        return self.clock_base_ms + int(trio.current_time() * 1000)

    # --- end-to-end encryption: what devices publish, claim and send -------------------------

    def upload_keys(self, user_id: str, device_id: str, body: Mapping[str, Any]) -> int:
        """``keys/upload`` from ``user_id``'s ``device_id``: the unclaimed one-time key count."""
        device = (user_id, device_id)
        if isinstance(body.get("device_keys"), dict):
            if user_id == BOT:
                self.device_keys = body["device_keys"]
            else:
                self.peer_device_keys.setdefault(user_id, {})[device_id] = body["device_keys"]
        one_time_keys = body.get("one_time_keys") or {}
        pool = self.otk_pool.setdefault(device, {})
        for key_id, key in one_time_keys.items():
            assert pool.get(key_id, key) == key, f"one-time key {key_id} uploaded twice"
            pool[key_id] = key
        for key_id, key in (body.get("fallback_keys") or {}).items():
            self.fallback_keys[device] = (key_id, key)
            self.fallback_used.discard(device)
        return len(pool)

    def query_keys(self, users: Mapping[str, Sequence[str]]) -> dict[str, Any]:
        """``keys/query``: the asked users' devices (all of them for an empty list)."""
        answer: dict[str, dict[str, Any]] = {}
        for user_id, device_ids in users.items():
            if user_id == BOT:
                known = {DEVICE: self.device_keys} if self.device_keys else {}
            else:
                known = dict(self.peer_device_keys.get(user_id, {}))
            answer[user_id] = {d: k for d, k in known.items() if not device_ids or d in device_ids}
        return {"device_keys": answer, "failures": {}}

    def claim_keys(self, wanted: Mapping[str, Mapping[str, str]]) -> dict[str, Any]:
        """``keys/claim``: each one-time key once, then the device's fallback key."""
        answer: dict[str, dict[str, Any]] = {}
        for user_id, devices in wanted.items():
            for device_id in devices:
                device = (user_id, device_id)
                pool = self.otk_pool.get(device, {})
                if pool:
                    key_id = sorted(pool)[0]
                    key = pool.pop(key_id)
                elif device in self.fallback_keys:
                    key_id, key = self.fallback_keys[device]
                    self.fallback_used.add(device)
                else:
                    continue
                self.claimed.append((user_id, device_id, key_id))
                answer.setdefault(user_id, {})[device_id] = {key_id: key}
        return {"one_time_keys": answer, "failures": {}}

    def send_to_device(
        self,
        sender: str,
        event_type: str,
        txn_id: str,
        messages: Mapping[str, Mapping[str, dict[str, Any]]],
    ) -> None:
        """``sendToDevice``: kept for each receiving device (once per transaction id)."""
        if (sender, txn_id) in self._to_device_txns:
            return
        self._to_device_txns.add((sender, txn_id))
        for user_id, devices in messages.items():
            for device_id, content in devices.items():
                if sender == BOT:
                    self.to_device_sent.append(
                        ToDeviceSent(
                            sender, event_type, txn_id, user_id, device_id, content,
                            trio.current_time(),
                        )
                    )  # fmt: skip
                event = {"type": event_type, "sender": sender, "content": content}
                self._to_device_inbox.setdefault((user_id, device_id), []).append(event)

    def take_to_device(self, user_id: str, device_id: str) -> list[dict[str, Any]]:
        """The to-device events sent to a device since the last call (the bot's own
        reach it only through `queue_sync`)."""
        return self._to_device_inbox.pop((user_id, device_id), [])

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
        call.status, call.answer = status, body
        self._changed.set()
        date = self.date
        if self.clock_base_ms is not None:
            date = email.utils.formatdate(self.now_ms() / 1000, usegmt=True)
        headers = {"Date": date} if date is not None else None
        return httpx.Response(status, json=body, headers=headers)

    def _route(self, call: Call, segments: list[str]) -> Callable[[], Awaitable[Answer]]:
        """Name the endpoint on ``call`` and return the coroutine function answering it."""
        if segments[:4] == _V1:
            match segments[4:]:
                case ["rooms", room_id, "relations", event_id, *filters] if (
                    call.method == "GET" and len(filters) <= 2
                ):
                    call.endpoint, call.room_id = "relations", room_id
                    return lambda: self._relations(room_id, event_id, filters, call.query)
            return self._unrecognized
        if segments[:4] != _V3:
            return self._unrecognized
        rest = segments[4:]
        method = call.method
        match rest:
            case ["account", "whoami"] if method == "GET":
                call.endpoint = "whoami"
                return self._whoami
            case ["sync"] if method == "GET":
                since = call.query.get("since")
                if call.query.get("full_state") == "true":
                    call.endpoint = "initial_sync"
                    self._acknowledge(since)
                    return self._initial_sync
                if call.query.get("timeout") == LONG_POLL_TIMEOUT_MS:
                    call.endpoint = "long_poll"
                    return lambda: self._long_poll(since)
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
                self.account_data[data_type] = call.body
                return self._empty
            case ["user", user, "account_data", data_type] if user == BOT and method == "GET":
                call.endpoint, call.event_type = "get_account_data", data_type
                return lambda: self._get_account_data(data_type)
            case ["rooms", room_id, "send", event_type, txn_id] if method == "PUT":
                call.endpoint, call.room_id, call.event_type = "send", room_id, event_type
                return lambda: self._send(room_id, event_type, txn_id, call.body)
            case ["rooms", room_id, "receipt", _, _] if method == "POST":
                call.endpoint, call.room_id = "receipt", room_id
                return self._empty
            case ["rooms", room_id, "messages"] if method == "GET":
                call.endpoint, call.room_id = "messages", room_id
                return lambda: self._messages(call.query)
            case ["rooms", room_id, "event", event_id] if method == "GET":
                call.endpoint, call.room_id = "get_event", room_id
                return lambda: self._get_event(room_id, event_id)
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
            case ["keys", "device_signing", "upload"] if method == "POST":
                # Cross-signing: taken, not kept (the scenarios here do not read it back).
                call.endpoint = "cross_signing_upload"
                return self._empty
            case ["keys", "signatures", "upload"] if method == "POST":
                call.endpoint = "signatures_upload"
                return self._no_failures
            case ["keys", "upload"] if method == "POST":
                call.endpoint = "keys_upload"
                return lambda: self._keys_upload(call.body)
            case ["keys", "query"] if method == "POST":
                call.endpoint = "keys_query"
                return lambda: self._keys_query(call.body)
            case ["keys", "claim"] if method == "POST":
                call.endpoint = "keys_claim"
                return lambda: self._keys_claim(call.body)
            case ["room_keys", "version"] if method == "GET":
                call.endpoint = "get_key_backup"
                return self._get_key_backup
            case ["room_keys", "version"] if method == "POST":
                call.endpoint = "create_key_backup"
                return lambda: self._create_key_backup(call.body)
            case ["room_keys", "keys"] if method in ("GET", "PUT"):
                call.endpoint = "put_room_keys" if method == "PUT" else "get_room_keys"
                return lambda: self._room_keys(call.query.get("version"), call.body)
            case ["sendToDevice", event_type, txn_id] if method == "PUT":
                call.endpoint, call.event_type = "send_to_device", event_type
                return lambda: self._send_to_device(event_type, txn_id, call.body)
            case ["rooms", room_id, "joined_members"] if method == "GET":
                call.endpoint, call.room_id = "joined_members", room_id
                return lambda: self._joined_members(room_id)
            case ["rooms", room_id, "members"] if method == "GET":
                call.endpoint, call.room_id = "members", room_id
                return lambda: self._members(room_id)
            case ["rooms", room_id, "state", event_type, *_] if method == "GET":
                # No room here has state beyond its encryption (shown in the sync).
                call.endpoint, call.room_id, call.event_type = "get_state", room_id, event_type
                return self._no_state
            case ["createRoom"] if method == "POST":
                # Recognised so that tests can see it; the bot never needs it.
                call.endpoint = "create_room"
                return self._unrecognized
        return self._unrecognized

    async def _unrecognized(self) -> Answer:
        return 404, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}

    async def _empty(self) -> Answer:
        return 200, {}

    async def _get_account_data(self, data_type: str) -> Answer:
        if data_type not in self.account_data:
            return 404, {"errcode": "M_NOT_FOUND", "error": "Account data not found"}
        return 200, self.account_data[data_type]

    async def _get_key_backup(self) -> Answer:
        if not self.key_backups:
            return 404, {"errcode": "M_NOT_FOUND", "error": "No current backup version"}
        current = self.key_backups[-1]
        keys = self.room_keys[current["version"]]
        count = sum(len(sessions) for sessions in keys.values())
        return 200, {**current, "count": count, "etag": str(count)}

    async def _create_key_backup(self, body: Any) -> Answer:
        version = str(len(self.key_backups) + 1)
        self.key_backups.append({"version": version, **body})
        self.room_keys[version] = {}
        return 200, {"version": version}

    async def _room_keys(self, version: str | None, body: Any) -> Answer:
        """Kept as sent (a real server keeps the better copy; the tests here send each
        session's copy once); a version that is not the current one is refused."""
        current = self.key_backups[-1]["version"] if self.key_backups else None
        if version is None or version not in self.room_keys:
            return 404, {"errcode": "M_NOT_FOUND", "error": "Unknown backup version"}
        if body is None:
            rooms = self.room_keys[version]
            return 200, {"rooms": {r: {"sessions": sessions} for r, sessions in rooms.items()}}
        if version != current:
            return 403, {"errcode": "M_WRONG_ROOM_KEYS_VERSION", "current_version": current}
        for room_id, room in body["rooms"].items():
            self.room_keys[version].setdefault(room_id, {}).update(room["sessions"])
        count = sum(len(sessions) for sessions in self.room_keys[version].values())
        return 200, {"etag": str(count), "count": count}

    async def _keys_upload(self, body: Any) -> Answer:
        """The bot's device keys are kept (a query shows them); one-time keys too."""
        count = 0
        if isinstance(body, dict):
            self.one_time_keys += len(body.get("one_time_keys") or {})
            count = self.upload_keys(BOT, DEVICE, body)
        return 200, {"one_time_key_counts": {SIGNED_CURVE25519: count}}

    async def _keys_query(self, body: Any) -> Answer:
        users = body.get("device_keys") if isinstance(body, dict) else None
        return 200, self.query_keys(users if isinstance(users, dict) else {BOT: []})

    async def _keys_claim(self, body: Any) -> Answer:
        wanted = body.get("one_time_keys") if isinstance(body, dict) else None
        return 200, self.claim_keys(wanted if isinstance(wanted, dict) else {})

    async def _send_to_device(self, event_type: str, txn_id: str, body: Any) -> Answer:
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, dict):
            return 400, {"errcode": "M_BAD_JSON", "error": "messages missing"}
        self.send_to_device(BOT, event_type, txn_id, messages)
        return 200, {}

    async def _joined_members(self, room_id: str) -> Answer:
        room = self.rooms.get(room_id)
        if room is None or not room.joined:
            return 403, {"errcode": "M_FORBIDDEN", "error": "not in the room"}
        return 200, {"joined": {u: {"display_name": None} for u in [BOT, *room.members]}}

    async def _members(self, room_id: str) -> Answer:
        room = self.rooms.get(room_id)
        if room is None or not room.joined:
            return 403, {"errcode": "M_FORBIDDEN", "error": "not in the room"}
        chunk = [
            {"type": "m.room.member", "state_key": user, "content": {"membership": "join"}}
            for user in [BOT, *room.members]
        ]
        return 200, {"chunk": chunk}

    async def _no_failures(self) -> Answer:
        return 200, {"failures": {}}

    async def _no_state(self) -> Answer:
        return 404, {"errcode": "M_NOT_FOUND", "error": "Event not found."}

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

    async def _long_poll(self, since: str | None) -> Answer:
        if self.repeat_answers and since is not None and since in self._answers:
            return 200, self._answers[since]
        self._acknowledge(since)
        # To-device events given before and not acknowledged come back at once.
        if not self._bot_to_device:
            with trio.move_on_after(self.long_poll_s):
                while not self._batches:
                    await self._batch_queued.wait()
        join: dict[str, Any] = {}
        changed: list[str] = []
        if self._batches:
            batch = self._batches.popleft()
            join = {
                room_id: self._joined_room(events) for room_id, events in batch.timelines.items()
            }
            self._bot_to_device.extend([None, event] for event in batch.to_device)
            changed = batch.changed
        body = self._sync_body(join, {}, changed=changed)
        if self.repeat_answers and since is not None:
            self._answers[since] = body
        return 200, body

    def _acknowledge(self, since: str | None) -> None:
        """A sync from ``since`` acknowledges the to-device events delivered up to it."""
        if since is None or not since.startswith("s") or not since[1:].isdigit():
            return
        position = int(since[1:])
        self._bot_to_device = [
            entry for entry in self._bot_to_device if entry[0] is None or entry[0] > position
        ]

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
            room = self.rooms.get(room_id)
            if room is not None:
                ts = self.now_ms() if self.clock_base_ms is not None else BASE_TS
                room.later.append(
                    {
                        "type": event_type,
                        "event_id": event_id,
                        "sender": BOT,
                        "origin_server_ts": ts,
                        "content": content,
                        "unsigned": {},
                    }
                )
        return 200, {"event_id": self._txns[key]}

    async def _messages(self, query: dict[str, str]) -> Answer:
        # Nothing further back: no ``end``.
        return 200, {"start": query.get("from", "t0"), "chunk": [], "state": []}

    async def _get_event(self, room_id: str, event_id: str) -> Answer:
        room = self.rooms.get(room_id)
        events = _Events(room.events if room is not None else [])
        event = events.by_id.get(event_id)
        if room is None or event is None:
            return 404, {"errcode": "M_NOT_FOUND", "error": "Event not found."}
        return 200, events.served(event, room_id)

    async def _relations(
        self, room_id: str, parent_id: str, filters: list[str], query: dict[str, str]
    ) -> Answer:
        room = self.rooms.get(room_id)
        if room is None:
            return 403, {"errcode": "M_FORBIDDEN", "error": "User not in room"}
        direction = query.get("dir", "b")
        recurse = query.get("recurse", "false")
        limit, start = query.get("limit", str(RELATIONS_DEFAULT_LIMIT)), query.get("from", "rel0")
        if (
            direction not in ("b", "f")
            or recurse not in ("true", "false")
            or not limit.isdigit()
            or not start.startswith("rel")
            or not start[3:].isdigit()
        ):
            return 400, {"errcode": "M_INVALID_PARAM", "error": "Invalid parameter"}
        events = _Events(room.events)
        parent = events.by_id.get(parent_id)
        if parent is None:
            return 404, {"errcode": "M_UNKNOWN", "error": "Unknown parent event."}
        relating = events.relating_to(
            parent_id, levels=_RELATIONS_LEVELS if recurse == "true" else 1
        )
        rel_type, event_type = [*filters, None, None][:2]
        parent_redacted = parent_id in events.redactions
        found = [
            (index, event)
            for index, event, relation in relating
            if (rel_type is None or relation == rel_type)
            and (event_type is None or event.get("type") == event_type)
            # Synapse keeps a redacted parent's edits to itself (they would leak its content).
            and not (parent_redacted and relation == "m.replace")
        ]
        found.sort(key=lambda pair: pair[0], reverse=direction == "b")
        offset, count = int(start[3:]), min(int(limit), RELATIONS_MAX_LIMIT)
        page = found[offset : offset + count]
        body: dict[str, Any] = {"chunk": [events.served(event, room_id) for _, event in page]}
        if offset + count < len(found):
            body["next_batch"] = f"rel{offset + count}"
        if "from" in query:
            body["prev_batch"] = start
        if recurse == "true":
            body["recursion_depth"] = RELATIONS_RECURSION_DEPTH
        return 200, body

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

    def _sync_body(
        self, join: dict[str, Any], invite: dict[str, Any], *, changed: Sequence[str] = ()
    ) -> dict[str, Any]:
        token = next(self._tokens)
        for entry in self._bot_to_device:
            entry[0] = token  # delivered (again) with this batch
        counts: dict[str, int] = {}
        if self.device_keys:
            counts[SIGNED_CURVE25519] = len(self.otk_pool.get((BOT, DEVICE), {}))
        return {
            "next_batch": f"s{token}",
            "rooms": {"join": join, "invite": invite, "leave": {}, "knock": {}},
            "account_data": {"events": []},
            "presence": {"events": []},
            "to_device": {"events": [event for _, event in self._bot_to_device]},
            "device_lists": {"changed": list(changed), "left": []},
            "device_one_time_keys_count": counts,
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
        ] + (
            [
                {
                    "type": "m.room.encryption",
                    "state_key": "",
                    "event_id": f"$encryption-{room.room_id}",
                    "sender": ALICE,
                    "origin_server_ts": BASE_TS - 86_400_000,
                    "content": room.encryption,
                }
            ]
            if room.encryption is not None
            else []
        )


def _relation(event: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(rel_type, event_id)`` of the event's ``m.relates_to``, when both are strings
    (otherwise it relates to nothing, as on Synapse)."""
    content = event.get("content")
    relates = content.get("m.relates_to") if isinstance(content, dict) else None
    if not isinstance(relates, dict):
        return None
    rel_type, event_id = relates.get("rel_type"), relates.get("event_id")
    if isinstance(rel_type, str) and isinstance(event_id, str):
        return rel_type, event_id
    return None


class _Events:
    """A room's events as the server reads them for /event and /relations."""

    def __init__(self, events: Sequence[Any]) -> None:
        self.events = [event for event in events if isinstance(event, dict)]
        self.by_id: dict[str, dict[str, Any]] = {}
        self.redactions: dict[str, dict[str, Any]] = {}
        """Redacted event id -> the first redaction of it."""
        for event in self.events:
            event_id = event.get("event_id")
            if isinstance(event_id, str):
                self.by_id.setdefault(event_id, event)
            if event.get("type") == "m.room.redaction":
                content = event.get("content")
                target = content.get("redacts") if isinstance(content, dict) else None
                target = target if isinstance(target, str) else event.get("redacts")
                if isinstance(target, str):
                    self.redactions.setdefault(target, event)

    def relating_to(self, parent_id: str, *, levels: int) -> list[tuple[int, dict[str, Any], str]]:
        """(position, event, rel_type) of the events relating to ``parent_id``, and with
        ``levels`` > 1 of those relating to them, that many levels down. A redacted event
        relates to nothing (Synapse drops its relation)."""
        found: list[tuple[int, dict[str, Any], str]] = []
        seen = {parent_id}
        parents = {parent_id}
        for _ in range(levels):
            children: set[str] = set()
            for index, event in enumerate(self.events):
                relation = _relation(event)
                event_id = event.get("event_id")
                if (
                    relation is None
                    or relation[1] not in parents
                    or not isinstance(event_id, str)
                    or event_id in seen
                    or event_id in self.redactions
                ):
                    continue
                seen.add(event_id)
                children.add(event_id)
                found.append((index, event, relation[0]))
            if not children:
                break
            parents = children
        return found

    def served(self, event: dict[str, Any], room_id: str, *, bundle: bool = True) -> dict[str, Any]:
        """``event`` as a client gets it: with its room id, redacted if it was, with its
        latest edit and (a thread root) its thread summary bundled."""
        served = {**event, "room_id": room_id, "unsigned": dict(event.get("unsigned") or {})}
        event_id = event.get("event_id")
        redaction = self.redactions.get(event_id) if isinstance(event_id, str) else None
        if redaction is not None:
            served["content"] = {}
            served["unsigned"]["redacted_because"] = {**redaction, "room_id": room_id}
            return served
        if not bundle or not isinstance(event_id, str):
            return served
        aggregations: dict[str, Any] = {}
        edits = [
            edit
            for _, edit, rel_type in self.relating_to(event_id, levels=1)
            if rel_type == "m.replace"
            and edit.get("sender") == event.get("sender")
            and edit.get("type") == event.get("type")
        ]
        if edits:
            aggregations["m.replace"] = self.served(edits[-1], room_id, bundle=False)
        replies = [
            reply
            for _, reply, rel_type in self.relating_to(event_id, levels=1)
            if rel_type == "m.thread"
        ]
        if replies:
            aggregations["m.thread"] = {
                "latest_event": self.served(replies[-1], room_id),
                "count": len(replies),
                "current_user_participated": any(
                    one.get("sender") == BOT for one in [event, *replies]
                ),
            }
        if aggregations:
            served["unsigned"]["m.relations"] = aggregations
        return served
