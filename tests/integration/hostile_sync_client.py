"""One `/sync` against a hostile server, under an address-space limit; prints JSON.

Run by tests/integration/test_hostile_server_memory.py as a subprocess, so that its
peak memory is its own::

    python hostile_sync_client.py '{"homeserver": "http://127.0.0.1:PORT",
        "address_space_bytes": 1073741824, "deadline_s": 20,
        "limits": {"max_body_bytes": 4194304, ...} | null}'

``limits`` given: the client gets ``transport=H11Transport(limits=ResponseLimits(...))``;
null: no transport argument (the client's default). The address-space limit is set
first, before the imports. One attempt only (``RetryPolicy(max_attempts=1)``). While
the call runs, a second task ticks every 10 ms and records its longest gap.

The JSON printed on stdout: ``error`` (the exception's class name, or None, or
``"deadline"``), ``bases`` (its class names up to `MatrixAPIError`), ``message``,
``limit`` (the exception's, when it has one), ``elapsed_s``, ``ticks``,
``max_tick_gap_s``, ``vm_hwm_kib`` (peak RSS, ``VmHWM`` of /proc/self/status) and
``address_space_bytes`` (the limit in force, read back).
"""

from __future__ import annotations

import json
import resource
import sys

_config = json.loads(sys.argv[1])
_limit = int(_config["address_space_bytes"])
resource.setrlimit(resource.RLIMIT_AS, (_limit, _limit))

import time  # noqa: E402
from typing import Any  # noqa: E402

import trio  # noqa: E402

from matrix_api import MatrixAPIError, MatrixClient, RetryPolicy  # noqa: E402
from matrix_api.h11_transport import H11Transport, ResponseLimits  # noqa: E402

TICK_S = 0.01


def peak_rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


class Ticker:
    def __init__(self) -> None:
        self.ticks = 0
        self.max_gap_s = 0.0

    async def run(self) -> None:
        last = trio.current_time()
        while True:
            await trio.sleep(TICK_S)
            now = trio.current_time()
            self.max_gap_s = max(self.max_gap_s, now - last)
            last = now
            self.ticks += 1


async def one_sync(config: dict[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {"retry_policy": RetryPolicy(max_attempts=1)}
    if config["limits"] is not None:
        options["transport"] = H11Transport(limits=ResponseLimits(**config["limits"]))
    result: dict[str, Any] = {"error": None, "bases": [], "message": "", "limit": None}
    ticker = Ticker()
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker.run)
        try:
            with trio.fail_after(config["deadline_s"]):
                async with MatrixClient(
                    config["homeserver"], access_token="hostile-test-token", **options
                ) as client:
                    await client.sync(timeout_ms=0)
        except trio.TooSlowError:
            result["error"] = "deadline"
        except (MatrixAPIError, MemoryError) as exc:
            result["error"] = type(exc).__name__
            result["bases"] = [cls.__name__ for cls in type(exc).__mro__]
            result["message"] = str(exc)
            result["limit"] = getattr(exc, "limit", None)
        result["elapsed_s"] = round(time.monotonic() - started, 3)
        nursery.cancel_scope.cancel()
    result["ticks"] = ticker.ticks
    result["max_tick_gap_s"] = round(ticker.max_gap_s, 3)
    result["vm_hwm_kib"] = peak_rss_kib()
    result["address_space_bytes"] = resource.getrlimit(resource.RLIMIT_AS)[0]
    return result


if __name__ == "__main__":
    print(json.dumps(trio.run(one_sync, _config)), flush=True)
