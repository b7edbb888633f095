"""Helpers for running the client against a real homeserver (tests, `bot dev`, benchmarks).

Import from the submodules, e.g. ``from matrix_api.testing.synapse import SynapseServer``.
Nothing is re-exported here on purpose: importing ``synapse`` from this package would make
``python -m matrix_api.testing.synapse`` warn that the module was imported before it ran.
"""
