"""The webhook receiver example of README.md ("Webhook signatures"), run as it is
written there, against real requests of the webhook backend: it accepts them, and
refuses each way a request can be altered, replayed late or forged."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from bot.backends.webhook import WebhookBackend, WebhookSettings, verify_signature
from bot.chats import Chat
from bot.messages import IncomingMessage
from matrix_api.models import EventID, RoomID
from mini_http import HTTPRequest, Responder, serve_http

README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = "<!-- The test tests/backends/test_webhook_receiver_example.py runs this block"
SECRET = "a-shared-secret-of-some-length"
CHAT = Chat("c_hook", RoomID("!room:example.org"), "@alice:example.org", "Hook", 0)
MESSAGE = IncomingMessage(EventID("$q1"), "@alice:example.org", "Is this fresh? ✓", 1)

Verify = Callable[..., bool]


def readme_verify() -> Verify:
    """The ``verify`` of the README's example, compiled from the README's own text."""
    text = README.read_text(encoding="utf-8")
    at = text.index(MARKER)
    block = re.search(r"```python\n(.*?)\n```", text[at:], re.DOTALL)
    assert block is not None, "the README's receiver example is gone"
    namespace: dict[str, Any] = {}
    exec(compile(block.group(1), f"{README}:receiver-example", "exec"), namespace)  # noqa: S102
    assert namespace["TOLERANCE_S"] == 300
    verify: Verify = namespace["verify"]
    return verify


@pytest.fixture
async def delivered() -> AsyncIterator[list[HTTPRequest]]:
    """Requests the webhook backend really sent, as a receiver got them off the wire."""
    received: list[HTTPRequest] = []

    async def receive(request: HTTPRequest, out: Responder) -> None:
        received.append(request)
        await out.send(200, json.dumps({"reply": "ok"}).encode(), content_type="application/json")

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_http, receive)
            settings = WebhookSettings(url=f"http://127.0.0.1:{port}/hook", secret=SECRET)
            async with WebhookBackend(settings) as hook:
                assert await hook.reply(CHAT, MESSAGE) == "ok"
            yield received
            nursery.cancel_scope.cancel()


async def test_the_readme_receiver_accepts_a_real_request_and_refuses_every_alteration(
    delivered: list[HTTPRequest],
) -> None:
    verify = readme_verify()
    (request,) = delivered
    # As a web framework hands them over: case-insensitive headers, the raw body.
    headers = httpx.Headers(request.headers)
    body = request.body
    sent_at = int(headers["X-Surfaces-Timestamp"])
    secret = SECRET.encode()

    def also(**changes: str | None) -> httpx.Headers:
        changed = httpx.Headers(headers)
        for name, value in changes.items():
            header = f"X-Surfaces-{name.capitalize()}"
            if value is None:
                del changed[header]
            else:
                changed[header] = value
        return changed

    def both(headers: httpx.Headers, body: bytes, now: float | None = None) -> bool:
        """The README's answer, checked against the bot's own `verify_signature`."""
        answer = verify(secret, headers, body, now)
        assert answer == verify_signature(
            SECRET,
            body,
            headers.get("X-Surfaces-Signature"),
            headers.get("X-Surfaces-Timestamp"),
            now=now,
        )
        return answer

    assert both(headers, body)  # now, on the real clock
    assert both(headers, body, now=sent_at + 299)
    assert both(headers, body, now=sent_at - 299)  # the receiver's clock a little behind
    # Replayed after the window, or dated ahead of it.
    assert not both(headers, body, now=sent_at + 301)
    assert not both(headers, body, now=sent_at - 301)
    # A timestamp moved forward to pass the window: the signature covers it.
    assert not both(also(timestamp=str(sent_at + 600)), body, now=sent_at + 600)
    # One byte of the body changed, or the body re-encoded by a parser.
    assert not both(headers, body.replace(b"fresh", b"Fresh"))
    assert not both(headers, json.dumps(json.loads(body)).encode())
    # Missing or malformed headers.
    assert not both(also(signature=None), body)
    assert not both(also(timestamp=None), body)
    for hostile in ("", " " + str(sent_at), f"+{sent_at}", f"{sent_at}.0", "1e9", "٣" * 10):
        assert not both(also(timestamp=hostile), body), hostile
    assert not both(also(timestamp="9" * 4000), body)  # no huge integer conversion
    # The old form, the body alone, or another secret.
    body_only = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    assert not both(also(signature=body_only), body)
    forged = hmac.new(b"another-secret-entirely", f"{sent_at}.".encode() + body, hashlib.sha256)
    assert not both(also(signature="sha256=" + forged.hexdigest()), body)
