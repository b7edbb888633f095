"""Developer sessions: `nox -s lint`, `nox -s tests`, `nox -s bench`, `nox -s dev`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
E2EE_CLIENT = Path(__file__).parent / "tests" / "e2ee_client"


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff (lint + format check) and strict mypy."""
    session.install("-e", ".[dev]")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Unit, ordering and integration tests; the integration tests run a real Synapse.

    Synapse lives in its own virtualenv (see matrix_api/testing/synapse.py), installed
    once and reused; pass extra pytest arguments after ``--``.
    """
    session.install("-e", ".[dev]")
    session.run("python", "-m", "matrix_api.testing.synapse", "install")
    if not _node_modules_current(E2EE_CLIENT):
        # The E2EE tests' independent client: matrix-js-sdk at the lock file's versions.
        if shutil.which("npm") is None:
            session.error("the E2EE tests need Node >= 20 and npm (tests/e2ee_client)")
        with session.chdir(E2EE_CLIENT):
            session.run("npm", "ci", "--no-audit", "--no-fund", external=True)
    session.run("pytest", *(session.posargs or ["tests"]))


def _node_modules_current(folder: Path) -> bool:
    """Whether ``folder/node_modules`` holds every package at its package-lock.json version."""
    lock = json.loads((folder / "package-lock.json").read_text())
    for path, locked in lock["packages"].items():
        if not path:  # the folder's own package
            continue
        try:
            installed = json.loads((folder / path / "package.json").read_text())["version"]
        except (OSError, ValueError, KeyError):
            if locked.get("optional"):  # another platform's build
                continue
            return False
        if installed != locked.get("version"):
            return False
    return True


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks: each script prints its figures."""
    session.install("-e", ".[dev]")
    for script in session.posargs or ["bench/sync_decode.py"]:
        session.run("python", script)


@nox.session(python=PYTHON)
def fuzz(session: nox.Session) -> None:
    """The pipeline fuzz's long profile (bench/fuzz.py); pass its options after ``--``."""
    session.install("-e", ".[dev]")
    session.run("python", "bench/fuzz.py", *session.posargs)
