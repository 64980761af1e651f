"""Reward component throughput: rows/s batched (score.batch_size rows per call) versus one row per call.

Rows: the chatterbot-corpus English (prompt, response) pairs, cycled to --rows (10,000). The batched path
scores all of them; the one-row path scores the first --single-rows of them (default 500: one row at a
time through MiniLM would take minutes on 2 cores), and the two are checked to agree on those rows.
Models are loaded and warmed up before timing; the two paths are timed in alternating slices so that a
change in machine load (the CPUs may be shared) falls on both. The batched speed-up of the neural components (toxicity,
relevance) should be at least 5x.

    .venv/bin/python bench/score.py [--rows 10000] [--single-rows 500] [--batch-size 64] [--threads 2] [--rounds 20]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schemas.score import ComponentConfig, ScoreConfig  # noqa: E402
from stages.rewards.tfidf import fit_idf  # noqa: E402
from stages.rewards.scorer import Scorer  # noqa: E402

KINDS = ["toxicity", "relevance", "sentiment", "profanity", "tfidf", "length"]
NEURAL = ("toxicity", "relevance")


def chatterbot_pairs() -> list[tuple[str, str]]:
    folder = Path(importlib.util.find_spec("chatterbot_corpus").submodule_search_locations[0]) / "data" / "english"
    pairs = []
    for path in sorted(folder.glob("*.yml")):
        for turns in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", []):
            pairs += [(str(a), str(b)) for a, b in zip(turns, turns[1:])]
    return pairs


def interleaved_rows_per_s(batched: Scorer, one_row: Scorer, kind: str, prompts, responses, single: int, rounds: int):
    """Rows/s of both paths, timed in alternating slices (batched rows, then one-row rows) so that both see
    the same machine load; returns (batched rows/s, one-row rows/s, batched scores, one-row scores)."""
    batch_edges = np.linspace(0, len(responses), rounds + 1).astype(int)
    single_edges = np.linspace(0, single, rounds + 1).astype(int)
    scores, single_scores = np.empty(len(responses)), np.empty(single)
    batched_seconds = single_seconds = 0.0
    for r in range(rounds):
        b0, b1, s0, s1 = batch_edges[r], batch_edges[r + 1], single_edges[r], single_edges[r + 1]
        started = time.perf_counter()
        scores[b0:b1] = batched.score_component(kind, prompts[b0:b1], responses[b0:b1])
        batched_seconds += time.perf_counter() - started
        started = time.perf_counter()
        single_scores[s0:s1] = one_row.score_component(kind, prompts[s0:s1], responses[s0:s1])
        single_seconds += time.perf_counter() - started
    return len(responses) / batched_seconds, single / single_seconds, scores, single_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--single-rows", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20, help="alternating timing slices per component")
    parser.add_argument("--kinds", nargs="+", default=KINDS, choices=KINDS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pairs = chatterbot_pairs()
    rows = [pairs[i % len(pairs)] for i in range(args.rows)]
    prompts = [[{"role": "user", "content": p}] for p, _ in rows]
    responses = [r for _, r in rows]
    single = min(args.single_rows, args.rows)
    components = [ComponentConfig(name=kind, kind=kind) for kind in args.kinds]
    states = {"tfidf": fit_idf(r for _, r in pairs)}
    batched = Scorer(ScoreConfig(components=components, batch_size=args.batch_size, device="cpu"), states)
    one_row = Scorer(ScoreConfig(components=components, batch_size=1, device="cpu"), states)

    print(f"{args.rows} rows ({len(pairs)} distinct chatterbot pairs, cycled), batch size {args.batch_size}, "
          f"{args.threads} torch threads; one-row path timed on the first {single} rows; the two paths are timed "
          f"in {args.rounds} alternating slices; load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'component':<10} {'load s':>7} {'batched rows/s':>15} {'one-row rows/s':>15} {'speed-up':>9} {'max |diff|':>11}")
    speedups = {}
    for kind in args.kinds:
        started = time.perf_counter()
        batched.score_component(kind, prompts[: args.batch_size], responses[: args.batch_size])  # load + warm up
        load_seconds = time.perf_counter() - started
        fast, slow, scores, single_scores = interleaved_rows_per_s(
            batched, one_row, kind, prompts, responses, single, args.rounds
        )
        speedups[kind] = fast / slow
        diff = float(np.abs(scores[:single] - single_scores).max())
        print(f"{kind:<10} {load_seconds:7.2f} {fast:15.1f} {slow:15.1f} {fast / slow:8.1f}x {diff:11.2e}")
    for kind in NEURAL:
        if kind in speedups:
            verdict = "meets" if speedups[kind] >= 5 else "MISSES"
            print(f"{kind}: batched speed-up {speedups[kind]:.1f}x {verdict} the 5x target")


if __name__ == "__main__":
    main()
