"""Where a stage finds what another stage produced: model folders, file names, the scorer, the prompt key.

Stages never spell another stage's folder or file names: they ask here, with the upstream
`StageReader` the runner handed them (the Kedro lesson: one catalog, no paths in the logic).
Metrics are read through `StageReader.metrics` (typed, schemas.stages.STAGE_METRICS).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from schemas.base import canonical_json, sha256_text
from schemas.config import AlolConfig
from stages.io import StageReader
from stages.models.store import ModelNotFoundError, model_fingerprint, resolve_model
from stages.rewards import COMPONENTS
from stages.rewards.scorer import Scorer

SCORER_STATE = "scorer_state.json"
"""score: the state each fitted component learnt from the training responses (e.g. the tf-idf vocabulary)."""
PI_REF_FOLDER = "pi_ref"
"""reference: the fine-tuned pi_ref (a transformers folder) when reference.sft_epochs > 0."""
VALUE_HEAD_FILE = "value_head.safetensors"
"""reference: the value head's weights."""
PI_REF_RESPONSES_TABLE = "pi_ref_responses"
"""reference: pi_ref's greedy responses to the training prompts, the second response of built pairs."""
PI_REF_ID_SUFFIX = ":pi_ref"
"""reference: a row of PI_REF_RESPONSES_TABLE has the id of the dataset row it is paired with plus this suffix."""
POLICY_FOLDER = "policy"
"""train: the kept checkpoint (a transformers folder, LoRA merged) when it beat pi_ref on validation."""
EVAL_METRICS_FILE = "metrics.json"
"""evaluate: its metrics as a file for people (the manifest holds the same, typed)."""
REPORT_FILE = "report.md"
"""evaluate: the Markdown report."""
METRICS_TABLE_FILE = "metrics_table.json"
"""evaluate: the summary rows of the report, for a table artifact."""


def prompt_key(prompt: Sequence[dict[str, str]]) -> str:
    """A stable id of a prompt (its messages' canonical JSON), so equal prompts share one value target
    and one evaluation row."""
    return sha256_text(canonical_json([{"role": m["role"], "content": m["content"]} for m in prompt]))[:32]


def reference_model_path(cfg: AlolConfig, reference: StageReader) -> Path:
    """pi_ref: the fine-tuned folder inside the reference output when it fine-tuned one, else the base model."""
    if reference.metrics.pi_ref == "sft":
        folder = reference.path(PI_REF_FOLDER)
        if not (folder / "config.json").is_file():
            raise ModelNotFoundError(f"{folder}: the reference output says pi_ref was fine-tuned but holds no model")
        return folder
    return resolve_model(cfg.reference.model, cfg.run.cache_dir)


def reference_model_inputs(cfg: AlolConfig) -> dict[str, str]:
    """The digest of reference.model's files when it is a local folder (stages.models.store.model_fingerprint),
    for the cache keys of reference, train and evaluate (pipeline.runner.STAGES: the latter two load it as
    pi_ref when reference.sft_epochs is 0)."""
    return model_fingerprint(cfg.reference.model)


def policy_is_reference(train: StageReader) -> bool:
    """Whether no checkpoint beat pi_ref on validation, so that the policy is pi_ref."""
    return train.metrics.policy_is_reference


def policy_model_path(cfg: AlolConfig, train: StageReader, reference: StageReader) -> Path:
    """The trained policy's folder, or pi_ref's when no checkpoint beat it."""
    if policy_is_reference(train):
        return reference_model_path(cfg, reference)
    folder = train.path(POLICY_FOLDER)
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"{folder}: the train output says a checkpoint beat pi_ref but holds no policy folder")
    return folder


def load_scorer(cfg: AlolConfig, score: StageReader) -> Scorer:
    """The Scorer of `cfg.score` with the state the score stage fitted."""
    path = score.path(SCORER_STATE)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the score stage output has no {SCORER_STATE}; rerun the score stage")
    states = json.loads(path.read_text(encoding="utf-8"))["components"]
    missing = [c.name for c in cfg.score.components if COMPONENTS[c.kind].fitted and states.get(c.name) is None]
    if missing:
        raise ValueError(
            f"{path}: no fitted state for components {missing}; the score stage ran with another score config, rerun it"
        )
    return Scorer(cfg.score, states)
