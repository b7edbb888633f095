"""The listener inside the runtime, on a loopback port (real sockets, so the real clock;
every wait bounded): up before the bootstrap, answering through a run, gone after the
stop; a port that cannot be had is a fatal error before anything else happens."""

from __future__ import annotations

import dataclasses
import gc

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from bot.chats import marker_content
from bot.config import Settings
from bot.runtime import FatalError, Phase
from fake_homeserver import ALICE, FakeHomeserver, text_event
from ordering_harness import bot_parts, chat, reply_to, seed_store

HOME = "!home:hs.test"
LIMIT_S = 20.0


async def test_the_listener_answers_from_before_the_bootstrap_until_the_stop(
    hs: FakeHomeserver, settings: Settings
) -> None:
    home = chat("c_home", HOME)
    await seed_store(settings.store_path, chats=[home], token="s0")
    hs.add_room(HOME, marker=marker_content(home))
    hs.delays["initial_sync"] = 1.0  # real seconds: /readyz is asked while it waits
    settings = dataclasses.replace(settings, http_listen=("127.0.0.1", 0))
    early: list[tuple[int, str]] = []

    with trio.fail_after(LIMIT_S):
        async with bot_parts(settings, hs) as (runtime, store), httpx.AsyncClient() as http:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(runtime.run)
                # The bootstrap is waiting on the initial sync: the listener already answers.
                await hs.wait_for(lambda call: call.endpoint == "initial_sync")
                (base,) = runtime.ops_addresses
                answer = await http.get(f"{base}/readyz")
                early.append((answer.status_code, answer.json()["phase"]))
                await runtime.phase.wait_value(Phase.READY)
                await hs.wait_for(lambda call: call.endpoint == "long_poll")
                ready = await http.get(f"{base}/readyz")
                assert ready.status_code == 200
                hs.queue_sync({HOME: [text_event("$q", ALICE, "hello")]})
                await hs.wait_for(reply_to("$q"), ended=True)
                while (await store.handled_outcome("$q")) is None:
                    await store.wait_for_change()
                metrics = await http.get(f"{base}/metrics")
                assert metrics.status_code == 200
                samples = {
                    (s.name, tuple(sorted(s.labels.items()))): s.value
                    for family in text_string_to_metric_families(metrics.text)
                    for s in family.samples
                }
                assert samples["surfaces_messages_handled_total", (("outcome", "replied"),)] == 1
                assert (await http.get(f"{base}/healthz")).status_code == 200
                runtime.request_stop()
            # The runtime's run has returned: the listener is closed.
            with pytest.raises(httpx.ConnectError):
                await http.get(f"{base}/readyz")

    assert early == [(503, "starting")]


# hypercorn's Config.create_sockets leaves the socket it failed to bind for the garbage
# collector (hypercorn 0.18): the bot stops right after, so only the warning is filtered.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_listen_address_in_use_stops_the_start_before_any_request(
    hs: FakeHomeserver, settings: Settings
) -> None:
    holder = trio.socket.socket()
    with holder:
        await holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        settings = dataclasses.replace(settings, http_listen=("127.0.0.1", port))
        with trio.fail_after(LIMIT_S):
            async with bot_parts(settings, hs) as (runtime, _):
                with pytest.RaisesGroup(
                    pytest.RaisesExc(FatalError, match=f"cannot listen on 127.0.0.1:{port}"),
                    flatten_subgroups=True,
                ):
                    await runtime.run()
    assert hs.calls == []
    gc.collect()  # the leaked socket's warning here, not in whichever test runs next
