"""The fault tests' own fixture: a `FaultLab` per test.

The Synapse fixtures (``synapse``, ``strict_synapse``) and the ``synapse`` marker come
from ``tests/integration/conftest.py``, one level up.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from faults.harness.lab import FaultLab, fault_lab


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[FaultLab]:
    """A lab that stops what the test started, then checks the bots' logs for leaked
    secrets and stray (non-JSON) output."""
    async with fault_lab(tmp_path) as lab:
        yield lab
