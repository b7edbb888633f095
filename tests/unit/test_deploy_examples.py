"""The deployment examples in deploy/: the systemd unit passes `systemd-analyze verify`
(when the tool is there) and keeps its hardening; both it and the Containerfile name
the real entry point, a real subcommand, the real sources and settings the bot reads.
The container image is not built here: base images cannot be fetched on this machine.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import pytest

from bot.__main__ import EXIT_CONFIG, EXIT_DEPOSED, EXIT_STORE, _parser
from bot.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "surfaces-bot.service"
CONTAINERFILE = ROOT / "deploy" / "Containerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
(SCRIPT,) = PYPROJECT["project"]["scripts"]  # surfaces-bot = "bot.__main__:main"
REQUIRED = {
    "MATRIX_HOMESERVER": "https://matrix.example.org",
    "MATRIX_USER_ID": "@bot:example.org",
    "MATRIX_PASSWORD": "a password",
}


def unit_settings() -> dict[str, list[str]]:
    """The unit's ``Key=value`` lines (comments left out), every value of each key."""
    values: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def settings_from(environment: dict[str, str]) -> Settings:
    """What the bot makes of ``environment`` (with credentials): each name it does not
    know would be ignored, so the test checks the values it should have taken."""
    return load_settings(None, {**REQUIRED, **environment})


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here: the unit is not verified")
    # The unit's ExecStart is the installed bot; here, this virtualenv's (verify checks
    # that the program exists and is executable).
    installed = Path(sys.executable).parent / SCRIPT
    assert installed.exists(), f"{installed}: install the project (pip install -e .)"
    text = UNIT.read_text().replace(f"/opt/surfaces-bot/bin/{SCRIPT}", str(installed))
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    done = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    # Unknown keys and bad values are warnings on stderr with exit code 0: none either.
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_the_unit_keeps_its_hardening_and_names_the_real_command_and_settings() -> None:
    unit = unit_settings()
    for key, value in {
        "DynamicUser": "yes",
        "StateDirectory": "surfaces-bot",
        "StateDirectoryMode": "0700",
        "UMask": "0077",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "RestrictNamespaces": "yes",
        "SystemCallArchitectures": "native",
    }.items():
        assert unit.get(key) == [value], key

    (exec_start,) = unit["ExecStart"]
    program, *arguments = shlex.split(exec_start)
    assert PurePosixPath(program).name == SCRIPT
    assert _parser().parse_args(arguments).command == "run"

    environment = dict(line.partition("=")[::2] for line in unit["Environment"])
    settings = settings_from(environment)
    # The store is in the state directory (the only place the service may write).
    assert settings.store_path == Path("/var/lib/surfaces-bot/store.sqlite3")
    assert settings.store_path.parent.name == unit["StateDirectory"][0]
    assert settings.log_format == "json"
    # A configuration or store error does not fix itself by restarting.
    assert unit["RestartPreventExitStatus"] == [f"{EXIT_CONFIG} {EXIT_STORE} {EXIT_DEPOSED}"]
    # SIGTERM drains within the drain deadline; the unit waits longer than that.
    (stop,) = unit["TimeoutStopSec"]
    assert int(stop) > settings.drain_timeout_s


def instructions() -> list[tuple[str, str]]:
    """The Containerfile's instructions (continuation lines joined), in order."""
    joined = re.sub(r"\\\n\s*", " ", CONTAINERFILE.read_text())
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def test_the_containerfile_names_the_real_entry_point_sources_and_settings() -> None:
    steps = instructions()
    (entrypoint,) = [json.loads(rest) for word, rest in steps if word == "ENTRYPOINT"]
    (cmd,) = [json.loads(rest) for word, rest in steps if word == "CMD"]
    # The console script of the virtualenv the build stage makes and installs into.
    venv = str(PurePosixPath(entrypoint[0]).parent.parent)
    assert entrypoint == [f"{venv}/bin/{SCRIPT}"]
    runs = " ".join(rest for word, rest in steps if word == "RUN")
    assert f"python -m venv {venv}" in runs
    assert f"{venv}/bin/pip install" in runs
    assert ("COPY", f"--from=build {venv} {venv}") in steps
    assert _parser().parse_args(cmd).command == "run"
    # The health check is the CLI's own `status`, asking the listener the image turns on.
    (healthcheck,) = [rest for word, rest in steps if word == "HEALTHCHECK"]
    check = json.loads(healthcheck[healthcheck.index("CMD ") + 4 :])
    assert check[0] == entrypoint[0]
    assert _parser().parse_args(check[1:]).command == "status"

    # Every source the package build needs is copied from the repository, and exists.
    sources = {
        source
        for word, rest in steps
        if word == "COPY" and not rest.startswith("--from")
        for source in rest.split()[:-1]
    }
    packages = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    needed = {p.rstrip("*") for p in packages} | {"pyproject.toml", PYPROJECT["project"]["readme"]}
    assert needed <= sources
    for source in sources:
        assert (ROOT / source).exists(), source

    # The image's settings are ones the bot reads, with the values intended.
    (env,) = [rest for word, rest in steps if word == "ENV"]
    environment = dict(item.partition("=")[::2] for item in shlex.split(env))
    settings = settings_from(environment)
    (volume,) = [rest for word, rest in steps if word == "VOLUME"]
    assert settings.store_path == Path(volume) / "store.sqlite3"
    assert settings.log_format == "json"
    assert settings.http_listen == ("127.0.0.1", 9464)  # loopback: inside the container only
    assert environment["PYTHONUNBUFFERED"] == "1"  # a log line leaves when it is written

    # Not root, and a stop signal that drains.
    (user,) = [rest for word, rest in steps if word == "USER"]
    assert user.split(":")[0] not in ("0", "root")
    assert ("STOPSIGNAL", "SIGTERM") in steps
    # The base image's Python is one the project supports.
    for word, rest in steps:
        if word == "FROM":
            version = re.search(r"python:(\d+)\.(\d+)", rest)
            assert version is not None, rest
            wanted = re.fullmatch(r">=(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"])
            assert wanted is not None
            assert tuple(map(int, version.groups())) >= tuple(map(int, wanted.groups()))
