"""Developer sessions: `nox -s lint`, `nox -s tests`, `nox -s bench`, `nox -s dev`."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"


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
    session.run("pytest", *(session.posargs or ["tests"]))


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
