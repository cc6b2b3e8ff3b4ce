"""Shared test setup: servers on loopback (fixtures/), and a quiet, network-free environment."""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["fixtures.servers", "fixtures.postgres"]

# Tests never touch the network: no DVC analytics, no MLflow or torch hub downloads.
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


@pytest.fixture(autouse=True)
def _no_tracking_env(monkeypatch):
    """A test that wants MLflow points it somewhere explicitly; none inherits the shell's."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
