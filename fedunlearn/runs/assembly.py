"""The pieces every job wires into the round loop, in one place for the runner, the ServerApp, the
benchmarks and the tests."""

from __future__ import annotations

from fedunlearn.fl.rounds import ServerPlugins
from fedunlearn.privacy.upload_attack import upload_view
from fedunlearn.unlearning.methods import load_methods


def server_plugins() -> ServerPlugins:
    """Every registered unlearning method, and the audit's upload-structure reading."""
    return ServerPlugins(load_methods(), upload_view)
