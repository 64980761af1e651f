"""The stage's own process launcher for training on several processes (torchrun / accelerate).

`[torchrun --nproc_per_node N] python -m pipeline.launch --profile P [--config-file F] [--set k=v ...]`
trains on the upstream outputs recorded in the run's run.json (the docstring of stages/train/__init__.py
has the rules).

`train.processes: N` (N > 1) makes the runner do it itself (`pipeline.runner.train_on_processes`): torchrun --standalone
with N processes on this machine, given the whole configuration and the upstream outputs in files; the
main process commits the output under the key the runner computed, and the runner records it as usual.
`train.nodes: M` (M > 1) does the same on M machines (torchrun --nnodes M with a c10d rendezvous: at
train.rendezvous under the local executor, on the nodes of a Ray placement group under ray, pipeline.nodes);
the command is built once, in stages.torchrun.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from pipeline.runner import (
    STAGES, StageConfig, cache_key, execute_stage, reusable_output, upstream_from_run,
)
from pipeline.storage import RunStore
from schemas.config import load_config
from schemas.manifest import StageOutput
from stages import train as train_stage
from stages.io import StageReader, StageWriter

log = logging.getLogger("alol.launch")


def main(argv: Sequence[str] | None = None) -> None:
    """`[torchrun --nproc_per_node N] python -m pipeline.launch --profile P [--config-file F] [--set k=v ...]`.

    Trains on the upstream outputs recorded in the run's run.json. The main process runs the stage
    through the runner (cache key, atomic commit, run.json); the others train alongside it with a
    scratch output that is discarded. An intact output with the same cache key is reused.
    """
    parser = argparse.ArgumentParser(prog="python -m pipeline.launch", description=main.__doc__)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--config-file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--refresh", action="store_true", help="train even if an output with the same key exists")
    parser.add_argument(
        "--inputs", help="JSON file of the upstream outputs to train on instead of run.json's (train_on_processes); "
        "the output is then not recorded in run.json (its caller records it)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    cfg = load_config(args.profile, args.config_file, args.overrides)
    store = RunStore.of(cfg)
    if args.inputs:
        given = json.loads(Path(args.inputs).read_text(encoding="utf-8"))
        upstream = {name: StageOutput.model_validate(given[name]) for name in STAGES["train"].upstream}
    else:
        upstream = {name: upstream_from_run(store, name) for name in STAGES["train"].upstream}
    rank = int(os.environ.get("RANK", "0"))
    existing = None if args.refresh else reusable_output(store, "train", cache_key(cfg, "train", upstream))
    if existing is not None:
        log.info("train output with this cache key exists: %s (use --refresh to retrain)", existing.path)
        if rank == 0:
            store.record(existing, cached=True, seconds=0.0)
        return
    if rank == 0:
        started = time.perf_counter()
        output, _ = execute_stage(cfg, "train", upstream, refresh=True, store=store)
        if not args.inputs:
            store.record(output, cached=False, seconds=time.perf_counter() - started)
        log.info("train output: %s", output.path)
        return
    readers = {name: StageReader(output.path, verify=False) for name, output in upstream.items()}
    with tempfile.TemporaryDirectory(prefix=f"alol-train-rank{rank}-") as scratch:
        writer = StageWriter(Path(scratch) / "train")
        try:
            train_stage.run(StageConfig(cfg, "train"), readers, writer)
        finally:
            writer.abort()



if __name__ == "__main__":
    main()
