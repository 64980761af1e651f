"""The Prefect flow `alol`: every stage is a cached task over `pipeline.runner.execute_stage`.

Cache: the task's cache key is the stage's own key (config fingerprints of the sections it reads,
upstream content hashes, code version), results are JSON records under `<run.root>/.prefect-results`
(on an object store run root: there too, through Prefect's fsspec RemoteFileSystem; the stage locks
then stay on each host, in the local mirror of the run root, see stages.fs).
Prefect never looks at the files a record points to, so the flow re-verifies every cached output
against its manifest and recomputes when a file is missing or changed. A failed stage leaves no
record (Prefect persists the exception of a failed task; the flow removes it) and no output folder
(pipeline.runner discards it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import CachePolicy
from prefect.filesystems import RemoteFileSystem
from prefect.locking.filesystem import FileSystemLockManager
from prefect.runtime import flow_run as prefect_flow_run

import psutil
from pydantic import ValidationError

from pipeline.console import seconds_since_start
from pipeline.routing import accelerator_deployment, run_stage_deployment
from pipeline.runner import RESULTS_FOLDER, STAGES, cache_key, execute_stage, upstream_from_run
from pipeline.temporary_server import ensure_temporary_server
from pipeline.storage import RunStore
from pipeline.ui import log_result, publish_artifacts, run_label, send_alol_logs_to_prefect
from stages import fs
from stages.io import IntegrityError, StageReader
from schemas.config import AlolConfig, ConfigError, Profile, load_config
from schemas.manifest import StageOutput, StageRun
from schemas.stages import STAGE_NAMES, StageName

log = logging.getLogger("alol.flow")


@dataclass
class StageCacheKey(CachePolicy):
    """Use the stage's own content-addressed key (the `key` argument of the task) as Prefect's cache key."""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str | None:
        return inputs.get("key")


class StageLockManager(FileSystemLockManager):
    """Prefect's file locks, plus an owner file (host, PID, process start time) beside each lock.

    A run that is killed (Ctrl-C twice, SIGKILL, out of memory) leaves its lock behind, and Prefect's
    locks never expire, so the next run of the same stage key would wait forever. A lock whose owner
    process on this host is gone is removed; a lock without an owner file (written by an older alol,
    or a crash between the two writes) counts as stale once it is older than `orphan_seconds`. Locks
    held by another host (a shared file system) are always respected.
    """

    orphan_seconds = 60.0

    def _owner_path(self, key: str) -> Path:
        return self.lock_files_directory / f"{key}.owner"

    def _stale(self, key: str) -> bool:
        lock = self._lock_path_for_key(key)
        try:
            owner = json.loads(self._owner_path(key).read_text(encoding="utf-8"))
        except FileNotFoundError:
            try:
                return time.time() - lock.stat().st_mtime > self.orphan_seconds
            except FileNotFoundError:
                return False
        except ValueError:
            return False  # being written right now
        if owner.get("host") != socket.gethostname():
            return False
        try:
            return psutil.Process(owner["pid"]).create_time() != owner["started"]
        except psutil.NoSuchProcess:
            return True

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        locked = super().is_locked(key, use_cache=use_cache)
        if locked and self._stale(key):
            log.warning("removing the lock of stage key %s left by a process that no longer runs", key[:16])
            for path in (self._lock_path_for_key(key), self._owner_path(key)):
                path.unlink(missing_ok=True)
            self._locks.pop(key, None)
            return False
        return locked

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None) -> bool:
        acquired = super().acquire_lock(key, holder, acquire_timeout, hold_timeout)
        if acquired:
            me = psutil.Process(os.getpid())
            owner = {"host": socket.gethostname(), "pid": me.pid, "started": me.create_time(), "holder": holder}
            tmp = self._owner_path(key).with_suffix(f".owner.{me.pid}")
            tmp.write_text(json.dumps(owner), encoding="utf-8")
            tmp.replace(self._owner_path(key))
        return acquired

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None) -> bool:
        return self.acquire_lock(key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        super().release_lock(key, holder)
        self._owner_path(key).unlink(missing_ok=True)


@task(
    task_run_name="{stage}",
    cache_policy=StageCacheKey(),
    persist_result=True,
    result_serializer="json",
    cache_expiration=timedelta(days=30),
)
def run_stage(
    stage: str, key: str, cfg: AlolConfig, inputs: dict[str, StageOutput], refresh: bool, store: RunStore
) -> StageRun:
    """Compute one stage (or reuse its intact output folder for the same key) and publish its manifest.

    The result (which Prefect keeps as its cache record) holds the output's path relative to the run
    root, so that a moved or copied run root still finds its outputs."""
    output, reused = execute_stage(
        cfg, stage, inputs, refresh=refresh, store=store, run=prefect_flow_run.name, run_id=prefect_flow_run.id
    )
    if output.cache_key != key:
        raise RuntimeError(f"stage {stage}: cache key changed while running ({key[:16]} -> {output.cache_key[:16]})")
    publish_artifacts(StageReader(output.path, verify=False), cfg.run.name)
    log.info("%s: %s rows, folder %s%s", stage, output.rows, output.path, " (reused)" if reused else "")
    return StageRun(output=store.portable(output), reused=reused)


def _results(cfg: AlolConfig) -> fs.Location:
    """Where Prefect's result records of this run root go: `<run.root>/.prefect-results`."""
    return fs.join(fs.location(cfg.run.root), RESULTS_FOLDER)


def _result_storage(cfg: AlolConfig) -> Path | RemoteFileSystem:
    results = _results(cfg)
    if isinstance(results, Path):
        return results
    return _remote_result_storage(results, dict(cfg.run.storage_options))


def result_block_name(results: str) -> str:
    """The name of the saved result storage block of an object store results prefix."""
    return f"alol-results-{hashlib.sha256(results.encode()).hexdigest()[:16]}"


def _remote_result_storage(results: str, storage_options: dict[str, Any]) -> RemoteFileSystem:
    """Prefect's fsspec block for `results`. Prefect wants result storage saved server-side; the saved
    block holds the base path only (`alol-results-<hash of it>`), and the options (credentials) are set
    on this process's copy after saving, so that they never reach Prefect's database."""
    block = RemoteFileSystem(basepath=results)
    block.save(result_block_name(results), overwrite=True)
    block.settings = storage_options
    return block


def _stage_task(cfg: AlolConfig, refresh: bool):
    lock_manager = StageLockManager(lock_files_directory=fs.local_mirror(_results(cfg)) / "locks")
    return run_stage.with_options(
        result_storage=_result_storage(cfg),
        cache_policy=StageCacheKey().configure(isolation_level="SERIALIZABLE", lock_manager=lock_manager),
        refresh_cache=True if refresh else None,
    )


def _stage_run(cfg: AlolConfig, stage: str, key: str, inputs: dict[str, StageOutput], refresh: bool, store: RunStore):
    """Run the stage task; returns its StageRun and whether Prefect's cache answered, or raises the stage's error.

    Prefect persists the exception of a failed task as a result record (a file named by a random
    key, which no cache lookup reads); a failed stage should leave nothing behind, so it is removed.
    """
    state = _stage_task(cfg, refresh)(stage, key, cfg, inputs, refresh, store, return_state=True)
    try:
        run: StageRun = state.result()
        return run.model_copy(update={"output": store.resolve(run.output)}), state.name == "Cached"
    finally:
        if state.is_failed():
            _remove_failure_record(state, _results(cfg))


def _remove_failure_record(state, results: fs.Location) -> None:
    storage_key = getattr(getattr(state.data, "metadata", None), "storage_key", None)
    if not storage_key:
        return
    if isinstance(results, Path):
        record = Path(storage_key) if Path(storage_key).is_absolute() else results / storage_key
        if record.parent == results:
            record.unlink(missing_ok=True)
        return
    record = storage_key if fs.is_remote(storage_key) else fs.join(results, storage_key)
    if fs.parent(record) == results:
        fs.remove(record)


def _verified(output: StageOutput) -> bool:
    try:
        StageReader(output.path)
    except IntegrityError as exc:
        log.warning("cached output of %s is damaged, recomputing: %s", output.stage, exc)
        return False
    return True


def run_config(
    config: AlolConfig | dict[str, Any] | None, profile: str | None, config_file: str | None, overrides: dict[str, Any] | None
) -> AlolConfig:
    """The flow's configuration: `config` when given (an AlolConfig, or its JSON form in a deployment
    run's parameters), else the profile, `config_file` and `overrides`."""
    if config is not None:
        return config if isinstance(config, AlolConfig) else AlolConfig.model_validate(config)
    return load_config(profile, config_file, overrides or {})


def _flow_run_name() -> str:
    """The flow run's name in the UI (pipeline.ui.run_label); Prefect calls this before the run starts."""
    parameters = prefect_flow_run.parameters
    try:
        cfg = run_config(
            parameters.get("config"), parameters.get("profile", "default"), parameters.get("config_file"), parameters.get("overrides")
        )
    except (ConfigError, ValidationError):
        cfg = None  # the flow reports the configuration error when it starts
    return run_label(cfg, parameters.get("stages"))


@flow(name="alol", flow_run_name=_flow_run_name, log_prints=False)
def alol(
    stages: list[StageName] | None = None,
    refresh: list[StageName] | None = None,
    profile: Profile | None = "default",
    config_file: str | None = None,
    overrides: dict[str, Any] | None = None,
    config: AlolConfig | None = None,
) -> dict[str, StageOutput]:
    """Run the selected stages (all by default) in order; unselected upstream stages contribute
    the output recorded for this run. `refresh` forces those stages to recompute.

    The configuration is `config` when given (the resolved configuration `alol run` and `alol compare`
    pass, so it is read once per run), else the profile, `config_file` and `overrides` (deployment runs).
    alol's log lines go to the flow run's logs; a run that includes evaluate ends with its result line.
    """
    send_alol_logs_to_prefect()
    cfg = run_config(config, profile, config_file, overrides)
    selected = [s for s in STAGE_NAMES if s in set(stages or STAGE_NAMES)]
    forced = set(refresh or [])
    store = RunStore.of(cfg)
    outputs: dict[str, StageOutput] = {}
    for stage in selected:
        if stage == selected[0]:  # what a run costs before any work: imports, checks, the temporary Prefect server
            log.info("%s", first_stage_line(stage))
        inputs = {up: outputs[up] if up in outputs else upstream_from_run(store, up) for up in STAGES[stage].upstream}
        key = cache_key(cfg, stage, inputs)
        deployment = accelerator_deployment(stage)
        if deployment is not None:
            # A worker run on another pool: the stage runs on its accelerator pool (pipeline.routing),
            # with exactly this run's configuration.
            params = {"config": cfg.model_dump(mode="json")}
            outputs[stage] = run_stage_deployment(
                deployment, store, stage, key, refresh=stage in forced, parameters=params, flow_run_name=run_label(cfg, [stage])
            )
            continue
        started = time.time()
        run, cached = _stage_run(cfg, stage, key, inputs, stage in forced, store)
        if cached and not _verified(run.output):
            run, cached = _stage_run(cfg, stage, key, inputs, True, store)[0], False
        # A cache hit of Prefect's record, or an intact output folder with the same key that the task reused.
        store.record(run.output, cached=cached or run.reused, seconds=time.time() - started)
        outputs[stage] = run.output
    log_result(cfg, outputs)
    return outputs


def run_alol(
    cfg: AlolConfig, stages: list[str] | None = None, refresh: list[str] | None = None, checked_at: float | None = None
) -> dict[str, StageOutput]:
    """Run the flow in-process on an already validated configuration (`load_config` raised any error
    before a Prefect server started). Without a PREFECT_API_URL the temporary server is started in
    its own session first (pipeline.temporary_server: Ctrl-C must not stop it under a running flow).

    `checked_at`: when `alol run` had finished its checks (seconds_since_start); the first stage's
    log line then splits the time to it into checks, the Prefect server and the flow's start."""
    if checked_at is not None:
        _startup.clear()
        _startup["checks"] = checked_at
    ensure_temporary_server()
    if checked_at is not None:
        _startup["prefect"] = seconds_since_start()
    return alol(stages=stages, refresh=refresh, config=cfg)


_startup: dict[str, float] = {}
"""`run_alol`'s marks (seconds_since_start): `checks` done, `prefect` server up; the next first-stage
line reports them, once."""


def first_stage_line(stage: str) -> str:
    """`first stage ingest starts 41.2 s after alol started`, and after `alol run` what that time went
    to: `(config and checks 0.6 s, Prefect import and server 37.1 s, flow start 3.5 s)`."""
    now = seconds_since_start()
    line = f"first stage {stage} starts {now:.1f} s after alol started"
    if {"checks", "prefect"} <= set(_startup):
        checks, prefect = _startup["checks"], _startup["prefect"]
        line += (
            f" (config and checks {checks:.1f} s, Prefect import and server {prefect - checks:.1f} s,"
            f" flow start {now - prefect:.1f} s)"
        )
    _startup.clear()
    return line
