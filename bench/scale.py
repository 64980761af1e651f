"""Scale-out benchmark: rows/s of the score and reference stages with the local executor and with 1 and 2 Ray
actors, and each actor's peak memory, in one run, with the ratios to the local executor.

A Ray head is started here on 127.0.0.1 with --cpus CPUs (as the tests do: tests/support/ray.py) and
stopped by its process group at the end. Each configuration runs ingest, score and reference from a
fresh cache (the score cache would otherwise answer the second run) on the chatterbot-corpus pairs
with the smoke profile's settings: the default reward components (toxicity, sentiment, relevance,
tf-idf) and SmolLM2-135M-Instruct as pi_ref. Every Ray configuration's `score` and `reference` outputs
are checked against the local run's (same ids in the same order, floats within 1e-5).

rows/s is rows / the map's wall seconds from the driver (the manifests' execution.maps), so it
includes what Ray adds per map: starting the actors and loading each stage's models in each of them.
The local executor runs with --threads torch threads (1: what one actor with 1 CPU gets), so the
ratios compare one process with one and two actors of the same size.
The per-token costs printed last (log-prob tokens/s, decode tokens/s, model load seconds) are the
measured inputs of the README's projection.

    .venv/bin/python bench/scale.py [--rows 96] [--cpus 2] [--batch-rows 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.runner import STAGES, execute_stage  # noqa: E402
from schemas.config import load_config  # noqa: E402
from stages.io import StageReader  # noqa: E402
from stages.models.store import SMOLLM2, load_tokenizer, resolve_model  # noqa: E402
from tests.support.ray import ray_head  # noqa: E402

STAGES_RUN = ("ingest", "score", "reference")
MAPPED = ("score", "reference")


def run_once(tmp: Path, name: str, args, model: Path, ray: dict) -> dict:
    """ingest, score and reference under one executor setting; returns each stage's output and wall seconds."""
    cfg = load_config("smoke", overrides={
        "run.root": str(tmp / name / "runs"), "run.cache_dir": str(tmp / name / "cache"), "run.name": name,
        "data.max_rows_per_split": args.rows, "reference.model": str(model), **ray,
    })
    outputs, seconds = {}, {}
    for stage in STAGES_RUN:
        started = time.perf_counter()
        outputs[stage], _ = execute_stage(cfg, stage, {n: outputs[n] for n in STAGES[stage].upstream})
        seconds[stage] = time.perf_counter() - started
    return {"outputs": outputs, "seconds": seconds}


def stage_figures(run: dict, stage: str) -> dict:
    reader = StageReader(run["outputs"][stage].path)
    maps = reader.manifest.execution.maps
    rows = sum(m.rows for m in maps)
    map_seconds = sum(m.seconds for m in maps)
    workers = [w for m in maps for w in m.workers]
    return {
        "rows": rows, "map_seconds": map_seconds, "rows_per_s": rows / map_seconds,
        "stage_seconds": run["seconds"][stage], "peak_rss_gib": max(w.peak_rss_bytes for w in workers) / 2**30,
        "workers": len({w.worker for w in workers}), "maps": maps, "metrics": reader.metrics,
    }


def same_rows(local: StageReader, other: StageReader, table: str) -> float:
    """Largest |difference| of the float columns; raises if ids, order or any other column differ."""
    a, b = local.read(table), other.read(table)
    key = a.column_names[0]  # id, or prompt_id of value_targets
    assert a.schema == b.schema and a.column(key).to_pylist() == b.column(key).to_pylist(), table
    worst = 0.0
    for name in a.column_names:
        x, y = a.column(name), b.column(name)
        if str(x.type).startswith(("double", "float", "list<item: float")):
            flat = (lambda c: np.concatenate([np.asarray(v, float) for v in c.to_pylist()])) if "list" in str(x.type) else (
                lambda c: np.asarray(c.to_numpy(), float))
            worst = max(worst, float(np.nanmax(np.abs(flat(x) - flat(y)), initial=0.0)))
        else:
            assert x.to_pylist() == y.to_pylist(), f"{table}.{name}"
    assert worst <= 1e-5, f"{table}: floats differ by {worst}"
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=96, help="data.max_rows_per_split (train rows; validation and test are capped too)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the Ray head (one per actor)")
    parser.add_argument("--batch-rows", type=int, default=32, help="run.workers.*.batch_rows: rows per shard")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the local executor (an actor gets 1 CPU)")
    args = parser.parse_args()
    args.load_before = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    model = resolve_model(SMOLLM2, ROOT / "data" / "cache")

    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="alol-scale-") as folder:
        tmp = Path(folder)
        runs["local"] = run_once(tmp, "local", args, model, {})
        with ray_head(tmp / "ray.log", cpus=args.cpus) as address:
            for actors in (1, 2):
                workers = {"actors": actors, "cpus_per_actor": 1, "batch_rows": args.batch_rows}
                ray = {"run.executor": "ray", "run.ray_address": address,
                       **{f"run.workers.{s}": workers for s in ("score", "reference", "evaluate")}}
                runs[f"ray x{actors}"] = run_once(tmp, f"ray{actors}", args, model, ray)
        figures = {name: {s: stage_figures(run, s) for s in MAPPED} for name, run in runs.items()}
        local = {s: StageReader(runs["local"]["outputs"][s].path) for s in MAPPED}
        differences = {
            name: max(same_rows(local[s], StageReader(run["outputs"][s].path), t)
                      for s, tables in (("score", ("score",)), ("reference", ("reference", "value_targets"))) for t in tables)
            for name, run in runs.items() if name != "local"
        }
        report(args, model, runs, figures, differences)


def report(args, model: Path, runs: dict, figures: dict, differences: dict) -> None:
    print(f"\n{args.rows} rows per split cap, shards of {args.batch_rows} rows, Ray head with {args.cpus} CPUs (1 per actor)")
    print(f"{'executor':<10} {'stage':<10} {'rows':>6} {'map s':>8} {'rows/s':>8} {'vs local':>9} {'stage s':>8} "
          f"{'workers':>8} {'peak RSS/worker GiB':>20}")
    for name, stages in figures.items():
        for stage, f in stages.items():
            ratio = f["rows_per_s"] / figures["local"][stage]["rows_per_s"]
            print(f"{name:<10} {stage:<10} {f['rows']:>6} {f['map_seconds']:>8.2f} {f['rows_per_s']:>8.1f} {ratio:>8.2f}x "
                  f"{f['stage_seconds']:>8.2f} {f['workers']:>8} {f['peak_rss_gib']:>20.2f}")
    print("\nlargest float difference from the local outputs:", {k: f"{v:.1e}" for k, v in differences.items()})
    print("\nper map (rows/s):")
    for name, stages in figures.items():
        for stage in MAPPED:
            print(f"  {name:<9} " + ", ".join(f"{m.name}: {m.rows_per_s}" for m in stages[stage]["maps"]))

    reference = figures["local"]["reference"]["metrics"]
    decode = next(m for m in figures["local"]["reference"]["maps"] if "decoding" in m.name)
    tokenizer = load_tokenizer(model)
    responses = StageReader(runs["local"]["outputs"]["reference"].path).read("value_targets").column("response").to_pylist()
    new_tokens = sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) + 1 for r in responses)  # + EOS
    print("\nmeasured per-token costs (local executor, this machine):")
    print(f"  log-prob pass: {reference.logprob_tokens} tokens in {reference.logprob_seconds:.2f} s = "
          f"{reference.logprob_tokens_per_s:.0f} tokens/s (prompt+response tokens)")
    print(f"  value-target decoding: {decode.rows} prompts, about {new_tokens} new tokens in {decode.seconds:.2f} s = "
          f"{new_tokens / decode.seconds:.0f} new tokens/s")
    print("  Ray's fixed cost per map with 1 actor (map seconds - seconds inside the per-shard function: actor start,"
          " model load, transfers):")
    for stage in MAPPED:
        print("    " + ", ".join(f"{m.name}: {m.seconds - m.workers[0].compute_seconds:.1f} s" for m in figures["ray x1"][stage]["maps"]))
    print(f"\nload average (1 min) before / after: {args.load_before:.2f} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
