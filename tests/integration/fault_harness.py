"""Moved: the fault harness is the package ``tests/integration/faults/`` now.

What is left here only keeps ``test_bot_backends.py`` (which imports these four names
from ``fault_harness``) working until its imports name the package's modules instead.
Add nothing here.
"""

from __future__ import annotations

from faults.harness.bot_process import BotProcess
from faults.harness.lab import FaultLab, fault_lab
from faults.harness.store_view import read_store

__all__ = ["BotProcess", "FaultLab", "fault_lab", "read_store"]
