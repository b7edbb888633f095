"""An independent human-side Matrix client for the E2EE tests: matrix-js-sdk with its Rust crypto.

Each `JsClient` is one long-running Node process (tests/e2ee_client/driver.mjs) speaking JSON
lines: one request, one response with the same id, errors as responses. Every call here is
bounded by `trio.fail_after`; the process is killed by PID when the ``async with`` block ends,
whatever happened inside it. The process's stderr (the SDK's logs) is kept (its tail) and shown
in every `JsClientError` and when the block ends with an exception.

    async with open_js_client("alice") as alice:
        await alice.login(synapse.base_url, user.user_id, user.password)
        room_id = await alice.create_encrypted_dm(bot_user_id)

Needs ``node`` (>= 20) and ``npm ci`` run in tests/e2ee_client (`nox -s tests` does it).
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

__all__ = [
    "E2EE_CLIENT_DIR",
    "Device",
    "JsClient",
    "JsClientError",
    "JsClientTimeout",
    "Login",
    "Message",
    "Verification",
    "VerificationStatus",
    "open_js_client",
]

E2EE_CLIENT_DIR = Path(__file__).resolve().parents[1] / "e2ee_client"
DRIVER = E2EE_CLIENT_DIR / "driver.mjs"

DEFAULT_TIMEOUT = 30.0
"""Seconds any one command may take (the Node side enforces it too and answers with an error)."""
ANSWER_MARGIN = 5.0
"""How much longer than the command's own deadline Python waits for the answer."""
START_TIMEOUT = 30.0
"""Seconds for Node to load the SDK and the crypto WebAssembly."""
MAX_LINE = 8 * 1024 * 1024
STDERR_TAIL = 64 * 1024
"""Bytes of the process's stderr kept, and printed when an ``async with`` block fails."""
ERROR_TAIL = 4000
"""Characters of that tail quoted in each `JsClientError`."""


class JsClientError(Exception):
    """A command failed (the driver's error ``type`` and ``message``), or the process did."""

    def __init__(self, name: str, kind: str, message: str, stderr_tail: str) -> None:
        super().__init__(
            f"js client {name}: {kind}: {message}\n--- node stderr (tail) ---\n{stderr_tail}"
        )
        self.kind = kind
        self.message = message


class JsClientTimeout(JsClientError):
    """The command's deadline passed (a wait that saw nothing matching, or a stuck request)."""


@dataclass(frozen=True)
class Login:
    user_id: str
    device_id: str
    ed25519: str
    curve25519: str


@dataclass(frozen=True)
class Message:
    """One ``m.room.message`` as the client sees it (decrypted when it could be)."""

    event_id: str
    sender: str
    body: str | None
    msgtype: str | None
    encrypted: bool
    """It travelled as ``m.room.encrypted``."""
    decryption_failure: bool
    decryption_failure_reason: str | None
    relates_to: dict[str, Any] | None
    """``m.relates_to`` as a client reads it."""
    wire_relates_to: dict[str, Any] | None
    """``m.relates_to`` of the event as sent (outside the ciphertext for an encrypted event)."""
    thread_root_id: str | None
    """The root of the thread the SDK puts the event in (None: the main timeline)."""
    content: dict[str, Any]
    """The decrypted content (for a failure: the SDK's placeholder)."""
    sender_device_id: str | None
    shield: dict[str, Any] | None
    """The SDK's verdict on an encrypted event: ``{"colour": "none"|"grey"|"red", "reason"}``."""
    type: str
    origin_server_ts: int

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Message:
        fields: dict[str, Any] = {name: value.get(name) for name in cls.__dataclass_fields__}
        return cls(**fields)


@dataclass(frozen=True)
class Device:
    device_id: str
    ed25519: str | None
    curve25519: str | None
    display_name: str | None
    verified: bool
    algorithms: list[str]
    signed_by_owner: bool = False
    """Signed by its owner's self-signing key, as the client's crypto checked it."""


@dataclass(frozen=True)
class Verification:
    """An interactive verification this client requested, as its crypto sees it now."""

    id: str
    """This client's handle for it (not the protocol's transaction id)."""
    transaction_id: str | None
    phase: str
    """VerificationPhase in lower case: requested, ready, started, cancelled, done."""
    other_supports_sas: bool
    """The other side's request or ready named ``m.sas.v1``."""
    cancellation_code: str | None
    cancelling_user_id: str | None
    emoji: list[str] | None
    """The seven emoji's English names, once shown."""
    decimals: list[int] | None
    verify_done: bool
    """The verifier finished: both sides' MACs checked, done exchanged."""
    verify_error: str | None
    cancelled_with: str | None


@dataclass(frozen=True)
class VerificationStatus:
    """How this client sees another user and one of their devices."""

    device_verified: bool
    device_locally_verified: bool
    """Verified interactively from this device."""
    device_cross_signing_verified: bool
    """Signed by its owner's self-signing key, whose identity this user verified."""
    device_signed_by_owner: bool
    user_verified: bool
    user_cross_signing_verified: bool
    """This user's user-signing key signed theirs (needs own cross-signing)."""


class JsClient:
    """One simulated person's client. Create with `open_js_client`; methods are safe to call
    concurrently (one Node process answers requests in any order)."""

    def __init__(self, name: str, process: trio.Process) -> None:
        self.name = name
        self._process = process
        self._ids = itertools.count(1)
        self._waiting: dict[int, _Pending] = {}
        self._send_lock = trio.Lock()
        self._stderr = bytearray()
        self._closed: str | None = None
        self.ready = trio.Event()
        self.versions: dict[str, Any] = {}

    @property
    def stderr_tail(self) -> str:
        return self._stderr.decode(errors="replace")

    # --- commands --------------------------------------------------------------------------

    async def login(
        self,
        homeserver: str,
        user: str,
        password: str,
        device_id: str | None = None,
        *,
        thread_support: bool = False,
    ) -> Login:
        """Password login, Rust crypto initialised (in memory), first sync done.

        ``thread_support``: the SDK models threads as Element does (the root's thread
        object, the latest reply as a thread message's reply fallback)."""
        args = {
            "homeserver": homeserver,
            "user": user,
            "password": password,
            "device_id": device_id,
            "thread_support": thread_support,
        }
        return Login(**await self.call("login", args, timeout=60.0))

    async def create_encrypted_dm(self, invitee: str) -> str:
        """A direct chat as Element makes one (trusted_private_chat, is_direct, m.room.encryption
        in the initial state, recorded in m.direct); returns the room id."""
        result = await self.call("create_encrypted_dm", {"invitee": invitee})
        return str(result["room_id"])

    async def create_room(
        self, *, encrypted: bool, name: str | None = None, invite: list[str] | None = None
    ) -> str:
        args = {"encrypted": encrypted, "name": name, "invite": invite or []}
        return str((await self.call("create_room", args))["room_id"])

    async def invite(self, room_id: str, user_id: str) -> None:
        await self.call("invite", {"room_id": room_id, "user_id": user_id})

    async def join(self, room_id: str, *, timeout: float = DEFAULT_TIMEOUT) -> str | None:
        """Waits for the invite to reach this client, joins, waits for the join to sync.

        Returns the inviter when the invite was a direct chat (then recorded in m.direct)."""
        result = await self.call("join", {"room_id": room_id}, timeout=timeout)
        direct_with = result["direct_with"]
        return None if direct_with is None else str(direct_with)

    async def leave(self, room_id: str) -> None:
        await self.call("leave", {"room_id": room_id})

    async def send_text(
        self,
        room_id: str,
        body: str,
        *,
        msgtype: str = "m.text",
        thread_id: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> str:
        """Sends once the room is joined here and, if the server says the room is encrypted,
        once the client's crypto has enabled encryption for it; returns the event id.

        With ``thread_id`` the message goes in the thread of that root, the SDK writing the
        thread relation (``rel_type`` ``m.thread``, ``is_falling_back``) itself."""
        args = {"room_id": room_id, "body": body, "msgtype": msgtype, "thread_id": thread_id}
        return str((await self.call("send_text", args, timeout=timeout))["event_id"])

    async def redact(
        self,
        room_id: str,
        event_id: str,
        *,
        reason: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> str:
        """Deletes ``event_id`` as Element's "Remove" does (the SDK's ``redactEvent``, with
        ``reason`` if given); returns the redaction's own event id."""
        args = {"room_id": room_id, "event_id": event_id, "reason": reason}
        return str((await self.call("redact", args, timeout=timeout))["event_id"])

    async def send_encrypted_attachment(
        self,
        room_id: str,
        data: bytes,
        *,
        body: str,
        msgtype: str = "m.file",
        filename: str | None = None,
        mimetype: str | None = None,
        tamper: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> tuple[str, dict[str, Any]]:
        """Sends ``data`` as an encrypted attachment, as Element does in an encrypted room:
        AES-256-CTR in the driver, the ciphertext uploaded with the SDK's ``uploadContent``,
        the key, IV and SHA-256 in the event's ``file``. Returns the event id and that
        ``file`` object. With ``tamper`` the uploaded ciphertext has one bit flipped after
        it was hashed (its ``hashes.sha256`` no longer matches). ``data`` travels as base64
        in one protocol line: keep it well under 700 KB."""
        args = {
            "room_id": room_id,
            "data_base64": base64.b64encode(data).decode("ascii"),
            "body": body,
            "msgtype": msgtype,
            "filename": filename,
            "mimetype": mimetype,
            "tamper": tamper,
        }
        result = await self.call("send_encrypted_attachment", args, timeout=timeout)
        return str(result["event_id"]), dict(result["file"])

    async def wait_for_message(
        self,
        room_id: str,
        *,
        sender: str | None = None,
        body_contains: str | None = None,
        exclude_event_ids: list[str] | None = None,
        in_reply_to: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Message:
        """The first message in the room (already seen or still to come) from ``sender`` whose
        decrypted body contains ``body_contains``. With ``body_contains=None`` any message
        matches, an undecryptable one too (``decryption_failure``). With ``in_reply_to``, only
        a message whose ``m.relates_to`` has that ``m.in_reply_to`` (a rich reply, or a
        thread message's reply fallback). Raises `JsClientTimeout`."""
        args = {
            "room_id": room_id,
            "sender": sender,
            "body_contains": body_contains,
            "exclude_event_ids": exclude_event_ids or [],
            "in_reply_to": in_reply_to,
        }
        return Message.from_json(await self.call("wait_for_message", args, timeout=timeout))

    async def messages(self, room_id: str) -> list[Message]:
        """Every message this client has seen in the room, in arrival order."""
        return [Message.from_json(m) for m in await self.call("messages", {"room_id": room_id})]

    async def room_encrypted(self, room_id: str) -> bool:
        """Whether the client's crypto has encryption enabled for the room."""
        return bool(await self.call("room_encrypted", {"room_id": room_id}))

    async def devices(self, user_id: str) -> list[Device]:
        """The user's devices as this client's crypto knows them (queried if not tracked yet)."""
        return [Device(**d) for d in await self.call("devices", {"user_id": user_id})]

    async def bootstrap_cross_signing(self, password: str) -> bool:
        """Sets up this person's cross-signing (keys made and uploaded, this device
        signed); whether the client then reports cross-signing as ready."""
        result = await self.call("bootstrap_cross_signing", {"password": password}, timeout=60.0)
        return bool(result["ready"])

    async def set_device_isolation(self, *, only_signed: bool) -> None:
        """Element's "exclude insecure devices" (MSC4153) when ``only_signed``: room keys
        only for devices their owner cross-signed, and only their events decrypt."""
        await self.call("set_device_isolation", {"only_signed": only_signed})

    async def request_device_verification(self, user_id: str, device_id: str) -> Verification:
        """An ``m.key.verification.request`` to that device (it must be known here: call
        `devices` first), as Element's "verify this device"."""
        args = {"user_id": user_id, "device_id": device_id}
        return Verification(**await self.call("request_device_verification", args))

    async def request_verification_dm(self, user_id: str, room_id: str) -> Verification:
        """An ``m.key.verification.request`` message in ``room_id`` (a direct chat with
        ``user_id``), as Element's "verify user"; the verification runs in that room."""
        args = {"user_id": user_id, "room_id": room_id}
        return Verification(**await self.call("request_verification_dm", args))

    async def wait_verification(
        self, verification: Verification, phases: list[str], *, timeout: float = DEFAULT_TIMEOUT
    ) -> Verification:
        """Once it is in one of ``phases`` (e.g. ``["ready", "cancelled"]``)."""
        args = {"id": verification.id, "phases": phases}
        return Verification(**await self.call("wait_verification", args, timeout=timeout))

    async def start_sas(
        self, verification: Verification, *, timeout: float = DEFAULT_TIMEOUT
    ) -> Verification:
        """Picks emoji verification (``m.sas.v1`` start); returns once the emoji and
        numbers show, or the verification ended."""
        args = {"id": verification.id}
        return Verification(**await self.call("start_sas", args, timeout=timeout))

    async def confirm_sas(
        self, verification: Verification, *, match: bool = True, timeout: float = DEFAULT_TIMEOUT
    ) -> Verification:
        """The person says the emoji match (or not: ``m.mismatched_sas``); returns once
        the verification ended (``verify_done`` or ``verify_error``)."""
        args = {"id": verification.id, "match": match}
        return Verification(**await self.call("confirm_sas", args, timeout=timeout))

    async def verification_status(self, user_id: str, device_id: str) -> VerificationStatus:
        args = {"user_id": user_id, "device_id": device_id}
        return VerificationStatus(**await self.call("verification_status", args))

    async def stop(self) -> None:
        """Stops the client; the process exits (`open_js_client` also does this)."""
        await self.call("stop", {}, timeout=10.0)

    # --- protocol --------------------------------------------------------------------------

    async def call(
        self, cmd: str, args: dict[str, Any], *, timeout: float = DEFAULT_TIMEOUT
    ) -> Any:
        """Sends one request and returns its result; raises `JsClientError` (or
        `JsClientTimeout`) for an error answer, a dead process or no answer in time.

        ``timeout`` goes to the driver as the command's deadline; Python waits a little longer
        (`ANSWER_MARGIN`) so that the driver's own, more precise, timeout error wins."""
        if self._closed is not None:
            raise self._error("closed", self._closed)
        request_id = next(self._ids)
        pending = _Pending()
        self._waiting[request_id] = pending
        args = {**args, "timeout_ms": int(timeout * 1000)}
        line = json.dumps({"id": request_id, "cmd": cmd, "args": args}).encode() + b"\n"
        try:
            with trio.move_on_after(timeout + ANSWER_MARGIN):
                async with self._send_lock:
                    assert self._process.stdin is not None
                    await self._process.stdin.send_all(line)
                await pending.done.wait()
            if pending.response is None:
                if self._closed is not None:
                    raise self._error("closed", self._closed)
                raise self._error("timeout", f"{cmd}: no answer within {timeout + ANSWER_MARGIN} s")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise self._error("closed", f"{cmd}: cannot write to the process ({exc!r})") from None
        finally:
            del self._waiting[request_id]
        response = pending.response
        if response.get("ok") is True:
            return response.get("result")
        error = response.get("error") or {}
        raise self._error(str(error.get("type")), f"{cmd}: {error.get('message')}")

    def _error(self, kind: str, message: str) -> JsClientError:
        cls = JsClientTimeout if kind == "timeout" else JsClientError
        return cls(self.name, kind, message, self.stderr_tail[-ERROR_TAIL:])

    async def _read_stdout(self) -> None:
        assert self._process.stdout is not None
        buffer = bytearray()
        try:
            while True:
                chunk = await self._process.stdout.receive_some(65536)
                if not chunk:
                    break
                buffer += chunk
                while (end := buffer.find(b"\n")) >= 0:
                    line, buffer = bytes(buffer[:end]), buffer[end + 1 :]
                    self._dispatch(line)
                if len(buffer) > MAX_LINE:
                    self._close(f"a line on stdout longer than {MAX_LINE} bytes")
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        code = await self._process.wait()
        self._close(f"the Node process exited (code {code})")

    def _dispatch(self, line: bytes) -> None:
        try:
            response = json.loads(line)
        except ValueError:
            self._stderr += b"[not a protocol line on stdout] " + line[:200] + b"\n"
            return
        if not isinstance(response, dict):
            return
        if response.get("id") is None:
            if isinstance(response.get("result"), dict) and response["result"].get("ready"):
                self.versions = response["result"]
                self.ready.set()
            else:  # an error the driver could not tie to a request (e.g. a garbled line)
                self._stderr += b"[uncorrelated answer] " + line[:500] + b"\n"
            return
        pending = self._waiting.get(response["id"]) if isinstance(response["id"], int) else None
        if pending is not None:
            pending.response = response
            pending.done.set()

    def _close(self, reason: str) -> None:
        self._closed = reason
        for pending in self._waiting.values():
            pending.done.set()
        self.ready.set()

    async def _read_stderr(self) -> None:
        assert self._process.stderr is not None
        try:
            while chunk := await self._process.stderr.receive_some(65536):
                self._stderr += chunk
                del self._stderr[:-STDERR_TAIL]
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


class _Pending:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.response: dict[str, Any] | None = None


@asynccontextmanager
async def open_js_client(name: str) -> AsyncIterator[JsClient]:
    """Starts one client process; it is stopped, then killed by PID, when the block ends.

    An exception from the block comes out as itself (not inside an exception group), with the
    process's stderr tail printed first (pytest shows it with the failure).
    """
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not installed (the E2EE tests need Node >= 20)")
    if not (E2EE_CLIENT_DIR / "node_modules" / "matrix-js-sdk").is_dir():
        raise RuntimeError(f"run `npm ci` in {E2EE_CLIENT_DIR} first (`nox -s tests` does it)")
    process = await trio.lowlevel.open_process(
        [node, str(DRIVER)],
        cwd=E2EE_CLIENT_DIR,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    client = JsClient(name, process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._read_stdout)
            nursery.start_soon(client._read_stderr)
            try:
                with trio.fail_after(START_TIMEOUT):
                    await client.ready.wait()
                if client._closed is not None:
                    raise client._error("closed", client._closed)
                yield client
            except BaseException as exc:
                if not isinstance(exc, trio.Cancelled):
                    print(f"--- js client {name}: node stderr (tail) ---", file=sys.stderr)
                    print(client.stderr_tail, file=sys.stderr)
                raise
            finally:
                with trio.CancelScope(shield=True, deadline=trio.current_time() + 5):
                    await _stop(process)
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        process.kill()


async def _stop(process: trio.Process) -> None:
    """End of stdin (the driver stops its client and exits), then SIGKILL by PID after 3 s."""
    assert process.stdin is not None
    with trio.move_on_after(3):
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await process.stdin.aclose()
        await process.wait()
    process.kill()
    await process.wait()
