"""bot.e2ee.cross_signing: the account's keys stored before they are published, the device
signed once, and nothing the server answers stops the bot."""

from __future__ import annotations

import stat
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, cast

import pytest
from structlog.testing import capture_logs

from bot.e2ee.cross_signing import cross_sign_device
from bot.e2ee.crypto import BotCrypto
from bot.e2ee.secret_storage import recovery_key_file_for
from bot.store import Store
from matrix_api import MatrixClient, NotFound
from matrix_api.models import KeysQueryResponse, SignaturesUploadResponse, UserID
from matrix_api.uia import AuthRequired
from matrix_crypto.cross_signing import SecretStorageKey, device_signed_by_self_signing_key

BOT = "@bot:example.org"
DEVICE = "BOTDEVICE"
KEY = bytes(range(32))


class _Server:
    """Keys, cross-signing keys and signatures, as far as the bot's start needs them."""

    def __init__(self) -> None:
        self.user_id = BOT
        self.device_keys: dict[str, Any] = {}
        self.cross_signing: dict[str, Any] = {}
        self.signed: list[Mapping[str, Any]] = []
        self.calls: list[str] = []
        self.store: Store | None = None
        self.rows_at_upload: list[str] = []
        self.needs_password = False
        self.account_data: dict[str, Any] = {}

    async def get_account_data(self, event_type: str) -> dict[str, Any]:
        self.calls.append("get_account_data")
        if event_type not in self.account_data:
            raise NotFound(404, "M_NOT_FOUND", "no such account data")
        return self.account_data[event_type]

    async def put_account_data(self, event_type: str, content: Mapping[str, Any]) -> None:
        self.calls.append("put_account_data")
        self.account_data[event_type] = dict(content)

    def server_time_ms(self) -> int | None:
        return 1_800_000_000_000

    async def query_keys(self, users: Mapping[str, Any], **_: Any) -> KeysQueryResponse:
        self.calls.append("query_keys")
        user = UserID(BOT)
        return KeysQueryResponse(
            device_keys={user: {DEVICE: self.device_keys}} if self.device_keys else {},
            master_keys={user: self.cross_signing["master_key"]} if self.cross_signing else {},
            self_signing_keys=(
                {user: self.cross_signing["self_signing_key"]} if self.cross_signing else {}
            ),
        )

    async def upload_keys(self, **parts: Any) -> dict[str, int]:
        if parts.get("device_keys") is not None:
            self.device_keys = parts["device_keys"]
        return {"signed_curve25519": 50}

    async def upload_cross_signing_keys(self, *, password: str | None, **keys: Any) -> None:
        self.calls.append("upload_cross_signing_keys")
        assert self.store is not None
        self.rows_at_upload = [key for kind, key, _ in await self.store.crypto_rows()]
        if self.needs_password and password is None:
            raise AuthRequired("the server asks for auth")
        self.cross_signing = keys

    async def upload_signatures(self, signed: Mapping[str, Any]) -> SignaturesUploadResponse:
        self.calls.append("upload_signatures")
        self.signed.append(signed)
        return SignaturesUploadResponse()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(tmp_path / "bot.sqlite3", BOT)
    yield opened
    await opened.aclose()


async def _cross_sign(crypto: BotCrypto, store: Store, password: str | None = None) -> None:
    await cross_sign_device(crypto, password=password, pickle_key=KEY, store_path=store.path)


async def _crypto(server: _Server, store: Store) -> BotCrypto:
    server.store = store
    crypto = await BotCrypto.open(
        cast("MatrixClient", server), store, device_id=DEVICE, pickle_key=KEY
    )
    await crypto.send_outgoing()
    return crypto


async def test_first_start_stores_the_keys_before_publishing_them_and_signs_the_device(
    store: Store,
) -> None:
    server = _Server()
    crypto = await _crypto(server, store)
    with capture_logs() as logs:
        await _cross_sign(crypto, store)

    assert "cross_signing" in server.rows_at_upload  # kept before it left
    [signed] = server.signed
    device = signed[BOT][DEVICE]
    assert device_signed_by_self_signing_key(device, server.cross_signing["self_signing_key"])
    assert [e["event"] for e in logs] == [
        "cross_signing_created",
        "cross_signing_keys_in_secret_storage",
        "device_cross_signed",
    ]
    # The private keys are in secret storage, under a recovery key in a 0600 file.
    recovery_file = recovery_key_file_for(store.path)
    assert stat.S_IMODE(recovery_file.stat().st_mode) == 0o600
    for name in ("master", "self_signing", "user_signing"):
        assert "encrypted" in server.account_data[f"m.cross_signing.{name}"]
    # No private key in any log line.
    stored = dict((key, value) for _, key, value in await store.crypto_rows())
    assert all(stored["cross_signing"] not in str(e) for e in logs)

    # The next start: no request at all.
    server.calls.clear()
    again = await BotCrypto.open(
        cast("MatrixClient", server), store, device_id=DEVICE, pickle_key=KEY
    )
    await _cross_sign(again, store)
    assert server.calls == []


async def test_a_server_wanting_the_password_is_told_to_the_operator_not_fatal(
    store: Store,
) -> None:
    server = _Server()
    server.needs_password = True
    crypto = await _crypto(server, store)
    with capture_logs() as logs:
        await _cross_sign(crypto, store)
    [warning] = [e for e in logs if e["event"] == "cross_signing_failed"]
    assert warning["fix"] == "configure MATRIX_PASSWORD"
    assert server.signed == []

    # With the password, the next start publishes the keys it stored the first time.
    stored_before = dict((k, v) for _, k, v in await store.crypto_rows())["cross_signing"]
    await _cross_sign(crypto, store, "secret")
    assert server.signed
    assert dict((k, v) for _, k, v in await store.crypto_rows())["cross_signing"] == stored_before


async def test_keys_the_store_lost_are_not_replaced_and_the_device_stays_unsigned(
    store: Store,
) -> None:
    server = _Server()
    server.cross_signing = {"master_key": {"usage": ["master"]}, "self_signing_key": {}}
    crypto = await _crypto(server, store)
    with capture_logs() as logs:
        await _cross_sign(crypto, store, "secret")
    [unavailable] = logs
    assert unavailable["event"] == "cross_signing_unavailable"
    assert unavailable["fix"] == "configure MATRIX_RECOVERY_KEY"
    assert "upload_cross_signing_keys" not in server.calls
    assert server.signed == []


def _lose_the_store(directory: Path) -> None:
    """Everything beside the store goes (its pickle key too) but the recovery key file,
    which the operator keeps."""
    for path in directory.iterdir():
        if not path.name.endswith(".recovery-key"):
            path.unlink()


async def test_a_lost_store_restores_the_keys_from_secret_storage_and_signs_its_new_device(
    tmp_path: Path,
) -> None:
    server = _Server()
    first = await Store.open(tmp_path / "bot.sqlite3", BOT)
    try:
        await _cross_sign(await _crypto(server, first), first)
    finally:
        await first.aclose()
    published = server.cross_signing
    _lose_the_store(tmp_path)

    server.device_keys = {}  # the new device (same id here) publishes new keys
    server.signed.clear()
    server.calls.clear()
    again = await Store.open(tmp_path / "bot.sqlite3", BOT)
    try:
        crypto = await _crypto(server, again)
        with capture_logs() as logs:
            await _cross_sign(crypto, again)
    finally:
        await again.aclose()
    assert [e["event"] for e in logs] == ["cross_signing_restored", "device_cross_signed"]
    assert "upload_cross_signing_keys" not in server.calls  # the same keys, not new ones
    assert server.cross_signing is published
    [signed] = server.signed
    assert device_signed_by_self_signing_key(signed[BOT][DEVICE], published["self_signing_key"])


async def test_a_wrong_recovery_key_is_a_clear_warning_and_signs_nothing(tmp_path: Path) -> None:
    server = _Server()
    first = await Store.open(tmp_path / "bot.sqlite3", BOT)
    try:
        await _cross_sign(await _crypto(server, first), first)
    finally:
        await first.aclose()
    _lose_the_store(tmp_path)
    other = SecretStorageKey.create().recovery_key
    server.device_keys, server.signed = {}, []
    again = await Store.open(tmp_path / "bot.sqlite3", BOT)
    try:
        crypto = await _crypto(server, again)
        with capture_logs() as logs:
            await cross_sign_device(
                crypto, password=None, pickle_key=KEY, recovery_key=other, store_path=again.path
            )
    finally:
        await again.aclose()
    [failed] = logs
    assert failed["event"] == "cross_signing_failed"
    assert "WrongRecoveryKey" in failed["reason"]
    assert other not in str(failed)
    assert server.signed == []
