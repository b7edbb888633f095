"""End-to-end encryption: device keys (upload, query, claim, changes) and the
to-device messages that carry room keys.

Keys go out and come back as plain dicts: signing and verifying them is the crypto
layer's work, over their exact JSON (see `matrix_api.models.keys`).

Which of these a retry may repeat (`Request.idempotent`, see `matrix_api.retry`):

- /keys/upload: yes. Sent again with the same body, it publishes the same keys:
  the server keeps a one-time key id it already holds when the key is the same (it
  refuses only a *different* key under a known id), device keys are replaced by
  themselves, and the fallback key by itself.
- /keys/query and /keys/changes: yes, they only read.
- /keys/claim: yes, although it consumes keys. A retry after a lost answer claims
  a second key per device and the first ones are never used; the spec expects
  that (a device "will never know" that some of its one-time keys went unused, as
  when the claimant crashed), the device keeps topping its keys up, and when it runs
  out the server hands out its fallback key instead. Not retrying would not save the
  keys either: the caller could only claim again later, for the same cost.
- /sendToDevice: yes (a PUT): its transaction id makes the server deliver it once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..http import DEFAULT_TIMEOUT, LARGE_ANSWER_LIMITS, HTTPCore, Request, ignore_body
from ..models.identifiers import SyncToken
from ..models.keys import (
    DeviceLists,
    KeysClaimResponse,
    KeysQueryResponse,
    decode_key_changes,
    decode_keys_claim,
    decode_keys_query,
    decode_keys_upload,
)
from ..paths import CLIENT_V3, client_path
from .sync import LONG_POLL_MARGIN_S

# What the spec recommends for the server's wait on remote homeservers.
DEFAULT_KEYS_TIMEOUT_MS = 10_000


def _read_timeout(timeout_ms: int) -> float | None:
    """Time to read an answer the server may hold ``timeout_ms`` for remote servers;
    None (the client's default) when that is long enough."""
    needed = timeout_ms / 1000 + LONG_POLL_MARGIN_S
    default = DEFAULT_TIMEOUT.read
    return needed if default is None or needed > default else None


class KeysEndpoints(HTTPCore):
    async def upload_keys(
        self,
        *,
        device_keys: Mapping[str, Any] | None = None,
        one_time_keys: Mapping[str, Any] | None = None,
        fallback_keys: Mapping[str, Any] | None = None,
    ) -> dict[str, int]:
        """``POST /keys/upload``: publish this device's keys, signed by the caller.

        Each part may be left out (None). Returns the server's count of unclaimed
        one-time keys by algorithm; an algorithm not in it has none.
        """
        body: dict[str, Any] = {}
        if device_keys is not None:
            body["device_keys"] = device_keys
        if one_time_keys is not None:
            body["one_time_keys"] = one_time_keys
        if fallback_keys is not None:
            body["fallback_keys"] = fallback_keys
        # Idempotent: see the module docstring.
        request = Request("POST", f"{CLIENT_V3}/keys/upload", body=body, idempotent=True)
        return await self.send(request, decode_keys_upload)

    async def query_keys(
        self,
        users: Mapping[str, Sequence[str]],
        *,
        timeout_ms: int | None = DEFAULT_KEYS_TIMEOUT_MS,
    ) -> KeysQueryResponse:
        """``POST /keys/query``: the devices and identity keys of ``users``.

        ``users`` maps a user id to the device ids wanted, or to ``[]`` for all of
        that user's devices. ``timeout_ms`` bounds the server's wait for other
        homeservers (None: the server's default). The key objects come back raw and
        unverified.
        """
        if any(isinstance(ids, str) for ids in users.values()):
            raise TypeError("users maps a user id to a list of device ids, not to one string")
        body: dict[str, Any] = {"device_keys": {user: list(ids) for user, ids in users.items()}}
        if timeout_ms is not None:
            body["timeout"] = timeout_ms
        request = Request(
            "POST",
            f"{CLIENT_V3}/keys/query",
            body=body,
            idempotent=True,
            read_timeout=_read_timeout(timeout_ms or DEFAULT_KEYS_TIMEOUT_MS),
            # Grows with the members of every room asked about, and their devices.
            limits=LARGE_ANSWER_LIMITS,
        )
        return await self.send(request, decode_keys_query)

    async def claim_keys(
        self,
        one_time_keys: Mapping[str, Mapping[str, str]],
        *,
        timeout_ms: int | None = DEFAULT_KEYS_TIMEOUT_MS,
    ) -> KeysClaimResponse:
        """``POST /keys/claim``: one key per device, ``{user: {device: algorithm}}``
        (``signed_curve25519`` for Olm).

        Each key returned is the server's to give once (or the device's fallback
        key); a device without one is absent from the answer. Retried like the
        others: why that is safe is in the module docstring.
        """
        body: dict[str, Any] = {
            "one_time_keys": {user: dict(devices) for user, devices in one_time_keys.items()}
        }
        if timeout_ms is not None:
            body["timeout"] = timeout_ms
        request = Request(
            "POST",
            f"{CLIENT_V3}/keys/claim",
            body=body,
            idempotent=True,
            read_timeout=_read_timeout(timeout_ms or DEFAULT_KEYS_TIMEOUT_MS),
        )
        return await self.send(request, decode_keys_claim)

    async def keys_changes(self, from_token: SyncToken, to_token: SyncToken) -> DeviceLists:
        """``GET /keys/changes``: who changed devices between two /sync tokens
        (``changed``), and who no longer shares an encrypted room (``left``)."""
        query = {"from": from_token, "to": to_token}
        return await self.send(
            Request("GET", f"{CLIENT_V3}/keys/changes", query=query), decode_key_changes
        )

    async def send_to_device(
        self,
        event_type: str,
        messages: Mapping[str, Mapping[str, Mapping[str, Any]]],
        txn_id: str,
    ) -> None:
        """``PUT /sendToDevice/{eventType}/{txnId}``: ``messages`` maps a user id to
        a device id (or ``*``, all of them) to the content sent there.

        As with `send_event`, the caller builds ``txn_id`` once and keeps it for
        every attempt at the same messages (retries here reuse it, and so must a
        caller that tries again later): the server delivers a transaction once per
        device that sent it. A new batch needs a new id. Synapse remembers to-device
        transaction ids in memory only (about half an hour, and not across its
        restarts), so a receiver must still shrug off the rare duplicate.
        """
        path = client_path(CLIENT_V3, "sendToDevice", event_type, txn_id)
        await self.send(Request("PUT", path, body={"messages": messages}), ignore_body)
