"""`alol up` / `alol down`: a local Prefect server, work pools, deployments and workers.

`up` starts `prefect server start` on 127.0.0.1, waits for /api/health, creates the missing work
pools as process pools, runs `prefect --no-prompt deploy --all` from the repository root and starts
one worker per process pool from this interpreter's environment. Every process is a session leader
whose PID is written to `<home>/alol-services.json`; `down` stops the workers first, then the
server: SIGTERM, a grace period, then SIGKILL of the process group.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import WorkPoolStatus
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings

from pipeline.routing import FLOW_NAME

log = logging.getLogger("alol.services")

DEFAULT_HOME = ".alol/prefect-home"
DEFAULT_PORT = 4200
SERVICES_FILE = "alol-services.json"
HEALTH_TIMEOUT_S = 120.0
WORKER_READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 30.0


class DeployError(RuntimeError):
    """Starting or stopping the local Prefect services failed; the message says what to do."""




@dataclass
class Services:
    """What `up` started, saved as JSON in the Prefect home so `down` finds the PIDs."""

    home: str
    api_url: str
    server_pid: int | None = None
    workers: dict[str, int] = field(default_factory=dict)  # pool -> pid
    deployments: list[str] = field(default_factory=list)

    @staticmethod
    def path_in(home: Path) -> Path:
        return home / SERVICES_FILE

    def save(self) -> None:
        Services.path_in(Path(self.home)).write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")

    @staticmethod
    def load(home: Path) -> Services | None:
        path = Services.path_in(home)
        return Services(**json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None

    def pids(self) -> list[int]:
        return [*self.workers.values(), *([self.server_pid] if self.server_pid else [])]


def deployment_pools(prefect_yaml: Path) -> dict[str, str]:
    """Deployment name (`alol/<name>`) -> work pool name, as prefect.yaml declares them."""
    spec = yaml.safe_load(prefect_yaml.read_text(encoding="utf-8"))
    pools = {}
    for i, deployment in enumerate(spec.get("deployments") or []):
        pool = (deployment.get("work_pool") or {}).get("name")
        if not pool:
            raise DeployError(f"{prefect_yaml}: deployments[{i}] ({deployment.get('name')}) has no work_pool.name")
        pools[f"{FLOW_NAME}/{deployment['name']}"] = pool
    return pools


def _project_dir(project: str | Path | None) -> Path:
    folder = Path(project or Path.cwd()).resolve()
    if not (folder / "prefect.yaml").is_file():
        raise DeployError(f"no prefect.yaml in {folder}: run this from the alol repository root")
    return folder


def _prefect_executable() -> str:
    """The `prefect` script of this interpreter's environment (workers run flows with its python)."""
    exe = Path(sys.executable).parent / "prefect"
    if not exe.is_file():
        raise DeployError(f"{exe} not found: install the project into this environment (make setup)")
    return str(exe)


def _prefect_env(home: Path, api_url: str, project: Path) -> dict[str, str]:
    """Environment of every Prefect process `up` starts: the API URL is always set (else the CLI
    talks to a temporary server of its own), PREFECT_HOME absolute, wide tables, PWD for prefect.yaml."""
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        COLUMNS="200",
        PWD=str(project),
    )
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _spawn(args: list[str], log_path: Path, env: dict[str, str], cwd: Path) -> int:
    """Start a long-running Prefect process in its own session (so it can be stopped as a group)."""
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            args, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd, start_new_session=True
        )
    return proc.pid


def _run_prefect(args: list[str], env: dict[str, str], cwd: Path) -> str:
    done = subprocess.run([_prefect_executable(), *args], env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip()[-3000:]
        raise DeployError(f"`prefect {' '.join(args)}` failed (exit {done.returncode}):\n{tail}")
    return done.stdout


def _log_tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(encoding="utf-8", errors="replace")[-chars:] if path.is_file() else ""


def _alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return False
    try:  # no /proc (macOS)
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_prefect_process(pid: int) -> bool:
    """Guard against a recycled PID: only stop processes whose command line names prefect."""
    try:
        return b"prefect" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").exists() and _alive(pid)


def _wait_healthy(api_url: str, server_pid: int, log_path: Path) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while time.monotonic() < deadline:
        if not _alive(server_pid):
            raise DeployError(f"the Prefect server exited during start-up; {log_path} ends with:\n{_log_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    raise DeployError(f"the Prefect server did not answer {api_url}/health within {HEALTH_TIMEOUT_S:.0f} s; see {log_path}")


def _ensure_pools(pools: set[str]) -> dict[str, str]:
    """Create the missing pools as process pools; returns pool name -> type (existing pools keep theirs)."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    types = {}
    with get_client(sync_client=True) as client:
        for pool in sorted(pools):
            try:
                types[pool] = client.read_work_pool(pool).type
            except ObjectNotFound:
                template = ProcessWorker.get_default_base_job_template()
                client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))
                types[pool] = "process"
    return types


def _wait_workers_ready(workers: dict[str, int], home: Path) -> None:
    """Wait until every pool reports READY (a worker of it has sent a heartbeat)."""
    deadline = time.monotonic() + WORKER_READY_TIMEOUT_S
    pending = set(workers)
    with get_client(sync_client=True) as client:
        while pending and time.monotonic() < deadline:
            for pool in sorted(pending):
                if not _alive(workers[pool]):
                    log_path = home / f"worker-{pool}.log"
                    raise DeployError(f"the worker of pool {pool} exited; {log_path} ends with:\n{_log_tail(log_path)}")
                if client.read_work_pool(pool).status == WorkPoolStatus.READY:
                    pending.discard(pool)
            time.sleep(0.25)
    if pending:
        raise DeployError(f"no worker of pool(s) {sorted(pending)} came online within {WORKER_READY_TIMEOUT_S:.0f} s; see {home}/worker-*.log")


def up(home: str | Path = DEFAULT_HOME, port: int = DEFAULT_PORT, project: str | Path | None = None) -> Services:
    """Start the server on 127.0.0.1:`port` (0: a free port), create the work pools, deploy
    everything in prefect.yaml and start one worker per process pool. On any failure, stop what
    was started and raise."""
    project = _project_dir(project)
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    previous = Services.load(home)
    if previous and any(_alive(pid) for pid in previous.pids()):
        raise DeployError(f"alol services from {home} are already running (pids {previous.pids()}); stop them with `alol down --home {home}`")
    port = port or free_port()
    if _port_in_use(port):
        raise DeployError(f"127.0.0.1:{port} is already in use: stop what listens there, or pass --port 0 for a free port")
    services = Services(home=str(home), api_url=f"http://127.0.0.1:{port}/api")
    with temporary_settings(updates={PREFECT_API_URL: services.api_url}):
        try:
            _start(services, project, port)
        except BaseException:
            down(home)
            raise
    return services


def _start(services: Services, project: Path, port: int) -> None:
    home = Path(services.home)
    env = _prefect_env(home, services.api_url, project)
    prefect = _prefect_executable()
    started = time.monotonic()
    server_log = home / "server.log"
    services.server_pid = _spawn([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], server_log, env, project)
    services.save()
    _wait_healthy(services.api_url, services.server_pid, server_log)
    log.info("Prefect server healthy at %s after %.1f s (pid %d)", services.api_url, time.monotonic() - started, services.server_pid)

    started = time.monotonic()
    pools = deployment_pools(project / "prefect.yaml")
    pool_types = _ensure_pools(set(pools.values()))
    _run_prefect(["--no-prompt", "deploy", "--all"], env, project)
    services.deployments = sorted(pools)
    services.save()
    log.info("work pools %s; deployed %s in %.1f s", ", ".join(sorted(pool_types)), ", ".join(services.deployments), time.monotonic() - started)

    started = time.monotonic()
    for pool in sorted(pool_types):
        if pool_types[pool] != "process":
            log.warning("pool %s is a %s pool: its workers run elsewhere, none started here", pool, pool_types[pool])
            continue
        worker = [prefect, "worker", "start", "--pool", pool, "--limit", "1", "--name", f"{pool}-{os.uname().nodename}"]
        services.workers[pool] = _spawn(worker, home / f"worker-{pool}.log", env, project)
        services.save()
    _wait_workers_ready(services.workers, home)
    log.info("workers online after %.1f s: %s", time.monotonic() - started, ", ".join(f"{p} (pid {pid})" for p, pid in services.workers.items()))


def _stop(pid: int, what: str) -> str:
    """SIGTERM, wait up to STOP_GRACE_S, then SIGKILL; finally end what is left of its process group
    (flow-run processes of a worker, server services)."""
    if not _alive(pid) or not _is_prefect_process(pid):
        return f"{what} (pid {pid}) was not running"
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    outcome = "stopped"
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
        outcome = f"killed after {STOP_GRACE_S:.0f} s"
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return f"{what} (pid {pid}) {outcome}"


def down(home: str | Path = DEFAULT_HOME) -> list[str]:
    """Stop what `up` started from `home`, workers first, then the server. Returns one line each."""
    home = Path(home).resolve()
    services = Services.load(home)
    if services is None:
        return [f"nothing to stop: no {SERVICES_FILE} in {home}"]
    lines = [_stop(pid, f"worker {pool}") for pool, pid in services.workers.items()]
    if services.server_pid:
        lines.append(_stop(services.server_pid, "server"))
    Services.path_in(home).unlink()
    return lines


def summary(services: Services) -> str:
    """What `alol up` prints: where things run and the line that points Prefect commands at the server."""
    home = Path(services.home)
    ui = services.api_url.removesuffix("/api")
    lines = [f"Prefect server  {ui}  (pid {services.server_pid}, log {home / 'server.log'})"]
    lines += [f"worker {pool}  (pid {pid}, log {home / f'worker-{pool}.log'})" for pool, pid in services.workers.items()]
    lines += [f"deployments  {', '.join(services.deployments)}", "", "Point Prefect commands at this server:"]
    down_args = "" if home == Path(DEFAULT_HOME).resolve() else f" --home {home}"
    lines += [f"  export PREFECT_API_URL={services.api_url}", f"Stop everything with: alol down{down_args}"]
    return "\n".join(lines)
