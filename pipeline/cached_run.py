"""The warm rerun without Prefect: when every selected stage already has an intact output committed
under its cache key, `alol run` records them in run.json as cached and returns, without starting a
Prefect server or importing the flow (which is most of a warm rerun's seconds), and without the
preflight checks of the data source and the model, which nothing reads then (only the folders'
writability is checked).

The check is the flow's own: the same cache keys (`pipeline.runner.cache_key`, upstream outputs from
this pass or from run.json) and the same verification of every file's hash (`reusable_output`). If
any stage would compute, or is refreshed, nothing is recorded here and the flow runs as usual. Such a
rerun leaves no flow run in Prefect's UI; run.json tells what it did, as for any run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from pipeline.runner import STAGES, MissingUpstreamError, cache_key, reusable_output, upstream_from_run
from pipeline.storage import RunStore
from schemas.config import AlolConfig
from schemas.manifest import StageOutput
from schemas.stages import STAGE_NAMES
from stages.io import IntegrityError

log = logging.getLogger("alol.run")


def all_cached(
    cfg: AlolConfig, stages: list[str] | None = None, refresh: list[str] | None = None,
    before_recording: Callable[[AlolConfig, list[str] | None], None] | None = None,
) -> dict[str, StageOutput] | None:
    """The outputs of the selected stages (all by default), recorded in run.json as cached, when every one
    of them is committed and intact under its current cache key; None (and nothing recorded) otherwise.
    `before_recording(cfg, stages)` runs once all are found, before run.json is written (the CLI's
    writability check)."""
    if refresh:
        return None
    selected = [s for s in STAGE_NAMES if s in set(stages or STAGE_NAMES)]
    store = RunStore.of(cfg)
    found: dict[str, tuple[StageOutput, float]] = {}
    for stage in selected:
        started = time.time()
        try:
            inputs = {up: found[up][0] if up in found else upstream_from_run(store, up) for up in STAGES[stage].upstream}
            output = reusable_output(store, stage, cache_key(cfg, stage, inputs))
        except (MissingUpstreamError, IntegrityError, OSError):  # OSError: e.g. a store that does not answer
            return None  # preflight and the flow say what is wrong
        if output is None:
            return None
        found[stage] = (output, time.time() - started)
    if before_recording is not None:
        before_recording(cfg, stages)
    for output, seconds in found.values():
        store.record(output, cached=True, seconds=seconds)
    log.info("all %d stages cached and verified: recorded in run.json without starting Prefect", len(found))
    return {stage: output for stage, (output, _) in found.items()}
