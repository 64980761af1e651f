"""Real Ray clusters for the executor and train tests: `ray start --head --block` on 127.0.0.1 with 2 CPUs at free
ports (`ray_cluster`), or a 1-CPU head plus a second 1-CPU node joining it (`ray_two_nodes`).

`ray stop` would stop every Ray process of this machine (other test runs' too), so the cluster is
started in a session of its own and stopped by its process group (SIGTERM, then SIGKILL): the node's
`ray start` process, its raylet (and the head's GCS) and workers, and nothing else. The fixtures (module
scoped) yield the head's address; the driver of the tests joins it through `run.ray_address` and is disconnected
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
    port = free_port()
    address = f"127.0.0.1:{port}"
    with _ray_start(["--head", "--port", str(port), "--include-dashboard=false"], log, cpus, startup_seconds):
        try:
            yield address
        finally:
            _disconnect()


@contextmanager
def ray_node(address: str, log: Path, cpus: int = 1, startup_seconds: float = 120.0) -> Iterator[None]:
    """Start a second Ray node on 127.0.0.1 that joins the head at `address`; stops its process group."""
    with _ray_start(["--address", address], log, cpus, startup_seconds):
        yield


@contextmanager
def _ray_start(role: list[str], log: Path, cpus: int, startup_seconds: float) -> Iterator[None]:
    """`ray start --block` of one node at free ports, in a session of its own, until it says it started."""
    agent, agent_grpc, runtime_env, metrics, node_manager, object_manager = _ports(6)
    temp = tempfile.mkdtemp(prefix="alol-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    command = [
        RAY, "start", *role, "--block", "--node-ip-address", "127.0.0.1",
        "--num-cpus", str(cpus), "--num-gpus", "0", "--disable-usage-stats",
        "--dashboard-agent-listen-port", str(agent),
        "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(runtime_env),
        "--metrics-export-port", str(metrics), "--node-manager-port", str(node_manager),
        "--object-manager-port", str(object_manager), "--object-store-memory", str(200 * 2**20), "--temp-dir", temp,
    ]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": os.pathsep.join(sys.path)}
    with open(log, "wb") as out:
        node = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + startup_seconds
        while b"Ray runtime started" not in log.read_bytes():
            if node.poll() is not None:
                raise RuntimeError(f"ray start exited with {node.returncode}: {log.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"ray start did not come up within {startup_seconds} s: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.5)
        yield
    finally:
        _stop_group(node)
        shutil.rmtree(temp, ignore_errors=True)


def _disconnect() -> None:
    if "ray" in sys.modules:
        import ray

        ray.shutdown()


def _stop_group(node: subprocess.Popen) -> None:
    try:
        os.killpg(node.pid, signal.SIGTERM)
        node.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    try:
        os.killpg(node.pid, signal.SIGKILL)  # workers left behind by the node
    except ProcessLookupError:
        pass
    node.wait()


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory) -> Iterator[str]:
    with ray_head(tmp_path_factory.mktemp("ray") / "ray.log") as address:
        yield address


@pytest.fixture(scope="module")
def ray_two_nodes(tmp_path_factory) -> Iterator[str]:
    """A head and a second node on 127.0.0.1, 1 CPU each (two distinct nodes to Ray); yields the head's address."""
    logs = tmp_path_factory.mktemp("ray-two-nodes")
    with ray_head(logs / "head.log", cpus=1) as address, ray_node(address, logs / "node.log", cpus=1):
        yield address
