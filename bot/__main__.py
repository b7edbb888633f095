"""``python -m bot``: the command line.

    python -m bot run [--config PATH]         run the bot until SIGINT/SIGTERM
    python -m bot dev [--data-dir DIR]        a local Synapse, two accounts, and the bot
    python -m bot reset --local [--yes]       delete the local store
    python -m bot reset --server [--yes]      release every room the bot manages
    python -m bot doctor [--config PATH]      check the set-up; changes nothing
    python -m bot status [--config PATH]      ask the running bot (BOT_HTTP_LISTEN)

Exit codes: 0 success (and a graceful stop), 1 a check or action failed, 2 invalid
configuration, 3 a store that cannot be used, 4 any other fatal error (bad
credentials, homeserver unreachable at start), 5 deposed: another instance took the
store over (without ``BOT_STANDBY``; with it the instance waits as standby again).
``status`` exits 0 when the bot is ready and healthy, 1 when it is not or does not
answer, 2 when no listener is configured (or the configuration is invalid).
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
from .lease import Deposed
from .logging import configure_logging
from .quarantine import failure_reason
from .runtime import FatalError, run_bot
from .session import AuthError
from .store import StoreError

log = structlog.get_logger("bot")

E = TypeVar("E", bound=BaseException)

EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_STORE = 3
EXIT_FATAL = 4
EXIT_DEPOSED = 5


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bot",
        description="surfaces-bot: Matrix rooms as chats with a backend assistant.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the bot until SIGINT/SIGTERM")
    run.add_argument("--config", type=Path, help="TOML settings file (the environment wins)")

    dev = commands.add_parser("dev", help="try the bot on a throwaway local Synapse")
    dev.add_argument("--data-dir", type=Path, default=Path(".surfaces-dev"))

    reset = commands.add_parser("reset", help="start over: local store or server rooms")
    where = reset.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true", help="delete the local store")
    where.add_argument(
        "--server", action="store_true", help="leave and forget every managed room and Space"
    )
    reset.add_argument("--yes", action="store_true", help="act without asking / not a dry run")
    reset.add_argument("--config", type=Path)

    doctor = commands.add_parser("doctor", help="check the set-up without changing anything")
    doctor.add_argument("--config", type=Path)

    status = commands.add_parser(
        "status", help="readiness, health and counters of the running bot (BOT_HTTP_LISTEN)"
    )
    status.add_argument("--config", type=Path)
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


def run_service(settings: Settings) -> int:
    """Run the bot until it is stopped; the process exit code."""
    exit_code = 0
    try:
        trio.run(_serve, settings)
    except* Deposed as deposed:  # before StoreError, which it is
        for error in _leaves(deposed):
            log.error("deposed", error=str(error))
        exit_code = EXIT_DEPOSED
    except* StoreError as store_errors:
        for store_error in _leaves(store_errors):
            log.error("store_unusable", error=str(store_error))
        exit_code = EXIT_STORE
    except* FatalError as fatal_errors:
        for fatal in _leaves(fatal_errors):
            log.error("fatal", error=str(fatal))
        exit_code = EXIT_FATAL
    except* Exception as crashes:
        # A bug: still one structured line (with its traceback) and the fatal exit code.
        for crash in _leaves(crashes):
            log.error("crashed", reason=failure_reason(crash, "bot"), exc_info=crash)
        exit_code = EXIT_FATAL
    return exit_code


def _say(line: str) -> None:
    print(line, flush=True)


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        print(f"{question} Not confirmed (no terminal); pass --yes.", file=sys.stderr)
        return False
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "dev":
        from .dev import run_dev

        configure_logging("info", "console")
        return run_dev(args.data_dir, run_service)

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.log_level, settings.log_format, log_messages=settings.log_messages)

    if args.command == "run":
        return run_service(settings)
    if args.command == "status":
        from .ops.status import run_status

        configure_logging("error", settings.log_format)
        return trio.run(run_status, settings, _say)
    if args.command == "reset" and args.local:
        from .reset import reset_local

        return reset_local(settings.store_path, (lambda _: True) if args.yes else _confirm, _say)
    try:
        if args.command == "reset":
            from .reset import reset_server

            return trio.run(lambda: reset_server(settings, apply=args.yes, say=_say))
        from .doctor import run_doctor

        # The report is the output: the library's info and warning lines (a retried
        # request, a gap filled while reading the server) would only interleave with it.
        configure_logging("error", settings.log_format)
        return trio.run(run_doctor, settings, _say)
    except AuthError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FATAL


if __name__ == "__main__":
    sys.exit(main())
