"""The stages of the pipeline: their names (the one list) and the metrics model each one writes."""

from __future__ import annotations

from typing import Literal

from schemas.advantage import AdvantageMetrics
from schemas.evaluate import EvaluateMetrics
from schemas.ingest import IngestMetrics
from schemas.manifest import StageMetrics
from schemas.reference import ReferenceMetrics
from schemas.score import ScoreMetrics
from schemas.train import TrainMetrics

StageName = Literal["ingest", "score", "reference", "advantage", "train", "evaluate"]
STAGE_NAMES: tuple[str, ...] = StageName.__args__  # type: ignore[attr-defined]
"""The stages in pipeline order."""

STAGE_METRICS: dict[str, type[StageMetrics]] = {
    "ingest": IngestMetrics,
    "score": ScoreMetrics,
    "reference": ReferenceMetrics,
    "advantage": AdvantageMetrics,
    "train": TrainMetrics,
    "evaluate": EvaluateMetrics,
}
"""Stage -> the pydantic model of its manifest metrics."""
