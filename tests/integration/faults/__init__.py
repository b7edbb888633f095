"""Fault scenarios against a real Synapse: the bot as an operator runs it, people, a lying proxy.

* ``harness/``: the machinery. `figures` (sizes, and what a run shows), `bot_process`
  (``python -m bot run``, its logs), `lab` (what a scenario owns and stops; shared
  set-up), `traffic` (people sending, the bot's answers, the final audit), `proxy`
  (the fault-injecting HTTP proxy), `store_view` (a stopped bot's store), `tasks`.
* ``scenarios/``: one module per kind of fault; each ``run_*`` returns its `Figures`.
* ``test_*.py``: one file per scenario module, at the reduced sizes `CI`;
  ``bench/faults.py`` runs the same scenarios at the issue's sizes (`FULL`).

Everything runs under trio with the real clock; the blocking launcher calls (Synapse
start and stop, registration) go through `trio.to_thread`. The Synapse fixtures and the
``synapse`` marker come from ``tests/integration/conftest.py``.
"""
