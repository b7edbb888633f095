"""A user's device for the ordering tests: `matrix_crypto`'s OlmMachine, talking to the
`FakeHomeserver` directly (in the test's own process, no HTTP).

    alice = Peer(hs, ALICE, "ALICEDEV")          # its keys are published on the fake
    key = alice.room_key_for_bot(ROOM)            # to-device events: the test places them
    event = alice.message(ROOM, "$m", "hi", ts=hs.now_ms())
    hs.queue_sync({ROOM: [event]}, to_device=key)
    ...
    plain = alice.read(hs.sent_in(ROOM)[0])       # the bot's reply, decrypted as a client would

What the peer gets from the fake is what a client gets from a homeserver: the bot's uploaded
device keys through ``keys/query``, one of its one-time keys through ``keys/claim`` (so the
first to-device message is a pre-key message the bot must take exactly as the spec says), and
what the bot sent it through ``sendToDevice``. `read` runs the peer's own checks (the sender's
device keys, replay protection: a Megolm index seen under another event id is refused), so a
reply the bot encrypted wrongly, or with a reused index, fails there.

`forwarded_room_key` and `olm_to_bot` build what an honest machine never sends (a forwarded key,
any Olm payload), for the hostile tests.
"""

from __future__ import annotations

import json
from typing import Any

import vodozemac

from fake_homeserver import BOT, DEVICE, FakeHomeserver, Sent
from matrix_crypto import olm
from matrix_crypto.machine import (
    DecryptedEvent,
    KeysClaimRequest,
    KeysQueryRequest,
    KeysUploadRequest,
    OlmMachine,
    OutgoingRequest,
    ToDeviceRequest,
)

__all__ = ["MEGOLM", "Peer", "encrypted_event"]

MEGOLM = "m.megolm.v1.aes-sha2"
_PICKLE_KEY = bytes(range(32))


class Peer:
    """One device of ``user_id``; its keys are on ``hs`` once constructed."""

    def __init__(self, hs: FakeHomeserver, user_id: str, device_id: str) -> None:
        self.hs = hs
        self.machine = OlmMachine.create(user_id, device_id, _PICKLE_KEY)
        self.refused: list[str] = []
        """Why the peer refused to-device events from the bot (never expected)."""
        self.settle()

    @property
    def user_id(self) -> str:
        return self.machine.user_id

    @property
    def device_id(self) -> str:
        return self.machine.device_id

    # --- requests, answered by the fake ------------------------------------------------------

    def _answer(self, request: OutgoingRequest) -> dict[str, Any]:
        hs, me = self.hs, self.user_id
        body = json.loads(json.dumps(request.body))  # what the wire would carry
        if isinstance(request, KeysUploadRequest):
            count = hs.upload_keys(me, self.device_id, body)
            return {"one_time_key_counts": {"signed_curve25519": count}}
        if isinstance(request, KeysQueryRequest):
            return hs.query_keys(body["device_keys"])
        if isinstance(request, KeysClaimRequest):
            return hs.claim_keys(body["one_time_keys"])
        if isinstance(request, ToDeviceRequest):
            hs.send_to_device(me, request.event_type, request.txn_id, body["messages"])
            return {}
        raise TypeError(f"unknown request {type(request).__name__}")

    def _run(self, requests: list[OutgoingRequest]) -> None:
        for request in requests:
            self.machine.mark_request_sent(request.request_id, self._answer(request))

    def settle(self) -> None:
        """Send what the machine asks for (its keys, queries) until it asks for nothing."""
        for _ in range(5):
            requests = self.machine.outgoing_requests()
            if not requests:
                return
            self._run(requests)
        raise AssertionError("the peer's requests do not settle")

    # --- sending ------------------------------------------------------------------------------

    def room_key_for_bot(self, room_id: str) -> list[dict[str, Any]]:
        """Share this device's room key for ``room_id`` with the bot (keys query, claim of
        one of the bot's one-time keys, Olm); the to-device events the bot's device gets,
        for the test to put in a batch. Empty when the bot already has the key."""
        for _ in range(5):
            requests = self.machine.share_room_key(room_id, [self.user_id, BOT], {})
            if not requests:
                return self.hs.take_to_device(BOT, DEVICE)
            self._run(requests)
        raise AssertionError("sharing the room key does not converge")

    def message(
        self,
        room_id: str,
        event_id: str,
        body: str,
        *,
        ts: int,
        sender: str | None = None,
        content: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """An ``m.room.encrypted`` timeline event with an ``m.text`` ``body`` (or
        ``content``) in this device's outbound session for ``room_id`` (share it first).
        ``sender`` may claim another user than the device's."""
        plain = content if content is not None else {"msgtype": "m.text", "body": body}
        encrypted = self.machine.encrypt_room_event(room_id, "m.room.message", plain)
        return encrypted_event(event_id, sender or self.user_id, encrypted, ts=ts)

    def olm_to_bot(self, event_type: str, content: dict[str, Any]) -> dict[str, Any]:
        """Any payload through this device's Olm session with the bot (there must be
        one: share a room key first), as the to-device event the bot gets."""
        bot = self._bot_device()
        encrypted = olm.encrypt_for_device(
            self.machine._identity,  # a test peer sends what no machine would
            self.machine._sessions,
            user_id=BOT,
            curve25519=bot.curve25519,
            ed25519=bot.ed25519,
            event_type=event_type,
            content=content,
        )
        assert encrypted is not None, "no Olm session with the bot yet"
        return {"type": "m.room.encrypted", "sender": self.user_id, "content": encrypted}

    def forwarded_room_key(self, room_id: str) -> tuple[dict[str, Any], vodozemac.GroupSession]:
        """An ``m.forwarded_room_key`` to the bot for a new Megolm session of ``room_id``
        (as if another device had passed on this device's key), and that session."""
        group = vodozemac.GroupSession()
        exported = vodozemac.InboundGroupSession(group.session_key).export_at(0)
        assert exported is not None
        content = {
            "algorithm": MEGOLM,
            "room_id": room_id,
            "sender_key": self.machine.curve25519,
            "session_id": group.session_id,
            "session_key": exported.to_base64(),
            "sender_claimed_ed25519_key": self.machine.ed25519,
            "forwarding_curve25519_key_chain": [],
        }
        return self.olm_to_bot("m.forwarded_room_key", content), group

    def group_message(
        self,
        group: vodozemac.GroupSession,
        room_id: str,
        event_id: str,
        body: str,
        *,
        ts: int,
    ) -> dict[str, Any]:
        """A timeline event encrypted with ``group`` (a session the bot got some other way)."""
        payload = {
            "type": "m.room.message",
            "content": {"msgtype": "m.text", "body": body},
            "room_id": room_id,
        }
        ciphertext = group.encrypt(json.dumps(payload).encode()).to_base64()
        content = {
            "algorithm": MEGOLM,
            "sender_key": self.machine.curve25519,
            "ciphertext": ciphertext,
            "session_id": group.session_id,
            "device_id": self.device_id,
        }
        return encrypted_event(event_id, self.user_id, content, ts=ts)

    # --- reading what the bot sent -------------------------------------------------------------

    def read(self, sent: Sent) -> DecryptedEvent:
        """The bot's event decrypted as this device's client would: the to-device events
        the bot sent it first, the bot's device keys from the server, then the Megolm
        checks (the sender's device, the replay protection). Raises what
        `OlmMachine.decrypt_room_event` raises."""
        assert sent.event_type == "m.room.encrypted", (
            f"the bot sent {sent.event_type} in the clear into {sent.room_id}"
        )
        events = self.hs.take_to_device(self.user_id, self.device_id)
        for result in self.machine.receive_sync(to_device=events):
            if result.refused is not None:
                self.refused.append(result.refused)
        self.machine.update_tracked_users([BOT])
        self.settle()
        event = {
            "type": sent.event_type,
            "event_id": sent.event_id,
            "sender": BOT,
            "origin_server_ts": 0,
            "room_id": sent.room_id,
            "content": json.loads(json.dumps(sent.content)),
        }
        return self.machine.decrypt_room_event(sent.room_id, event)

    def _bot_device(self) -> Any:
        self.machine.update_tracked_users([BOT])
        self.settle()
        (device,) = [d for d in self.machine.devices(BOT) if d.device_id == DEVICE]
        return device


def encrypted_event(
    event_id: str, sender: str, content: dict[str, Any], *, ts: int
) -> dict[str, Any]:
    """An ``m.room.encrypted`` event as /sync delivers it."""
    return {
        "type": "m.room.encrypted",
        "event_id": event_id,
        "sender": sender,
        "origin_server_ts": ts,
        "content": content,
        "unsigned": {"age": 1000},
    }
