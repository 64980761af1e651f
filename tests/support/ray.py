"""A real Ray cluster for the executor tests: `ray start --head --block` on 127.0.0.1 with 2 CPUs at free ports.

`ray stop` would stop every Ray process of this machine (other test runs' too), so the cluster is
started in a session of its own and stopped by its process group (SIGTERM, then SIGKILL): the head
process, its raylet, GCS and workers, and nothing else. `ray_cluster` (a module fixture) yields the
cluster's address; the driver of the tests joins it through `run.ray_address` and is disconnected
again (ray.shutdown) before the cluster stops.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.s3 import free_port

RAY = str(Path(sys.executable).with_name("ray"))


def _ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


@contextmanager
def ray_head(log: Path, cpus: int = 2, startup_seconds: float = 120.0) -> Iterator[str]:
    """Start a Ray head on 127.0.0.1; yields its GCS address (`127.0.0.1:port`); stops its process group."""
    port, agent, agent_grpc, runtime_env, metrics, node_manager, object_manager = _ports(7)
    temp = tempfile.mkdtemp(prefix="alol-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    command = [
        RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
        "--num-cpus", str(cpus), "--num-gpus", "0", "--include-dashboard=false", "--disable-usage-stats",
        "--dashboard-agent-listen-port", str(agent),
        "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(runtime_env),
        "--metrics-export-port", str(metrics), "--node-manager-port", str(node_manager),
        "--object-manager-port", str(object_manager), "--object-store-memory", str(200 * 2**20), "--temp-dir", temp,
    ]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": os.pathsep.join(sys.path)}
    address = f"127.0.0.1:{port}"
    with open(log, "wb") as out:
        head = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + startup_seconds
        while b"Ray runtime started" not in log.read_bytes():
            if head.poll() is not None:
                raise RuntimeError(f"ray start exited with {head.returncode}: {log.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"ray start did not come up within {startup_seconds} s: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.5)
        yield address
    finally:
        _disconnect()
        _stop_group(head)
        shutil.rmtree(temp, ignore_errors=True)


def _disconnect() -> None:
    if "ray" in sys.modules:
        import ray

        ray.shutdown()


def _stop_group(head: subprocess.Popen) -> None:
    try:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    try:
        os.killpg(head.pid, signal.SIGKILL)  # workers left behind by the head
    except ProcessLookupError:
        pass
    head.wait()


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory) -> Iterator[str]:
    with ray_head(tmp_path_factory.mktemp("ray") / "ray.log") as address:
        yield address
