"""The fault scenarios of issue 5 at full size, against throwaway local Synapses.

Starts two homeservers in a temporary directory (one with relaxed rate limits, which
the outage scenario stops and starts; one with Synapse's default ``rc_*`` limits),
runs every scenario of ``tests/integration/faults/scenarios/`` with the sizes in
`faults.harness.figures.FULL` (the CI tests run the same code with its `CI`), and
prints one table: messages sent, answered exactly once, lost, duplicated, time to
recover (from the end of a fault until everything sent before it, and the first
message after it, was answered), and notes.

    python bench/faults.py [--only crash,outage,...] [--seed N] [--keep DIR]

A scenario that fails still gets its row, with the error in the notes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))

# Test helpers, found through the path above: the bench runs the tests' own scenarios.
from faults.harness.figures import FULL, Figures
from faults.harness.lab import FaultLab, fault_lab, seed_from_env
from faults.scenarios.backend import run_backend_failures
from faults.scenarios.gaps import run_gap_while_busy, run_gap_while_down
from faults.scenarios.graceful_stop import run_graceful_stop
from faults.scenarios.hostile_events import (
    DELIVERIES,
    HOSTILE_CONTENTS,
    run_hostile_event,
    run_poisoned_event,
)
from faults.scenarios.hostile_server import run_hostile_server
from faults.scenarios.lost_token import (
    run_lost_token_with_password,
    run_lost_token_without_password,
)
from faults.scenarios.outage import run_outage
from faults.scenarios.rate_limits import run_long_rate_limit, run_rate_limits
from faults.scenarios.restarts import run_restarts
from faults.scenarios.security import run_hostile_bodies, run_two_bots
from faults.scenarios.store import (
    make_foreign_sqlite,
    make_newer_store,
    make_truncated_store,
    run_unusable_store,
)
from matrix_api.testing.synapse import SynapseServer

Scenario = Callable[[FaultLab, SynapseServer, SynapseServer], Awaitable[list[Figures]]]
SIZES = FULL


async def crash(lab: FaultLab, hs: SynapseServer, strict: SynapseServer) -> list[Figures]:
    del strict
    return [
        await run_restarts(
            lab,
            hs,
            scenario="1 crash (kill -9)",
            how="kill",
            messages=SIZES.crash_messages,
            rate=SIZES.crash_rate,
            settle_s=SIZES.settle_s,
        )
    ]


async def outage(lab: FaultLab, hs: SynapseServer, strict: SynapseServer) -> list[Figures]:
    del strict
    return [
        await run_outage(
            lab,
            hs,
            messages=SIZES.outage_messages,
            rate=SIZES.outage_rate,
            outage_s=SIZES.outage_s,
            settle_s=SIZES.settle_s,
        )
    ]


async def rate_limits(lab: FaultLab, hs: SynapseServer, strict: SynapseServer) -> list[Figures]:
    del hs
    return [
        await run_rate_limits(lab, strict, messages=SIZES.burst_messages, settle_s=SIZES.settle_s)
    ]


async def long_rate_limit(lab: FaultLab, hs: SynapseServer, strict: SynapseServer) -> list[Figures]:
    del strict
    return [await run_long_rate_limit(lab, hs, limited=5, retry_after_s=3)]


async def gap(lab: FaultLab, hs: SynapseServer, strict: SynapseServer) -> list[Figures]:
    del strict
    return [
        await run_gap_while_down(lab, hs, messages=SIZES.gap_messages, settle_s=SIZES.settle_s),
        await run_gap_while_busy(
            lab, hs, per_sender=SIZES.busy_per_sender, settle_s=SIZES.settle_s
        ),
    ]


async def token(lab: FaultLab, hs: SynapseServer, strict: SynapseServer) -> list[Figures]:
    del strict
    return [
        await run_lost_token_with_password(
            lab,
            hs,
            messages=SIZES.token_messages,
            rate=SIZES.token_rate,
            settle_s=SIZES.settle_s,
        ),
        await run_lost_token_without_password(lab, hs),
    ]


async def hostile_server(lab: FaultLab, hs: SynapseServer, strict: SynapseServer) -> list[Figures]:
    del strict
    return [await run_hostile_server(lab, hs, rounds=SIZES.hostile_rounds, settle_s=SIZES.settle_s)]


async def backend(lab: FaultLab, hs: SynapseServer, strict: SynapseServer) -> list[Figures]:
    del strict
    return [
        await run_backend_failures(
            lab, hs, kinds=("raise", "refuse", "flaky"), scenario="7 backend raises"
        ),
        await run_backend_failures(lab, hs, kinds=("hang",), scenario="7 backend hangs"),
    ]


async def graceful(lab: FaultLab, hs: SynapseServer, strict: SynapseServer) -> list[Figures]:
    del strict
    return [await run_graceful_stop(lab, hs, messages=SIZES.graceful_messages)]


async def store(lab: FaultLab, hs: SynapseServer, strict: SynapseServer) -> list[Figures]:
    del hs, strict
    notes: dict[str, str] = {}
    for name, make in (
        ("truncated", make_truncated_store),
        ("foreign", make_foreign_sqlite),
        ("newer", make_newer_store),
    ):
        path = lab.workdir / name / "bot.sqlite3"
        path.parent.mkdir(parents=True)
        made = make(path)
        if made is not None:
            await made
        outcome = await run_unusable_store(path)
        untouched = "file untouched" if outcome["file_untouched"] else "FILE CHANGED"
        extra = f" +{'+'.join(outcome['new_files'])}" if outcome["new_files"] else ""
        notes[name] = f"exit {outcome['code']} {untouched}{extra}"
    return [Figures("9 unusable store", notes=notes)]


async def restart(lab: FaultLab, hs: SynapseServer, strict: SynapseServer) -> list[Figures]:
    del strict
    return [
        await run_restarts(
            lab,
            hs,
            scenario="10 quick restart",
            how="term",
            messages=SIZES.restart_messages,
            rate=SIZES.restart_rate,
            settle_s=SIZES.settle_s,
        )
    ]


async def security(lab: FaultLab, hs: SynapseServer, strict: SynapseServer) -> list[Figures]:
    del strict
    return [
        await run_two_bots(lab, hs, messages=10),
        await run_hostile_bodies(lab, hs),
        await run_poisoned_event(lab, hs),
    ]


async def hostile_events(lab: FaultLab, hs: SynapseServer, strict: SynapseServer) -> list[Figures]:
    del strict
    return [
        await run_hostile_event(lab, hs, content=content, delivery=delivery)
        for content in HOSTILE_CONTENTS
        for delivery in DELIVERIES
    ]


SCENARIOS: dict[str, Scenario] = {
    "crash": crash,
    "outage": outage,
    "rate_limits": rate_limits,
    "long_rate_limit": long_rate_limit,
    "gap": gap,
    "token": token,
    "hostile_server": hostile_server,
    "backend": backend,
    "graceful": graceful,
    "store": store,
    "restart": restart,
    "security": security,
    "hostile_events": hostile_events,
}


async def run_all(
    names: list[str], hs: SynapseServer, strict: SynapseServer, workdir: Path, seed: int
) -> list[Figures]:
    rows: list[Figures] = []
    for name in names:
        started = time.monotonic()
        print(f"\n=== {name}", flush=True)
        try:
            async with fault_lab(workdir / name, seed) as lab:
                found = await SCENARIOS[name](lab, hs, strict)
        except Exception as exc:  # noqa: BLE001  one scenario failing is news for its row only
            traceback.print_exc()
            found = [Figures(name, notes={"ERROR": f"{type(exc).__name__}: {exc}"[:300]})]
        for figures in found:
            figures.notes["took_s"] = round(time.monotonic() - started)
            figures.show()
        rows.extend(found)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated, of: {', '.join(SCENARIOS)}")
    parser.add_argument("--seed", type=int, default=seed_from_env())
    parser.add_argument("--keep", type=Path, help="keep logs and data in this directory")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")

    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with (
            SynapseServer(workdir / "synapse") as hs,
            SynapseServer(workdir / "strict-synapse", relaxed_rate_limits=False) as strict,
        ):
            rows = trio.run(run_all, names, hs, strict, workdir / "runs", args.seed)
        print(
            f"\nfault scenarios at full size (seed {args.seed}; "
            f"{time.monotonic() - started:.0f} s in all)"
        )
        print(Figures.HEADER)
        for row in rows:
            print(row.row())


if __name__ == "__main__":
    main()
