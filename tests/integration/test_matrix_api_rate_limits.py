"""`MatrixClient` against real 429s: a Synapse with its default rate limits.

Synapse's default ``rc_message`` is a burst of 10 actions, then one every 5 s
(0.2 per second); ``createRoom`` counts as one of them. So a burst of 13 sends right
after creating a room has its last 4 rate-limited, each for about 5 s: about 20 s in
all, which is why the burst is not longer.
"""

from __future__ import annotations

import uuid

import pytest
from structlog.testing import capture_logs

from matrix_api import LimitExceeded, RetryPolicy, new_txn_id
from matrix_api.testing.synapse import RegisteredUser, SynapseServer
from matrix_helpers import RecordingTransport, bodies, client_for, text

BURST = 13


def strict_user(server: SynapseServer) -> RegisteredUser:
    # A fresh user each time: rate limits are per user, so tests do not share a bucket.
    return server.register_user(f"chatty-{uuid.uuid4().hex[:12]}")


async def test_default_policy_waits_out_real_429s(strict_synapse: SynapseServer) -> None:
    user = strict_user(strict_synapse)
    transport = RecordingTransport()
    sent = [f"burst {index:02}" for index in range(BURST)]

    with capture_logs() as logs:
        async with client_for(strict_synapse, user, transport=transport) as client:
            room_id = await client.create_room()
            event_ids = [
                await client.send_event(room_id, "m.room.message", text(body), new_txn_id())
                for body in sent
            ]
            page = await client.messages(room_id, direction="b", limit=50)

    # Every send went through, once each, in order.
    assert len(set(event_ids)) == BURST
    assert bodies(page.chunk[::-1]) == sent

    sends = [e for e in transport.exchanges if "/send/" in e.path]
    limited = [i for i, e in enumerate(sends) if e.status == 429]
    assert limited, "Synapse never answered 429: are its default rate limits on?"
    assert all(e.status in (200, 429) for e in sends)
    assert len(sends) == BURST + len(limited)

    for index in limited:
        answer, retry = sends[index], sends[index + 1]
        assert answer.body is not None
        assert answer.body["errcode"] == "M_LIMIT_EXCEEDED"
        assert answer.retry_after_ms is not None
        assert answer.retry_after_ms > 0
        assert answer.retry_after_header is not None
        # The retry is the same request (same transaction id) ...
        assert retry.path == answer.path
        # ... sent no sooner than the server asked, by either of its two measures.
        waited = retry.sent_at - answer.answered_at
        assert waited >= answer.retry_after_ms / 1000
        assert waited >= int(answer.retry_after_header)
        assert waited < int(answer.retry_after_header) + 2.0  # and not much later
        assert retry.status == 200

    retries = [entry for entry in logs if entry["event"] == "matrix_request_retry"]
    assert len(retries) == len(limited)
    for entry, index in zip(retries, limited, strict=True):
        assert "M_LIMIT_EXCEEDED" in entry["error"]
        assert entry["method"] == "PUT"
        assert entry["attempt"] == 1
        assert entry["log_level"] == "warning"
        assert entry["delay_s"] == pytest.approx(float(sends[index].retry_after_header or 0))
        assert user.access_token not in repr(entry)


async def test_single_attempt_surfaces_limit_exceeded(strict_synapse: SynapseServer) -> None:
    user = strict_user(strict_synapse)
    transport = RecordingTransport()

    with capture_logs() as logs:
        async with client_for(
            strict_synapse, user, transport=transport, retry_policy=RetryPolicy(max_attempts=1)
        ) as client:
            room_id = await client.create_room()

            async def burst() -> None:
                for index in range(BURST):
                    await client.send_event(
                        room_id, "m.room.message", text(f"m{index}"), new_txn_id()
                    )

            with pytest.raises(LimitExceeded) as caught:
                await burst()

    error = caught.value
    assert (error.status, error.code) == (429, "M_LIMIT_EXCEEDED")
    assert error.retry_after is not None
    assert 0 < error.retry_after <= 6
    assert error.body["retry_after_ms"] > 0
    # No retries: every request was sent once, and the last one is the 429.
    assert [e.status for e in transport.exchanges][-1] == 429
    assert sum(e.status == 429 for e in transport.exchanges) == 1
    assert not [entry for entry in logs if entry["event"] == "matrix_request_retry"]
