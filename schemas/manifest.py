"""What a stage produced: the manifest written next to its outputs, and the handle tasks pass on."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from schemas.base import canonical_json, sha256_text
from schemas.executor import Execution


class OutputFile(BaseModel):
    """One file a stage wrote, relative to the stage folder."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(..., description="Path relative to the stage folder.")
    table: str | None = Field(None, description="Table this Parquet part belongs to; None for other files.")
    rows: int | None = Field(None, description="Rows in a Parquet part.")
    bytes: int
    sha256: str


class StageMetrics(BaseModel):
    """Base of every stage's metrics model (one per stage, in schemas/<stage>.py, listed in
    schemas.stages.STAGE_METRICS): written to the manifest as JSON and read back through
    `StageReader.metrics`, so no reader depends on a key spelled as a string. Unknown fields are errors."""

    model_config = ConfigDict(extra="forbid")


class Summary(BaseModel):
    """Mean, standard deviation, minimum and maximum of a column (None when it has no rows)."""

    model_config = ConfigDict(extra="forbid")

    mean: float | None
    std: float | None
    min: float | None
    max: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        """The summary of a 1-d array of numbers (population std); all None for no values."""
        if len(values) == 0:
            return cls(mean=None, std=None, min=None, max=None)
        array = np.asarray(values, dtype=np.float64)
        return cls(mean=float(array.mean()), std=float(array.std()), min=float(array.min()), max=float(array.max()))


class StageResult(BaseModel):
    """What a stage function returns: counts and the stage's typed metrics (the rest is added by the pipeline)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    rows_in: int
    rows_out: int
    rows_rejected: int = 0
    metrics: StageMetrics = Field(..., description="The stage's metrics model (schemas.stages.STAGE_METRICS).")
    execution: Execution | None = Field(None, description="Where its rows were computed (stages.executor); None for a stage that maps nothing.")


class Producer(BaseModel):
    """Who computed a stage output: the process, and the Prefect flow run when there was one."""

    model_config = ConfigDict(extra="forbid")

    host: str
    pid: int
    run: str | None = Field(None, description="Name of the flow run (e.g. `alol run`'s), None outside Prefect.")
    run_id: str | None = Field(None, description="Id of that flow run.")


class StageManifest(BaseModel):
    """`manifest.json` of one stage output folder."""

    model_config = ConfigDict(extra="forbid")

    stage: str
    cache_key: str = Field(..., description="sha256 of the config fingerprints, input content hashes and code version.")
    config_fingerprints: dict[str, str] = Field(..., description="Fingerprint of each config section the stage reads.")
    config: dict[str, Any] = Field(..., description="The config sections the stage read, as JSON.")
    inputs: dict[str, str] = Field(..., description="Upstream stage -> content hash of the output it read.")
    code_version: str
    rows_in: int
    rows_out: int
    rows_rejected: int
    outputs: list[OutputFile]
    columns: dict[str, dict[str, str]] = Field(..., description="Table -> column -> Arrow type.")
    metrics: dict[str, Any]
    started: datetime
    finished: datetime
    seconds: float
    versions: dict[str, str] = Field(..., description="Versions of python, torch, transformers, alol and friends.")
    producer: Producer | None = Field(None, description="Who computed this output.")
    execution: Execution | None = Field(
        None, description="The executor, the workers and per-worker timings of the stage's maps (not in the content hash)."
    )

    def content_hash(self) -> str:
        """Hash of the output files only: equal outputs give equal hashes, whatever the timings."""
        return content_hash(self.outputs)

    def table_rows(self) -> dict[str, int]:
        rows: dict[str, int] = {}
        for f in self.outputs:
            if f.table is not None:
                rows[f.table] = rows.get(f.table, 0) + (f.rows or 0)
        return rows


def content_hash(outputs: list[OutputFile]) -> str:
    return sha256_text(canonical_json(sorted((f.path, f.sha256) for f in outputs)))


class StageOutput(BaseModel):
    """The small handle a stage task returns (and Prefect caches as JSON): where the output is and its hash."""

    model_config = ConfigDict(extra="forbid")

    stage: str
    cache_key: str
    path: str = Field(
        ...,
        description="The stage output folder: absolute in memory; relative to the run root where it is stored "
        "(run.json, Prefect's result records), so that a run root can be moved or copied (pipeline.storage.RunStore).",
    )
    content_hash: str
    rows: dict[str, int] = Field(default_factory=dict, description="Table -> rows.")


class StageRun(BaseModel):
    """What the flow's stage task returns (and Prefect caches as JSON): the output, and whether the task
    found an intact output for the same key instead of computing it."""

    model_config = ConfigDict(extra="forbid")

    output: StageOutput
    reused: bool
