"""A module run on several processes with torchrun: the one command and environment that the train stage's
launch (pipeline.runner, pipeline.nodes) and the reference stage's SFT of pi_ref (stages.reference.sft_processes)
both use.

One machine: `torchrun --standalone --nproc_per_node P -m MODULE ARGS`. Several machines, the same command on
each: `torchrun --nnodes N --nproc_per_node P --rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id ID
-m MODULE ARGS`, where HOST:PORT is on the first machine (its agent serves the rendezvous store there) and
ID is the same on all of them.

A worker that dies (killed, out of memory) makes torchrun stop the others and start them all again, up to
RESTARTS times: training resumes from its last checkpoint (stages.train.resume), so the output is the
same; the SFT of pi_ref starts again from the base model, the same steps again.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger("alol.torchrun")

RESTARTS = 2
"""How often torchrun starts the workers again after one died, before the stage fails (--max-restarts)."""

LOG_TAIL = 3000
"""How much of the end of a failed launch's log its error carries (characters)."""

PROJECT_ROOT = Path(__file__).resolve().parent.parent
"""Where the launched processes start, and what goes first on their PYTHONPATH (this checkout's modules)."""


def torchrun_command(
    module: str, arguments: list[str], processes: int, *, nodes: int = 1, rendezvous: str | None = None,
    rendezvous_id: str = "alol", local_address: str | None = None, serves_rendezvous: bool | None = None,
) -> list[str]:
    """The torchrun command running `python -m module *arguments` on `processes` processes of this machine, one
    of `nodes` machines meeting at `rendezvous` (host:port; None: this machine alone, --standalone).
    `local_address`: the address the other machines reach this one at (default: torchrun's look-up of its name).
    `serves_rendezvous`: whether this machine's agent serves the rendezvous store (default: torchrun's guess,
    true when the endpoint's host names this machine)."""
    launcher = [sys.executable, "-m", "torch.distributed.run"]
    if rendezvous is None:
        if nodes != 1:
            raise ValueError(f"{nodes} nodes need a rendezvous endpoint (host:port)")
        launcher.append("--standalone")
    else:
        launcher += [
            "--nnodes", str(nodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", rendezvous, "--rdzv-id", rendezvous_id,
        ]
        if local_address:
            launcher += ["--local-addr", local_address]
        if serves_rendezvous is not None:
            launcher += ["--rdzv-conf", f"is_host={str(serves_rendezvous).lower()}"]
    return [*launcher, "--nproc_per_node", str(processes), "--max-restarts", str(RESTARTS), "-m", module, *arguments]


def launch_environment() -> dict[str, str]:
    """This process's environment, with this checkout first on PYTHONPATH and one OpenMP thread per process
    unless OMP_NUM_THREADS says otherwise (several processes share the machine's cores)."""
    paths = [str(PROJECT_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def run_torchrun(command: list[str], log_to: BinaryIO | None = None) -> tuple[int, str]:
    """Run a torchrun command from the project root in launch_environment(): (its exit status, the last
    LOG_TAIL characters of its log when it failed, "" when it succeeded). Its log (stdout and stderr together,
    torchrun's failure summary last) goes to `log_to` as it comes, this process's stderr by default, so that
    the error a caller raises can name the cause instead of pointing at a log a wrapper may have cut."""
    log.info("torchrun %s", " ".join(command[3:]))
    tail = bytearray()
    process = subprocess.Popen(
        command, cwd=PROJECT_ROOT, env=launch_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    sink = log_to or open(2, "wb", closefd=False)  # file descriptor 2, where the launch's log went before
    with process:
        assert process.stdout is not None
        while chunk := process.stdout.read1(1 << 16):  # chunks, not lines: progress bars end with \r
            sink.write(chunk)
            sink.flush()
            tail = (tail + chunk)[-LOG_TAIL:]
        status = process.wait()
    return status, "" if status == 0 else tail.decode("utf-8", errors="replace")


def init_process_group() -> None:
    """Join the process group of the torchrun launch this process is a worker of (gloo on CPU, NCCL on a GPU,
    this worker's LOCAL_RANK made the current device); nothing outside a launch or when one is joined.

    The group's keys go under a prefix naming this life of the workers (TORCHELASTIC_RESTART_COUNT): the
    agent's store outlives a restart, and a restarted worker reading a dead one's address from it fails to
    connect (gloo: "connectFullMesh failed ... Connection refused"), which on a busy machine used up the
    restarts. Workers call it before accelerate, which then uses the group."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_initialized() or world == 1:
        return
    rank, cuda = int(os.environ["RANK"]), torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)  # else rank 0 serves the store
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=not agent_store and rank == 0,
        timeout=dist.constants.default_pg_timeout,
    )
    life = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(
        "nccl" if cuda else "gloo", store=dist.PrefixStore(f"alol/life-{life}", store), rank=rank, world_size=world
    )


def failure(what: str, status: int, tail: str) -> RuntimeError:
    """The one error for a failed torchrun launch: what failed, torchrun's exit status, the end of its log."""
    return RuntimeError(f"{what} failed (torchrun exited with {status}); the end of its log:\n{tail}")

