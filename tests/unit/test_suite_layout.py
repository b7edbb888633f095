"""The test suite's own layout: pytest imports test modules outside packages by their
basename, so two such modules with one name stop the whole suite from being collected."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_no_two_top_level_test_modules_share_a_basename() -> None:
    by_name: defaultdict[str, list[str]] = defaultdict(list)
    for path in TESTS.rglob("*.py"):
        if path.name == "conftest.py" or (path.parent / "__init__.py").exists():
            continue  # pytest's own, or inside a package: imported by its dotted name
        by_name[path.name].append(str(path.relative_to(TESTS)))

    assert {name: paths for name, paths in by_name.items() if len(paths) > 1} == {}
