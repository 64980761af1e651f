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

log = logging.getLogger("alol.torchrun")

RESTARTS = 2
"""How often torchrun starts the workers again after one died, before the stage fails (--max-restarts)."""

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


def run_torchrun(command: list[str], **popen) -> int:
    """Run a torchrun command from the project root in launch_environment(); its exit status. Its log goes to
    this process's stdout and stderr unless `popen` redirects it."""
    log.info("torchrun %s", " ".join(command[3:]))
    return subprocess.run(command, cwd=PROJECT_ROOT, env=launch_environment(), **popen).returncode
