"""Running the real Prefect services of `alol up` in a test: the environment, commands, stopping by PID.

Shared by the end-to-end tests (tests/test_deployments.py, tests/test_ui.py): each starts its own
server and workers on free ports under a temporary PREFECT_HOME and stops them by PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from pipeline import services as alol_services

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).parent / "prefect")


def prefect_env(home: Path) -> dict[str, str]:
    """This process's environment for Prefect commands on `home`: no API URL yet (`alol up` prints
    it), nothing of a flow run this process may be part of, wide tables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT__")}
    env.update(PREFECT_HOME=str(home), COLUMNS="200", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    return env


def run(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, f"`{' '.join(done.args)}` exited {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}"
    return done.stdout


def alol(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "pipeline.cli", *args], env, timeout)


def stop_all(home: Path, env: dict[str, str]) -> list[int]:
    """`alol down`; then SIGKILL, by PID, anything it left. Returns the PIDs that were still alive."""
    services = alol_services.Services.load(home)
    pids = services.pids() if services else []
    alol(["down", "--home", str(home)], env, timeout=180)
    left = [pid for pid in pids if alol_services._alive(pid)]
    for pid in left:
        os.killpg(pid, signal.SIGKILL)
    return left
