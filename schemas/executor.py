"""Where the data stages compute: in the stage's own process, or on a Ray cluster (`run.executor`).

These settings change where and how fast rows are computed, never the rows: they are read by the
score, reference and evaluate stages as unkeyed settings (pipeline.runner.STAGES), in no cache key.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.base import Section

Executor = Literal["local", "ray"]
EXECUTORS: tuple[str, ...] = Executor.__args__  # type: ignore[attr-defined]


class Resources(Section):
    """One stage's Ray actor pool: how many actors, what each holds, and how many rows one call gets."""

    actors: int = Field(1, ge=1, description="Actors of the pool; each loads the stage's models once.")
    cpus_per_actor: float = Field(1.0, ge=0, description="CPUs Ray reserves for each actor.")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs Ray reserves for each actor (fractions share a GPU).")
    batch_rows: int = Field(
        256, gt=0,
        description="Rows of one shard handed to an actor per call, rounded up to whole model batches of the stage "
        "(score.batch_size; the reference pass's length-sorted batches under reference.token_budget; "
        "reference.generate_batch_size; evaluate.batch_size), so the model sees the same batches as with the local "
        "executor.",
    )


class Workers(Section):
    """The actor pool of each stage that runs on Ray under `run.executor: ray`."""

    score: Resources = Field(default_factory=Resources, description="Scoring of every reward component.")
    reference: Resources = Field(
        default_factory=Resources,
        description="pi_ref's value-target decodes, its log-prob passes (value features, V(x)) and built pairs' decodes.",
    )
    evaluate: Resources = Field(default_factory=Resources, description="The evaluation decodes and their scoring.")


class WorkerTimings(BaseModel):
    """What one worker (an actor process, or the stage's own process) did in one map."""

    model_config = ConfigDict(extra="forbid")

    worker: str = Field(..., description="host:pid of the worker process.")
    shards: int = Field(..., description="Shards it computed.")
    rows: int = Field(..., description="Rows it computed.")
    compute_seconds: float = Field(..., description="Wall seconds inside the per-shard function, summed over its shards.")
    peak_rss_bytes: int = Field(..., description="Peak resident memory of the worker process at its last shard.")
    peak_gpu_bytes: int | None = Field(None, description="Peak CUDA memory torch allocated in it; None without a GPU.")


class MapRun(BaseModel):
    """One per-shard function mapped over a table (stages.executor.map_shards)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., description="What was mapped, e.g. `score toxicity`.")
    executor: Executor = Field(..., description="run.executor it ran under.")
    actors: int = Field(..., description="Actors asked for (1 with the local executor).")
    rows: int = Field(..., description="Rows mapped.")
    shards: int = Field(..., description="Shards the rows were cut into.")
    seconds: float = Field(..., description="Wall seconds of the whole map, from the driver.")
    rows_per_s: float | None = Field(None, description="rows / seconds.")
    workers: list[WorkerTimings] = Field(..., description="Each worker process that computed shards (a restarted actor is a new one).")


class Execution(BaseModel):
    """Where a stage computed: written to its manifest only (not to its output files, so not to its content hash)."""

    model_config = ConfigDict(extra="forbid")

    executor: Executor = Field(..., description="run.executor the stage ran under.")
    ray_address: str | None = Field(None, description="The Ray cluster joined (its GCS address); None with the local executor.")
    maps: list[MapRun] = Field(default_factory=list, description="Each map the stage ran, in order.")
