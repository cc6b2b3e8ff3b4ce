"""Shared test setup: servers on loopback (fixtures/), and a quiet, network-free environment."""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["fixtures.servers", "fixtures.postgres", "fixtures.images"]

# Tests never touch the network: no DVC analytics, no MLflow or torch hub downloads.
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
# OpenMP threads that sleep rather than spin while they wait (read when torch loads, so set before
# any test imports it; subprocesses inherit it): on a CPU shared with other work the default
# spinning made the short training test 5x slower (docs/training.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(autouse=True)
def _no_tracking_env(monkeypatch):
    """A test that wants MLflow points it somewhere explicitly; none inherits the shell's."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
