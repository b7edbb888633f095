"""The service's one nursery: bootstrap, then the sync loop and the room lanes.

Order is the point. `BotRuntime.run` first awaits the bootstrap task
(``nursery.start``), which authenticates, does the initial full-state sync,
reconciles the store against the server's markers, logs
``matrix_reconcile_complete``, and commits the events the initial sync carried.
Only after it reports started do the dispatcher's room lanes and the long-polling sync
loop exist at all, so nothing can take a message against a half-restored chat map.

Shutdown (`request_stop`, wired to SIGINT/SIGTERM by the CLI): the sync loop is
cancelled, lanes take no new job and finish the one in hand within the drain
deadline; whatever is still queued stays in the durable inbox.

Active/standby (`bot.lease`): with a store that can be taken over (PostgreSQL), the
runtime watches its lease and, once another instance holds the store, stops at once
(no drain: nothing more is taken or sent) and `BotRuntime.run` raises `Deposed`.
`run_bot` then goes back to waiting for the store with ``BOT_STANDBY`` (a new client,
store and runtime each time), or ends with that error without it.

The operators' listener (`bot.ops`, when ``BOT_HTTP_LISTEN`` is set) starts before
the bootstrap, so ``/readyz`` says "not yet" all through reconciliation, and stops
after the drain; the runtime records the facts it judges by (`OpsFacts`) and counts
into its own metrics registry (`BotMetrics`).
"""

from __future__ import annotations

import ctypes
import enum
import gc
import math
import random
import secrets
import sqlite3
from dataclasses import replace
from pathlib import Path

import httpx
import structlog
import trio
from trio_util import AsyncValue, move_on_when

from matrix_api import MatrixAPIError, MatrixClient, NetworkError, TransportError, UnknownToken
from matrix_api.models import FilterID, SyncResponse, SyncToken
from matrix_api.retry import Backoff
from matrix_crypto.errors import CryptoError

from . import __version__
from .backends import Backend, open_backend
from .config import Settings
from .dispatch import Dispatcher
from .e2ee.crypto import BotCrypto, DeviceConflict
from .e2ee.device_tasks import run_device_tasks
from .e2ee.pickle_key import PickleKeyError, load_pickle_key
from .e2ee.sending import EncryptingClient
from .e2ee.verification import BotVerifications
from .handler import MessageHandler
from .intake import Intake, full_state_sync, sync_filters
from .lease import Deposed, LeasedStore, watch_lease
from .ops.health import OpsFacts, health, readiness
from .ops.http import OpsApp, start_ops
from .ops.metrics import BotMetrics, LiveValues
from .quarantine import failure_reason
from .reconcile import ReconcileReport, reconcile_matrix_state
from .session import DEFAULT_DEVICE_ID, AuthError, authenticate, log_in
from .store import StoreUnavailable
from .store_api import BotStore, open_store

__all__ = ["SYNC_BACKOFF", "BotRuntime", "FatalError", "Phase", "run_bot"]

log = structlog.get_logger("bot.runtime")

LONG_POLL_MS = 30_000
STORE_CHECKPOINT_INTERVAL_S = 5.0
# After the n-th failed /sync (or batch) in a row, a wait of up to 2, 4, ... 60 s; no
# limit, the loop is the bot's only way to hear of new messages. The client has already
# retried the request itself (docs/retries.md).
SYNC_BACKOFF = Backoff(max_attempts=None, base_delay=2.0, max_delay=60.0)
# A batch that keeps failing is not fetched and failed forever. From this many
# failures in a row on the same position, a gap /messages cannot fill is left
# unfilled (`Intake.commit(salvage=True)`); from `_GIVE_UP_BATCH_AFTER`, a batch
# that still fails for a reason other than the server or the store being down is
# given up: its events are quarantined and the sync token moves past it.
_SALVAGE_BATCH_AFTER = 3
_GIVE_UP_BATCH_AFTER = 5
# Connections to the homeserver beyond one per answer slot (see `run_bot`).
_SPARE_CONNECTIONS = 4


class Phase(enum.Enum):
    STARTING = "starting"
    RECONCILING = "reconciling"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    DEPOSED = "deposed"
    """Another instance took the store over: stopped at once, without a drain."""


class FatalError(Exception):
    """The bot cannot go on; the message says why, for the operator."""


class BotRuntime:
    """One bot: a client, a store, a backend, and the tasks that connect them.

    The caller owns the client and the store (and closes them); the runtime owns
    its tasks. ``ready`` is the start-up gate: set once, when reconciliation is done
    and the messages of the initial sync are in the inbox; the room lanes and the sync
    loop take nothing before it. ``phase`` lets tests and the CLI wait for a milestone.
    ``facts`` and ``metrics`` are what the operators' listener shows (`bot.ops`);
    ``ops_addresses`` where it listens, once `run` has started it.
    """

    def __init__(
        self,
        settings: Settings,
        client: MatrixClient,
        store: BotStore,
        backend: Backend,
        *,
        stop: trio.Event | None = None,
        rng: random.Random | None = None,
        metrics: BotMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.phase: AsyncValue[Phase] = AsyncValue(Phase.STARTING)
        self.ready = trio.Event()
        self.reconcile_report: ReconcileReport | None = None
        self.metrics = metrics if metrics is not None else BotMetrics()
        self.facts = OpsFacts(
            ready=self.ready,
            phase=lambda: str(self.phase.value.value),
            long_poll_s=LONG_POLL_MS / 1000,
        )
        self.ops_addresses: list[str] = []
        if client.observer is None:
            client.observer = self.metrics
        self._client = client
        self._store = store
        self._intake = Intake(client, store, settings.user_id, metrics=self.metrics)
        _, self._long_poll_filter = sync_filters(settings.user_id)
        self._long_poll_filter_id: FilterID | None = None
        self._handler = MessageHandler(client, store, settings, backend, metrics=self.metrics)
        self._dispatcher = Dispatcher(self._handler, facts=self.facts, metrics=self.metrics)
        self.metrics.watch(self._live_values)
        self._stop = stop if stop is not None else trio.Event()
        self._sync_backoff_policy = replace(SYNC_BACKOFF, rng=rng or random.Random())
        self._crypto: BotCrypto | None = None
        self._verifications: BotVerifications | None = None
        self._pickle_key: bytes | None = None
        # Cancelled when the lease is lost: everything below `run` stops at once.
        self._run_scope = trio.CancelScope()
        self.deposed: str | None = None
        """Why this instance stopped being the active one (None: it still is)."""

    def request_stop(self) -> None:
        """Begin a graceful stop; safe to call at any time, more than once."""
        self._stop.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until `request_stop`; reports started once the bot takes messages.

        Raises `FatalError` (inside an exception group when it comes from a task)
        for what the bot cannot recover from: bad credentials, an unreachable
        homeserver at start, an operators' listener that cannot listen; `Deposed`
        when another instance took the store over (before or after reporting started).
        """
        self.facts.started_at = trio.current_time()
        listener_stop = trio.Event()
        lease_scope = trio.CancelScope()
        async with trio.open_nursery() as listener:
            if self.settings.http_listen is not None:
                await self._start_listener(listener, self.settings.http_listen, listener_stop)
            if isinstance(self._store, LeasedStore):
                listener.start_soon(self._watch_lease, self._store, lease_scope)
            try:
                with self._run_scope:
                    await self._run(task_status)
            finally:
                lease_scope.cancel()
                # After the drain: until here, /readyz says "draining".
                listener_stop.set()
        if self.deposed is not None:
            raise Deposed(self.deposed)

    async def _watch_lease(self, store: LeasedStore, scope: trio.CancelScope) -> None:
        with scope:
            await watch_lease(store, self._lost_lease)

    def _lost_lease(self, reason: str) -> None:
        """Stop now: the sync loop, the lanes (a job in hand is cut, its reply is the
        new instance's to send), the device's tasks. Logged once."""
        if self.deposed is not None:
            return
        self.deposed = reason
        self.phase.value = Phase.DEPOSED
        self._dispatcher.stop()
        self._run_scope.cancel()
        log.error("bot_deposed", reason=reason, requests=self._client.requests_sent)

    async def _start_listener(
        self, nursery: trio.Nursery, address: tuple[str, int], stop: trio.Event
    ) -> None:
        app = OpsApp(self.facts, self.metrics)
        try:
            self.ops_addresses = await start_ops(nursery, app, address, stop.wait)
        except OSError as exc:
            host, port = address
            raise FatalError(
                f"the operators' listener (BOT_HTTP_LISTEN) cannot listen on {host}:{port}: {exc}"
            ) from exc

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as nursery:
            self.reconcile_report = await nursery.start(self._bootstrap)
            if self._stop.is_set():
                # Asked to stop while starting: take no message at all.
                log.info("bot_stopped_before_ready")
                task_status.started()
                self.phase.value = Phase.STOPPED
                return
            await nursery.start(self._lanes)
            self.facts.lanes_started = True
            pending = await self._store.pending()
            self._dispatcher.submit(pending, resumed=True)
            _return_freed_memory()
            sync_scope = trio.CancelScope()
            nursery.start_soon(self._sync_loop, sync_scope)
            checkpoint_scope = trio.CancelScope()
            nursery.start_soon(self._checkpoint_store, checkpoint_scope)
            crypto_scope = trio.CancelScope()
            if self._crypto is not None:
                nursery.start_soon(self._crypto_requests, self._crypto, crypto_scope)
            self.phase.value = Phase.READY
            self.facts.taking_messages()
            log.info(
                "bot_ready",
                user_id=self.settings.user_id,
                chats=len(self._store.chats()),
                pending=len(pending),
                max_concurrent_answers=self.settings.max_concurrent_answers,
                startup_requests=self._client.requests_sent,
            )
            task_status.started()

            await self._stop.wait()
            self.phase.value = Phase.DRAINING
            log.info("bot_draining", deadline_s=self.settings.drain_timeout_s)
            sync_scope.cancel()
            checkpoint_scope.cancel()
            crypto_scope.cancel()
            self._dispatcher.stop()
            nursery.cancel_scope.deadline = trio.current_time() + self.settings.drain_timeout_s
        self.phase.value = Phase.STOPPED
        log.info("bot_stopped", requests=self._client.requests_sent)

    async def _lanes(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await self.ready.wait()
        await self._dispatcher.run(task_status=task_status)

    async def _crypto_requests(self, crypto: BotCrypto, scope: trio.CancelScope) -> None:
        # Both are set with the crypto (`_start_crypto`).
        assert self._pickle_key is not None
        assert self._verifications is not None
        with scope:
            await run_device_tasks(
                crypto,
                password=self.settings.password,
                pickle_key=self._pickle_key,
                recovery_key=self.settings.recovery_key,
                store_path=Path(self.settings.store_path),
                verifications=self._verifications,
            )

    async def _checkpoint_store(self, scope: trio.CancelScope) -> None:
        with scope:
            await self._store.checkpoint_every(STORE_CHECKPOINT_INTERVAL_S)

    # --- bootstrap ------------------------------------------------------------------

    async def _bootstrap(
        self, *, task_status: trio.TaskStatus[ReconcileReport] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await self._start_crypto(await self._authenticate())
        since = self._store.sync_token
        initial = await self._initial_sync(since)
        if initial is None:
            task_status.started(ReconcileReport())  # asked to stop: `run` takes it from here
            return
        self.phase.value = Phase.RECONCILING
        report = await reconcile_matrix_state(self._client, self._store, initial)
        # A conflict needs the operator: it is a warning, not a line among the others.
        (log.warning if report.conflicts else log.info)(
            "matrix_reconcile_complete", **report.log_fields()
        )
        self.metrics.reconciled(report)
        # Messages that arrived while the bot was down, now that every chat is known.
        try:
            await self._intake.commit(initial, since)
        except (MatrixAPIError, StoreUnavailable) as exc:
            # Not committed: the sync loop fetches these events again, and retries.
            log.warning("initial_batch_deferred", error=str(exc))
        except Exception as exc:  # whatever the initial sync holds, the bot starts
            log.warning(
                "initial_batch_deferred", reason=failure_reason(exc, "intake"), exc_info=True
            )
        try:
            # An uploaded filter keeps every long-poll URL short; inline works too.
            self._long_poll_filter_id = await self._client.upload_filter(self._long_poll_filter)
        except MatrixAPIError as exc:
            log.warning("filter_upload_failed", error=str(exc))
        self.ready.set()
        task_status.started(report)

    async def _initial_sync(self, since: SyncToken | None) -> SyncResponse | None:
        """The start-up sync; an answer the bot cannot use is asked for again until
        one is usable, or a stop is requested (then None)."""
        failures = 0
        while not self._stop.is_set():
            try:
                return await full_state_sync(self._client, self.settings.user_id, since)
            except NetworkError as exc:
                raise FatalError(f"homeserver unreachable: {exc}") from exc
            except UnknownToken:
                raise
            except MatrixAPIError as exc:
                failures += 1
                log.warning("initial_sync_failed", error=str(exc), failures=failures)
                async with move_on_when(self._stop.wait):
                    await self._sync_backoff(failures)
        return None

    async def _authenticate(self) -> str | None:
        stored = await self._store.get_meta("device_id")
        try:
            device_id = await authenticate(self._client, self.settings, stored)
        except AuthError as exc:
            raise FatalError(str(exc)) from exc
        if device_id is not None and device_id != stored:
            await self._store.set_meta("device_id", device_id)
        return device_id

    async def _start_crypto(self, device_id: str | None) -> None:
        """Restore or make the device's crypto and publish its keys; with it, encrypted
        rooms are chats like any other. Without it (turned off, or no device that can
        have keys) they get the way out (`bot.encryption`)."""
        client = self._client
        if not self.settings.e2ee or not isinstance(client, EncryptingClient):
            return
        if device_id is None:
            log.error("e2ee_unavailable", reason="the homeserver named no device for the bot")
            return
        try:
            pickle_key = load_pickle_key(self.settings.pickle_key, Path(self.settings.store_path))
            try:
                crypto = await BotCrypto.open(
                    client, self._store, device_id=device_id, pickle_key=pickle_key
                )
            except DeviceConflict as exc:
                device_id = await self._new_device(exc)
                if device_id is None:
                    return
                crypto = await BotCrypto.open(
                    client, self._store, device_id=device_id, pickle_key=pickle_key
                )
            await crypto.send_outgoing()  # the device's keys, before anyone needs them
        except (PickleKeyError, CryptoError) as exc:
            raise FatalError(f"end-to-end encryption state unusable: {exc}") from exc
        except MatrixAPIError as exc:
            raise FatalError(f"publishing the device's encryption keys failed: {exc}") from exc
        client.attach(crypto, self._store)
        self._pickle_key = pickle_key
        self._intake.crypto = crypto
        self._handler.attach_crypto(crypto)
        self._crypto = crypto
        # Before the initial sync: a request in its first batch is seen.
        self._verifications = BotVerifications(crypto, self.settings, pickle_key)
        crypto.verifications = self._verifications.receive
        crypto.room_verifications = self._verifications.receive_rooms

    async def _new_device(self, conflict: DeviceConflict) -> str | None:
        """A fresh device for a store that lost the old one's keys (their private
        halves are gone: the old device can never be used for encryption again)."""
        if self.settings.password is None:
            log.error(
                "e2ee_unavailable",
                reason=str(conflict),
                fix="configure MATRIX_PASSWORD so the bot can log in as a new device, "
                "or give it an access token of a new device",
            )
            return None
        device_id = f"{DEFAULT_DEVICE_ID}_{secrets.token_hex(4).upper()}"
        try:
            await log_in(self._client, self.settings, device_id)
        except AuthError as exc:
            raise FatalError(str(exc)) from exc
        await self._store.set_meta("device_id", device_id)
        log.warning("e2ee_new_device", reason=str(conflict), device_id=device_id)
        return device_id

    # --- the sync loop --------------------------------------------------------------

    async def _sync_loop(self, scope: trio.CancelScope) -> None:
        failures = 0  # in a row, on the same position
        failed_since: SyncToken | None = None
        facts, metrics = self.facts, self.metrics
        with scope:
            await self.ready.wait()
            facts.sync_started = True  # /readyz waits for this line
            while True:
                since = self._store.sync_token
                if since != failed_since:
                    failures = 0
                response: SyncResponse | None = None
                try:
                    response = await self._client.sync(
                        since=since,
                        timeout_ms=LONG_POLL_MS,
                        filter=self._long_poll_filter_id or self._long_poll_filter,
                    )
                    fresh = await self._intake.commit(
                        response, since, salvage=failures >= _SALVAGE_BATCH_AFTER
                    )
                except UnknownToken as exc:
                    self._sync_failed("token")
                    await self._recover_token(exc)
                    continue
                except (MatrixAPIError, StoreUnavailable) as exc:
                    # Nothing was committed: the same batch is fetched again.
                    if isinstance(exc, StoreUnavailable):
                        facts.store_failed(exc)
                        self._sync_failed("store")
                    else:
                        self._sync_failed(
                            "network" if isinstance(exc, TransportError) else "matrix"
                        )
                    failures, failed_since = failures + 1, since
                    log.warning(
                        "store_unavailable" if isinstance(exc, StoreUnavailable) else "sync_failed",
                        error=str(exc),
                        failures=failures,
                    )
                    await self._sync_backoff(failures)
                    continue
                except Exception as exc:  # a batch the bot cannot take: never the end of it
                    if isinstance(exc, sqlite3.Error):
                        facts.store_failed(exc)
                    self._sync_failed("batch")
                    failures, failed_since = failures + 1, since
                    reason = failure_reason(exc, "sync")
                    log.error("sync_batch_failed", reason=reason, failures=failures, exc_info=True)
                    if response is not None and failures >= _GIVE_UP_BATCH_AFTER:
                        await self._give_up_batch(response, reason)
                    else:
                        await self._sync_backoff(failures)
                    continue
                facts.store_ok()
                facts.sync_ok()
                metrics.sync_committed()
                self._dispatcher.submit(fresh)

    def _sync_failed(self, kind: str) -> None:
        self.facts.sync_failed(kind)
        self.metrics.sync_failed(kind)

    def _live_values(self) -> LiveValues:
        """The metrics read at scrape time (`BotMetrics.watch`)."""
        oldest_ms = self._dispatcher.oldest_pending_ts()
        now_ms = self._client.server_time_ms()
        last_ok = self.facts.last_sync_ok_at
        return LiveValues(
            phase=str(self.phase.value.value),
            ready=readiness(self.facts).ok,
            healthy=health(self.facts).ok,
            inbox_depth=self._dispatcher.pending,
            oldest_pending_age_s=(
                max(0.0, (now_ms - oldest_ms) / 1000)
                if oldest_ms is not None and now_ms is not None
                else None
            ),
            chats=len(self._store.chats()),
            spaces=len(self._store.spaces()),
            sync_last_ok_age_s=None if last_ok is None else trio.current_time() - last_ok,
            sync_failures_in_row=self.facts.sync_failures_in_row,
            store_failing=self.facts.store_failing,
        )

    async def _sync_backoff(self, failures: int) -> None:
        """Wait after the ``failures``-th failure in a row (from 1)."""
        delay = self._sync_backoff_policy.wait(failures - 1)
        log.info("sync_retry_later", retry_in_s=round(delay, 2))
        await trio.sleep(delay)

    async def _give_up_batch(self, response: SyncResponse, reason: str) -> None:
        try:
            await self._intake.quarantine_batch(response, reason)
        except StoreUnavailable as exc:
            self.facts.store_failed(exc)
            log.warning("store_unavailable", error=str(exc))
            await self._sync_backoff(_GIVE_UP_BATCH_AFTER)
        else:
            self.facts.store_ok()
            log.error("sync_batch_given_up", reason=reason, next_batch=response.next_batch)

    async def _recover_token(self, error: UnknownToken) -> None:
        if self.settings.password is None:
            raise FatalError(
                "the access token was invalidated and no password is configured; "
                "set MATRIX_PASSWORD or a new MATRIX_ACCESS_TOKEN and restart"
            ) from error
        log.warning("token_invalidated", soft_logout=error.soft_logout)
        # The same device: its transaction ids, and so reply de-duplication, stay valid.
        try:
            await log_in(self._client, self.settings, await self._store.get_meta("device_id"))
        except AuthError as exc:
            raise FatalError(str(exc)) from exc


def _return_freed_memory() -> None:
    """Give the memory freed after start-up back to the operating system.

    The full-state sync of every room is the most the bot ever holds at once;
    glibc keeps what it freed for later use unless asked (measured: 0.9 MB of
    resident memory with 300 rooms). Elsewhere (no glibc) this does nothing.
    """
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        gc.collect()
        trim(0)


async def run_bot(
    settings: Settings,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    backend: Backend | None = None,
    stop: trio.Event | None = None,
    task_status: trio.TaskStatus[BotRuntime] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Open the client and the store, run a `BotRuntime` until ``stop``, close both.

    Reports the runtime as started once it takes messages (``runtime.request_stop()``
    stops it too). ``transport`` is an httpx transport for tests.

    With ``settings.standby`` the store is waited for as long as another instance
    holds it (a standby), and a runtime that loses it (`Deposed`) is followed by a
    new wait with everything opened anew; only the first runtime is reported. Without
    it, `Deposed` is raised (a `bot.store.StoreError`).
    """
    stop = stop if stop is not None else trio.Event()
    reported = False
    while True:
        deposed = False
        try:
            async with trio.open_nursery() as nursery:
                runtime: BotRuntime | None = await nursery.start(
                    _run_instance, settings, transport, backend, stop
                )
                if runtime is not None and not reported:
                    reported = True
                    task_status.started(runtime)
        except* Deposed:
            if not settings.standby:
                raise
            deposed = True
        if not deposed or stop.is_set():
            return
        # Back to standby: a deposed instance is healthy, it only lost the store; the
        # pair stays a pair without anyone restarting it.
        log.info("bot_back_to_standby")


async def _run_instance(
    settings: Settings,
    transport: httpx.AsyncBaseTransport | None,
    backend: Backend | None,
    stop: trio.Event,
    *,
    task_status: trio.TaskStatus[BotRuntime | None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """One holding of the store, with a client, backend and runtime of its own;
    reports the runtime once it takes messages (None: stopped while waiting)."""
    client = EncryptingClient(
        settings.homeserver,
        access_token=settings.access_token,
        user_id=settings.user_id,
        device_id=settings.device_id,
        transport=transport,
        user_agent=f"surfaces-bot/{__version__}",
        # Every answer slot may be sending at once, beside the long-poll, the crypto
        # requests and commands: none of them waits for a connection.
        max_connections=settings.max_concurrent_answers + _SPARE_CONNECTIONS,
    )
    async with client, open_backend(settings) as configured:
        store = await _open_store(settings, stop)
        if store is None:
            task_status.started(None)
            return
        try:
            runtime = BotRuntime(settings, client, store, backend or configured, stop=stop)
            async with trio.open_nursery() as nursery:
                await nursery.start(runtime.run)
                task_status.started(runtime)
        finally:
            with trio.CancelScope(shield=True):
                await store.aclose()


async def _open_store(settings: Settings, stop: trio.Event) -> BotStore | None:
    """The store, held by this process; None when ``stop`` came first (a standby)."""
    if not settings.standby:
        # A bot still draining on this store lets go of it within its drain deadline.
        return await open_store(
            settings.store_location, settings.user_id, lock_wait_s=settings.drain_timeout_s
        )
    log.info("bot_standby", user_id=settings.user_id)
    waiting_since = trio.current_time()
    store: BotStore | None = None
    listener_stop = trio.Event()
    async with trio.open_nursery() as nursery:
        if settings.http_listen is not None:
            await _standby_listener(nursery, settings.http_listen, listener_stop)
        async with move_on_when(stop.wait):
            store = await open_store(
                settings.store_location, settings.user_id, lock_wait_s=math.inf
            )
        listener_stop.set()  # closed before the runtime's own listener takes the port
    if stop.is_set():
        if store is not None:
            with trio.CancelScope(shield=True):
                await store.aclose()
        log.info("bot_stopped", phase="standby")
        return None
    log.info("bot_active", waited_s=round(trio.current_time() - waiting_since, 3))
    return store


async def _standby_listener(
    nursery: trio.Nursery, address: tuple[str, int], stop: trio.Event
) -> None:
    """The operators' listener of a standby: /readyz 503 with phase "standby"."""
    facts = OpsFacts(ready=trio.Event(), phase=lambda: "standby", long_poll_s=LONG_POLL_MS / 1000)
    facts.started_at = trio.current_time()
    metrics = BotMetrics()
    metrics.watch(
        lambda: LiveValues(
            phase="standby",
            ready=False,
            healthy=health(facts).ok,
            inbox_depth=0,
            oldest_pending_age_s=None,
            chats=0,
            spaces=0,
            sync_last_ok_age_s=None,
            sync_failures_in_row=0,
            store_failing=False,
        )
    )
    try:
        await start_ops(nursery, OpsApp(facts, metrics), address, stop.wait)
    except OSError as exc:
        host, port = address
        raise FatalError(
            f"the operators' listener (BOT_HTTP_LISTEN) cannot listen on {host}:{port}: {exc}"
        ) from exc
