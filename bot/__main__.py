"""``python -m bot``: the command line.

    python -m bot run [--config PATH]

Exit codes: 0 after a graceful stop, 2 for invalid configuration, 3 for a store
that cannot be used, 4 for any other fatal error (bad credentials, homeserver
unreachable at start).
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import structlog
import trio

from .config import ConfigError, Settings, load_settings
from .logging import configure_logging
from .runtime import FatalError, run_bot
from .store import StoreError

log = structlog.get_logger("bot")

E = TypeVar("E", bound=BaseException)

EXIT_CONFIG = 2
EXIT_STORE = 3
EXIT_FATAL = 4


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bot", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the bot until SIGINT/SIGTERM")
    run.add_argument("--config", type=Path, help="TOML settings file (the environment wins)")
    return parser


async def _serve(settings: Settings) -> None:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals, stop, nursery.cancel_scope)
        await run_bot(settings, stop=stop)
        nursery.cancel_scope.cancel()


async def _watch_signals(stop: trio.Event, scope: trio.CancelScope) -> None:
    """First SIGINT/SIGTERM: drain and stop. A second one: stop now."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if not stop.is_set():
                log.info("stop_requested", signal=name)
                stop.set()
            else:
                log.warning("stop_forced", signal=name)
                scope.cancel()


def _leaves(group: BaseExceptionGroup[E]) -> list[E]:
    """The errors in ``group`` and its nested groups (one per nursery level)."""
    found: list[E] = []
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            found.extend(_leaves(error))
        else:
            found.append(error)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.log_level, settings.log_format)
    exit_code = 0
    try:
        trio.run(_serve, settings)
    except* StoreError as store_errors:
        for store_error in _leaves(store_errors):
            log.error("store_unusable", error=str(store_error))
        exit_code = EXIT_STORE
    except* FatalError as fatal_errors:
        for fatal in _leaves(fatal_errors):
            log.error("fatal", error=str(fatal))
        exit_code = EXIT_FATAL
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
