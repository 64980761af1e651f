"""The train stage on several machines of a Ray cluster (run.executor: ray, train.nodes > 1).

A placement group of train.nodes bundles (1 CPU and train.gpus_per_node GPUs each), STRICT_SPREAD: one
bundle per node. One launcher actor per bundle; the first picks its node's IP and a free port there for
the rendezvous (its torchrun agent serves the rendezvous store), then each runs on its node

    torchrun --nnodes N --nproc_per_node train.processes --rdzv-backend c10d --rdzv-endpoint IP:PORT
             --rdzv-id KEY -m pipeline.launch ... --inputs ...

(stages.torchrun), given the configuration and the upstream outputs as text (it writes its own files). The
rank-0 process commits the output under the runner's key, so every node needs the run root (object storage,
or a shared file system). The launchers' logs stay on their nodes; a failed node's last lines come back in
the error, and the other launchers are stopped.
"""

from __future__ import annotations

import logging
import socket
import tempfile
from pathlib import Path

from schemas.config import AlolConfig
from stages.executor import ray_session
from stages.torchrun import run_torchrun, torchrun_command

log = logging.getLogger("alol.nodes")

PLACEMENT_SECONDS = 120.0
"""How long the stage waits for the cluster to place one launcher per node before it fails."""


def launch_arguments(folder: Path, config_text: str, inputs_text: str) -> list[str]:
    """pipeline.launch's arguments for training on given upstream outputs, their files written into `folder`."""
    config_file, inputs_file = folder / "config.yaml", folder / "inputs.json"
    config_file.write_text(config_text, encoding="utf-8")
    inputs_file.write_text(inputs_text, encoding="utf-8")
    return ["--profile=", "--config-file", str(config_file), "--inputs", str(inputs_file), "--refresh"]


class _NodeLauncher:
    """A Ray actor on one node: a rendezvous endpoint on it, then torchrun of pipeline.launch there."""

    def endpoint(self) -> str:
        """This node's IP and a port free on it now."""
        host = _node_ip()
        with socket.socket() as probe:
            probe.bind((host, 0))
            return f"{host}:{probe.getsockname()[1]}"

    def launch(
        self, config_text: str, inputs_text: str, processes: int, nodes: int, rendezvous: str, rendezvous_id: str,
        serves_rendezvous: bool,
    ) -> tuple[str, int, str]:
        """(this node's IP, torchrun's exit status, the tail of its log when it failed)."""
        host = _node_ip()
        with tempfile.TemporaryDirectory(prefix="alol-train-node-") as folder:
            command = torchrun_command(
                "pipeline.launch", launch_arguments(Path(folder), config_text, inputs_text), processes, nodes=nodes,
                rendezvous=rendezvous, rendezvous_id=rendezvous_id, local_address=host,
                serves_rendezvous=serves_rendezvous,
            )
            with open(Path(folder) / "torchrun.log", "wb") as out:
                status, tail = run_torchrun(command, log_to=out)
        return host, status, tail


def _node_ip() -> str:
    """This node's address as the cluster knows it (`ray start --node-ip-address`), not a guess from the routes."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    return next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node)


def train_on_ray_nodes(cfg: AlolConfig, config_text: str, inputs_text: str, rendezvous_id: str) -> None:
    """Run pipeline.launch under torchrun on cfg.train.nodes nodes of the cluster at run.ray_address, one launcher
    per node (placement group, STRICT_SPREAD); RuntimeError naming the node when one fails."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    train = cfg.train
    joined = ray_session(cfg.run.ray_address)
    bundle = {"CPU": 1.0, **({"GPU": float(train.gpus_per_node)} if train.gpus_per_node else {})}
    group = placement_group([bundle] * train.nodes, strategy="STRICT_SPREAD")
    launchers = []
    try:
        if not group.wait(PLACEMENT_SECONDS):
            raise RuntimeError(
                f"train.nodes is {train.nodes} but the Ray cluster at {joined} placed no {bundle} on {train.nodes} "
                f"distinct nodes within {PLACEMENT_SECONDS:g} s: add nodes, or lower train.nodes or train.gpus_per_node"
            )
        actor = ray.remote(_NodeLauncher)
        launchers = [
            actor.options(
                num_cpus=1, num_gpus=train.gpus_per_node,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index),
            ).remote()
            for index in range(train.nodes)
        ]
        rendezvous = ray.get(launchers[0].endpoint.remote())
        log.info("train: %d nodes x %d processes, rendezvous at %s", train.nodes, train.processes, rendezvous)
        pending = [
            launcher.launch.remote(
                config_text, inputs_text, train.processes, train.nodes, rendezvous, rendezvous_id, index == 0
            )
            for index, launcher in enumerate(launchers)
        ]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            host, status, tail = ray.get(ready[0])
            if status != 0:
                raise RuntimeError(
                    f"train on {train.nodes} nodes failed: torchrun on node {host} exited with {status}; the end of "
                    f"its log:\n{tail}"
                )
    finally:
        for launcher in launchers:
            ray.kill(launcher)
        remove_placement_group(group)
