"""Map a per-shard function over an Arrow table, in this process or on a Ray actor pool, keeping order.

    out = mapper.map_shards("score toxicity", table, make_function, model_batch=cfg.score.batch_size)

`make_function()` builds the per-shard function (it loads the models); it runs once in this process
with the local executor (`run.executor: local`, which imports no Ray), and once per actor with
`ray`: Ray Data `map_batches` over the shards with an actor pool of `run.workers.<stage>` actors. The
function gets a table of consecutive input rows and returns one row per input row, in order.

The rows are cut into shards of whole model batches, at least `batch_rows` rows each (the last may
have fewer), the same shards under both executors, so a function that batches its shard as the
stage batches the whole table sees the batches it would see over the whole table; the output is the
shards' outputs in input order. `model_batch` is the stage's fixed batch size (score.batch_size:
`batch_rows` rounded up to a whole number of it), or the sizes of its consecutive batches when they
vary (the reference stage's length-sorted batches under a token budget, rows given in batch order).

Faults: an actor that dies (killed, out of memory) is restarted and its shard retried (Ray's
`max_restarts` / `max_task_retries`, RESTARTS each), so the output is the same. The failpoint
`executor.shard` (stages.faults) kills an actor at a shard of its first life.

Each map's workers and timings go to the manifest (`StageResult.execution`, schemas.executor.Execution).
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.executor import Execution, MapRun, Resources, WorkerTimings
from stages.faults import ENVIRONMENT_VARIABLE, failpoint

log = logging.getLogger("alol.executor")

ShardFunction = Callable[[pa.Table], pa.Table]
RESTARTS = 3
"""How often an actor is restarted, and a shard retried on it, before the stage fails."""

SHARD, WORKER, SECONDS, RSS, GPU = "__alol_shard", "__alol_worker", "__alol_seconds", "__alol_rss", "__alol_gpu"
BOOKKEEPING = (SHARD, WORKER, SECONDS, RSS, GPU)

_joined: str | None = None
"""The run.ray_address this process's Ray connection was made for (the GCS reports its own host's IP instead)."""


def shard_sizes(resources: Resources, rows: int, model_batch: int | Sequence[int]) -> list[int]:
    """Rows of each shard: consecutive model batches packed until a shard has at least batch_rows rows."""
    if isinstance(model_batch, int):
        batches = [min(model_batch, rows - start) for start in range(0, rows, model_batch)]
    else:
        batches = list(model_batch)
        if sum(batches) != rows:
            raise ValueError(f"model batches of {sum(batches)} rows in all for a table of {rows} rows")
    sizes, current = [], 0
    for size in batches:
        current += size
        if current >= resources.batch_rows:
            sizes.append(current)
            current = 0
    if current:
        sizes.append(current)
    return sizes


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _peak_memory() -> tuple[int, int | None]:
    """(peak resident bytes of this process, peak CUDA bytes torch allocated or None)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    torch = sys.modules.get("torch")
    gpu = int(torch.cuda.max_memory_allocated()) if torch is not None and torch.cuda.is_available() else None
    return rss, gpu


def _apply(function: ShardFunction, shard: pa.Table) -> pa.Table:
    result = function(shard)
    if result.num_rows != shard.num_rows:
        raise RuntimeError(f"a shard of {shard.num_rows} rows gave {result.num_rows} rows; one output row per input row expected")
    return result


class _ShardActor:
    """The Ray actor: builds the function once, then computes whole shards and tags them with its timings."""

    def __init__(self, make_function: Callable[[], ShardFunction]):
        import ray

        self.function = make_function()
        self.first_life = not ray.get_runtime_context().was_current_actor_reconstructed

    def __call__(self, batch: pa.Table) -> pa.Table:
        parts = []
        for shard in pc.unique(batch.column(SHARD)).to_pylist():
            rows = batch.filter(pc.equal(batch.column(SHARD), shard))
            started = time.perf_counter()
            result = _apply(self.function, rows.drop_columns([SHARD]))
            seconds = time.perf_counter() - started
            if self.first_life:
                failpoint("executor.shard")
            rss, gpu = _peak_memory()
            n = result.num_rows
            tags = {
                SHARD: pa.array([shard] * n, pa.int64()), WORKER: pa.array([_worker_name()] * n),
                SECONDS: pa.array([seconds] * n, pa.float64()), RSS: pa.array([rss] * n, pa.int64()),
                GPU: pa.array([gpu] * n, pa.int64()),
            }
            for name, values in tags.items():
                result = result.append_column(name, values)
            parts.append(result)
        return pa.concat_tables(parts)


def ray_session(address: str) -> str:
    """Join the cluster at `address`, or start a Ray instance in this process on 127.0.0.1 (no dashboard) when
    empty; reuse this process's connection when it is to the same cluster. Returns the address joined.
    Ray's usage reports stay off unless RAY_USAGE_STATS_ENABLED says otherwise (clusters are often offline)."""
    global _joined
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        current = ray.get_runtime_context().gcs_address
        if not address or address in ("auto", current, _joined):
            return address or current
        ray.shutdown()
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", logging_level=logging.WARNING, log_to_driver=False)
    _joined = address
    return address or ray.get_runtime_context().gcs_address


class ShardMapper:
    """One stage's maps under `run.executor`, recording each map's workers and timings for the manifest."""

    def __init__(self, executor: str, ray_address: str, resources: Resources):
        self.executor, self.ray_address_setting, self.resources = executor, ray_address, resources
        self.maps: list[MapRun] = []
        self.ray_address: str | None = None

    @classmethod
    def for_stage(cls, cfg, stage: str) -> ShardMapper:
        """The mapper of `stage` from run.executor, run.ray_address and run.workers.<stage>."""
        return cls(cfg.run.executor, cfg.run.ray_address, getattr(cfg.run.workers, stage))

    def execution(self) -> Execution:
        return Execution(executor=self.executor, ray_address=self.ray_address, maps=self.maps)

    @property
    def in_process(self) -> bool:
        """Whether the per-shard functions run in this process (the local executor), so may use what it holds."""
        return self.executor == "local"

    def map_shards(
        self, name: str, table: pa.Table, make_function: Callable[[], ShardFunction], model_batch: int | Sequence[int]
    ) -> pa.Table:
        """`make_function()(shard)` over the shards of `table`, concatenated in input order."""
        starts = np.cumsum([0, *shard_sizes(self.resources, table.num_rows, model_batch)])
        shards = [table.slice(start, stop - start) for start, stop in zip(starts[:-1], starts[1:])] or [table]
        started = time.perf_counter()
        if self.executor == "ray" and table.num_rows:
            result, workers = self._on_ray(name, shards, make_function)
        else:
            result, workers = self._here(shards, make_function)
        seconds = time.perf_counter() - started
        self.maps.append(MapRun(
            name=name, executor=self.executor, actors=self.resources.actors if self.executor == "ray" else 1,
            rows=table.num_rows, shards=len(shards), seconds=round(seconds, 4),
            rows_per_s=round(table.num_rows / seconds, 1) if seconds else None, workers=workers,
        ))
        return result

    def _here(self, shards: list[pa.Table], make_function: Callable[[], ShardFunction]) -> tuple[pa.Table, list[WorkerTimings]]:
        function = make_function()
        parts, compute = [], 0.0
        for shard in shards:
            started = time.perf_counter()
            parts.append(_apply(function, shard))
            compute += time.perf_counter() - started
        rss, gpu = _peak_memory()
        worker = WorkerTimings(
            worker=_worker_name(), shards=len(shards), rows=sum(s.num_rows for s in shards), compute_seconds=round(compute, 4),
            peak_rss_bytes=rss, peak_gpu_bytes=gpu,
        )
        return pa.concat_tables(parts), [worker]

    def _on_ray(
        self, name: str, shards: list[pa.Table], make_function: Callable[[], ShardFunction]
    ) -> tuple[pa.Table, list[WorkerTimings]]:
        import ray
        import ray.data

        self.ray_address = ray_session(self.ray_address_setting)
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        tagged = [s.append_column(SHARD, pa.array([i] * s.num_rows, pa.int64())) for i, s in enumerate(shards)]
        env = {ENVIRONMENT_VARIABLE: os.environ[ENVIRONMENT_VARIABLE]} if os.environ.get(ENVIRONMENT_VARIABLE) else {}
        r = self.resources
        log.info("%s: %d shards of up to %d rows on %d Ray actors", name, len(shards), max(s.num_rows for s in shards), r.actors)
        # One block per shard and batch_size None: an actor gets whole blocks, never part of a shard.
        mapped = ray.data.from_arrow(tagged).map_batches(
            _ShardActor, fn_constructor_args=(make_function,), batch_size=None, batch_format="pyarrow",
            concurrency=r.actors, num_cpus=r.cpus_per_actor, num_gpus=r.gpus_per_actor or None,
            max_restarts=RESTARTS, max_task_retries=RESTARTS, runtime_env={"env_vars": env} if env else None,
        )
        output = pa.concat_tables(ray.get(mapped.to_arrow_refs()))
        output = output.take(pc.sort_indices(output, sort_keys=[(SHARD, "ascending")]))
        counts = dict(zip(*[c.to_pylist() for c in pc.value_counts(output.column(SHARD)).flatten()]))
        if [counts.get(i) for i in range(len(shards))] != [s.num_rows for s in shards]:
            raise RuntimeError(f"{name}: Ray returned {output.num_rows} rows in {len(counts)} shards for "
                               f"{sum(s.num_rows for s in shards)} rows in {len(shards)} shards; rerun the stage")
        return output.drop_columns(list(BOOKKEEPING)), _timings(output)


def _timings(output: pa.Table) -> list[WorkerTimings]:
    """Per worker: shards, rows, compute seconds (one per shard) and its largest peak memory."""
    rows = output.select(list(BOOKKEEPING)).to_pylist()
    workers: dict[str, dict] = {}
    for row in rows:
        w = workers.setdefault(row[WORKER], {"shards": {}, "rows": 0, "rss": 0, "gpu": None})
        w["shards"][row[SHARD]] = row[SECONDS]
        w["rows"] += 1
        w["rss"] = max(w["rss"], row[RSS])
        if row[GPU] is not None:
            w["gpu"] = max(w["gpu"] or 0, row[GPU])
    return [
        WorkerTimings(
            worker=name, shards=len(w["shards"]), rows=w["rows"], compute_seconds=round(sum(w["shards"].values()), 4),
            peak_rss_bytes=w["rss"], peak_gpu_bytes=w["gpu"],
        )
        for name, w in sorted(workers.items())
    ]
