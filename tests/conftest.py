"""Shared fixtures. A Prefect backend is started only for tests that ask for it.

On an AMD CPU the test process re-executes itself once with the library that lets MKL pick its kernels by the
CPU's features (pipeline.mkl_dispatch), as every `alol` process does: what a test computes in-process then has the
bits of what the `alol` commands, Ray workers and torchrun workers it starts compute.
"""

import os
import sys
import tempfile

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="alol-prefect-home-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from pipeline.mkl_dispatch import preload_environment  # noqa: E402


def pytest_configure(config):
    preloaded = preload_environment(os.environ)
    if preloaded != dict(os.environ):
        capture = config.pluginmanager.getplugin("capturemanager")
        if capture is not None:
            capture.stop_global_capturing()  # the re-executed process writes to the terminal, not to a capture file
        os.execve(sys.executable, sys.orig_argv, preloaded)


@pytest.fixture(scope="session")
def prefect_backend():
    """A Prefect API for flow tests: the one CI started (PREFECT_API_URL), else a temporary test server.
    Heartbeats are off: each costs a second at flow exit."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        if os.environ.get("PREFECT_API_URL"):
            yield
        else:
            with prefect_test_harness(server_startup_timeout=90):
                yield
