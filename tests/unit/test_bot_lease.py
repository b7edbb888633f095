"""The active/standby lease (issue 22): the watch, the store's side of it against a
real PostgreSQL, the transaction ids a new active instance re-sends under, and the
settings. The whole failover against Synapse: tests/integration/test_failover.py."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import trio
import trio.testing

from bot.config import ConfigError, load_settings
from bot.lease import Deposed, LeasedStore, watch_lease
from bot.messages import reply_txn_id
from bot.store import StoreError, StoreUnavailable
from bot.store_postgres import PostgresStore, StoreDeposed
from matrix_api.models import SyncToken
from matrix_crypto.cross_signing import SecretStorageKey
from pg_server import PostgresServer, missing_binaries

BOT = "@bot:example.org"


# --- the watch, with a store that does what each case needs ---------------------------


class FakeLeasedStore:
    """``check_lease`` answers from ``answer``: "ok", "down" (StoreUnavailable),
    "deposed" (StoreDeposed, and deposed from then on) or "hang" (a call stuck on a
    cut connection)."""

    def __init__(self) -> None:
        self.answer = "ok"
        self.checks = 0
        self._deposed = False
        self._changed = trio.lowlevel.ParkingLot()

    @property
    def deposed(self) -> bool:
        return self._deposed

    async def check_lease(self) -> None:
        self.checks += 1
        try:
            if self.answer == "hang":
                await trio.sleep_forever()
            if self.answer == "down":
                raise StoreUnavailable("the server cannot be reached")
            if self.answer == "deposed":
                self._deposed = True
                raise StoreDeposed("held by another bot")
            await trio.lowlevel.checkpoint()
        finally:
            self._changed.unpark_all()

    def depose_by_another_call(self) -> None:
        """A store call elsewhere (a sync commit) found the store taken over."""
        self._deposed = True
        self._changed.unpark_all()

    async def wait_for_change(self) -> None:
        await self._changed.park()


def test_the_stores_that_can_lose_their_hold_are_told_apart() -> None:
    assert isinstance(FakeLeasedStore(), LeasedStore)
    assert isinstance(PostgresStore("postgresql://db/bot"), LeasedStore)
    from bot.store import Store

    assert not hasattr(Store, "check_lease")  # flock: held until the process ends
    assert issubclass(Deposed, StoreError)  # the CLI's "store unusable" exit


async def _watch(store: FakeLeasedStore, lost: list[tuple[float, str]]) -> None:
    await watch_lease(
        store, lambda reason: lost.append((trio.current_time(), reason)), bound_s=20.0
    )


async def test_a_confirmed_lease_is_never_lost(autojump_clock: trio.testing.MockClock) -> None:
    store, lost = FakeLeasedStore(), []
    with trio.move_on_after(600):
        await _watch(store, lost)
    assert lost == []
    assert store.checks >= 500  # it asked about once a second


async def test_a_takeover_found_by_another_call_stops_the_bot_within_a_check(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store, lost = FakeLeasedStore(), []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch, store, lost)
        await trio.sleep(5.5)
        store.depose_by_another_call()
        at = trio.current_time()
    [(when, reason)] = lost  # once, and the watch returned
    assert when - at <= 1.0
    assert "another instance" in reason


async def test_a_takeover_found_by_the_watch_itself(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store, lost = FakeLeasedStore(), []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch, store, lost)
        await trio.sleep(3.2)
        store.answer = "deposed"
        at = trio.current_time()
    [(when, _)] = lost
    assert when - at <= 2.0


@pytest.mark.parametrize("answer", ["down", "hang"])
async def test_a_lease_unconfirmed_for_the_bound_is_lost_before_the_server_lets_go(
    autojump_clock: trio.testing.MockClock, answer: str
) -> None:
    store, lost = FakeLeasedStore(), []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch, store, lost)
        await trio.sleep(10.2)
        store.answer = answer  # the partition starts just after a confirmation
        cut = trio.current_time()
        await trio.sleep(18)
        assert lost == []  # not before the bound: an outage is not a takeover
    [(when, reason)] = lost
    # The server drops the lost session 25 s after the last packet at the earliest
    # (10 s idle + 3 probes 5 s apart): the watch has stopped the bot before.
    assert 18 <= when - cut < 25
    assert "could not be confirmed" in reason


async def test_an_outage_shorter_than_the_bound_is_ridden_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store, lost = FakeLeasedStore(), []
    with trio.move_on_after(120):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch, store, lost)
            for _ in range(4):
                store.answer = "down"
                await trio.sleep(15)
                store.answer = "ok"
                await trio.sleep(5)
    assert lost == []


# --- the transaction ids a new active instance sends under ----------------------------

_TXN_ID = re.compile(r"[A-Za-z0-9._~-]{1,64}")
_HOSTILE_IDS = [
    "$abc:example.org",
    "$" + "x" * 10_000,
    "$nul\x00inside",
    "$ünïcødé/../slash?query#frag",
    "",
    "$\ud800lone",
]


def test_a_replys_transaction_id_is_the_same_in_every_process() -> None:
    # Another interpreter, another hash seed: nothing per process goes into it.
    script = (
        "import sys, json; from bot.messages import reply_txn_id; "
        "ids = json.loads(sys.stdin.read()); "
        "print(json.dumps([[reply_txn_id(i), reply_txn_id(i, 'part1'), "
        "reply_txn_id(i, 'notice')] for i in ids]))"
    )
    import json

    ids = [i for i in _HOSTILE_IDS if "\ud800" not in i]
    other = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(ids),
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        timeout=60,
    )
    here = [[reply_txn_id(i), reply_txn_id(i, "part1"), reply_txn_id(i, "notice")] for i in ids]
    assert json.loads(other.stdout) == here


def test_transaction_ids_differ_per_message_and_purpose_and_are_url_safe() -> None:
    made = set()
    for event_id in _HOSTILE_IDS:
        try:
            ids = [reply_txn_id(event_id, purpose) for purpose in ("reply", "part1", "notice")]
        except UnicodeEncodeError:
            continue  # a lone surrogate is never an event id the models let through
        for txn_id in ids:
            assert _TXN_ID.fullmatch(txn_id), txn_id
        made.update(ids)
    assert len(made) == 3 * 5


# --- the store's side, against a real PostgreSQL --------------------------------------


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PostgresServer]:
    reason = missing_binaries()
    if reason is not None:
        if os.environ.get("SURFACES_BOT_REQUIRE_POSTGRES"):
            pytest.fail(reason)
        pytest.skip(reason)
    with PostgresServer() as server:
        yield server


@pytest.fixture
def store_url(pg_server: PostgresServer) -> str:
    schema = f"s_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(pg_server.url(), autocommit=True) as db:
        db.execute(f"CREATE SCHEMA {schema}")  # our own alphabet
    return pg_server.url(options=f"-csearch_path%3D{schema}")


def _terminate(url: str, application_name: str) -> None:
    with psycopg.connect(url, autocommit=True) as db:
        db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (application_name,),
        )


async def test_a_cut_active_finds_the_waiting_standby_holding_the_store_at_once(
    store_url: str,
) -> None:
    name = f"active-{uuid.uuid4().hex[:8]}"
    active = await PostgresStore.open(f"{store_url}&application_name={name}", BOT)
    try:
        await active.commit_sync_batch(SyncToken("s1"), [])
        assert await active.lock_holder() is not None
        await active.check_lease()
        assert not active.deposed
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                taken: list[PostgresStore] = []

                async def standby() -> None:
                    taken.append(await PostgresStore.open(store_url, BOT, lock_wait_s=60))

                nursery.start_soon(standby)
                await trio.sleep(0.3)
                assert taken == []
                await trio.to_thread.run_sync(_terminate, store_url, name)
                with pytest.raises(StoreUnavailable):  # the lost connection itself
                    await active.check_lease()
                assert not active.deposed
                # The cut active reconnects, but the waiting standby had the first go.
                with pytest.raises(StoreDeposed, match="held by another bot"):
                    await active.check_lease()
        assert active.deposed
        with pytest.raises(StoreDeposed):
            await active.commit_sync_batch(SyncToken("s2"), [])
        successor = taken[0]
        try:
            assert successor.sync_token == "s1"
            await successor.check_lease()
            holder = await active.lock_holder()  # read-only: anyone may ask
            assert holder is not None
            pid, _address, application = holder
            # The successor's default name: its host and process.
            assert application == f"{socket.gethostname()} pid {os.getpid()}"  # who opened it
            with psycopg.connect(store_url, autocommit=True) as db:
                row = db.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)
                ).fetchone()
            assert row == (1,)
        finally:
            await successor.aclose()
    finally:
        await active.aclose()


async def test_a_cut_store_with_no_standby_gets_its_lock_back(store_url: str) -> None:
    name = f"alone-{uuid.uuid4().hex[:8]}"
    store = await PostgresStore.open(f"{store_url}&application_name={name}", BOT)
    try:
        await trio.to_thread.run_sync(_terminate, store_url, name)
        with pytest.raises(StoreUnavailable):  # the lost connection itself
            await store.check_lease()
        await store.check_lease()  # reconnected: still the one holder
        assert not store.deposed
        await store.commit_sync_batch(SyncToken("s2"), [])
    finally:
        await store.aclose()
    assert await PostgresStore(store_url).lock_holder() is None


# --- settings --------------------------------------------------------------------------

_BASE = {
    "MATRIX_HOMESERVER": "https://matrix.example.org",
    "MATRIX_USER_ID": BOT,
    "MATRIX_ACCESS_TOKEN": "secret",
}
_KEY = "A" * 43 + "="
_RECOVERY = SecretStorageKey.create().recovery_key


def test_standby_needs_a_postgresql_store_and_the_shared_keys() -> None:
    keys = {"BOT_PICKLE_KEY": _KEY, "MATRIX_RECOVERY_KEY": _RECOVERY}
    pg = {"BOT_STORE_URL": "postgresql://db/bot"}
    with pytest.raises(ConfigError, match=r"BOT_STANDBY.*PostgreSQL"):
        load_settings(environ={**_BASE, "BOT_STANDBY": "true", **keys})
    for missing in keys:
        given = {name: value for name, value in keys.items() if name != missing}
        with pytest.raises(ConfigError, match=rf"BOT_STANDBY.*{missing}") as refused:
            load_settings(environ={**_BASE, "BOT_STANDBY": "true", **pg, **given})
        assert str(refused.value).count("BOT_STANDBY") == 1
    settings = load_settings(environ={**_BASE, "BOT_STANDBY": "true", **pg, **keys})
    assert settings.standby
    no_e2ee = load_settings(environ={**_BASE, "BOT_STANDBY": "yes", "BOT_E2EE": "false", **pg})
    assert no_e2ee.standby
    assert not load_settings(environ={**_BASE, **pg}).standby
    # An empty key is one problem (its own), not also the standby's.
    with pytest.raises(ConfigError) as empty:
        load_settings(environ={**_BASE, "BOT_STANDBY": "true", **pg, **keys, "BOT_PICKLE_KEY": " "})
    assert "BOT_STANDBY" not in str(empty.value)


async def test_doctor_names_the_active_instance_without_taking_the_store(store_url: str) -> None:
    from bot.doctor import _check_active_instance

    lines: list[str] = []

    async def check(url: str) -> None:
        await _check_active_instance(
            url, lambda s: lines.append(f"ok {s}"), lambda s: lines.append(f"FAIL {s}")
        )

    await check(store_url)
    assert lines.pop().startswith("ok store: postgresql://")
    store = await PostgresStore.open(store_url, BOT)
    try:
        await check(store_url)
        line = lines.pop()
        assert f"the active instance is on {socket.gethostname()} pid {os.getpid()}" in line
        assert "none is active" not in line
        await store.check_lease()  # asking took nothing from the holder
        assert not store.deposed
    finally:
        await store.aclose()
    await check(store_url)
    assert "no instance holds it" in lines.pop()
    await check("postgresql://nobody:secret@127.0.0.1:1/bot")
    [line] = lines
    assert line.startswith("FAIL store:")
    assert "secret" not in line
