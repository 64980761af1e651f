"""Routing of accelerator stages to their work pool (called by the `alol` flow in pipeline/flow.py).

A deployment run of the `alol` flow executes on a worker of some work pool. A stage that needs an
accelerator (`accelerator` in `pipeline.runner.STAGES`) runs as a run of its own deployment
`alol/<stage>` when that deployment's pool differs from the pool of the current run; the current run
waits for it and continues with the output the child recorded in run.json (an intact output for the
stage's cache key is reused without submitting anything). Everything else, and every run outside a
worker (`alol run`), runs in-process. The pool names live only in prefect.yaml.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

from pipeline.runner import STAGES, reusable_output, upstream_from_run
from pipeline.storage import RunStore
from schemas.manifest import StageOutput

log = logging.getLogger("alol.routing")

FLOW_NAME = "alol"
CHILD_POLL_S = 1.0


class RoutingError(RuntimeError):
    """An accelerator stage cannot be routed to its deployment; the message says what to do."""




def current_work_pool() -> str | None:
    """The work pool of the deployment run this process executes; None outside a worker.

    A worker starts each flow run in a process with PREFECT__FLOW_RUN_ID set; subflows (e.g. the
    `alol` runs inside `compare`) share that process and so the top-level run's pool.
    """
    flow_run_id = os.environ.get("PREFECT__FLOW_RUN_ID")
    if not flow_run_id:
        return None
    with get_client(sync_client=True) as client:
        return client.read_flow_run(UUID(flow_run_id)).work_pool_name


def accelerator_deployment(stage: str) -> str | None:
    """`alol/<stage>` when `stage` needs an accelerator and this run is a worker run on another pool."""
    if not STAGES[stage].accelerator:
        return None
    here = current_work_pool()
    if here is None:
        return None
    name = f"{FLOW_NAME}/{stage}"
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise RoutingError(
                f"stage {stage!r} needs an accelerator but deployment {name!r} does not exist; "
                "deploy everything in prefect.yaml (`prefect --no-prompt deploy --all`, or `alol up`)"
            ) from None
    return name if deployment.work_pool_name != here else None


def run_stage_deployment(
    name: str, store: RunStore, stage: str, key: str, *, refresh: bool, parameters: dict[str, Any], flow_run_name: str
) -> StageOutput:
    """Run one stage as a run of deployment `name` (with the flow's `parameters`, named `flow_run_name`
    from the moment it is scheduled), wait for it, and return the output it recorded in run.json.

    An intact output for `key` is reused without submitting anything (on a Kubernetes pool a
    submission starts a pod just to find the cache hit). The child's output must carry `key`, else
    another run of the same run name changed run.json meanwhile.
    """
    started = time.time()
    if not refresh:
        existing = reusable_output(store, stage, key)
        if existing is not None:
            log.info("%s: intact output for key %s, not submitted to %s", stage, key[:16], name)
            store.record(existing, cached=True, seconds=time.time() - started)
            return existing
    log.info("%s: submitted to deployment %s; waiting for a worker of its pool", stage, name)
    child = run_deployment(
        name,
        parameters={**parameters, "stages": [stage], "refresh": [stage] if refresh else []},
        flow_run_name=flow_run_name,
        timeout=None,
        poll_interval=CHILD_POLL_S,
    )
    if child.state is None or not child.state.is_completed():
        state = child.state.name if child.state else "unknown"
        message = child.state.message if child.state else ""
        raise RuntimeError(f"stage {stage}: flow run {child.name} of {name} ended {state}: {message}")
    output = upstream_from_run(store, stage)
    if output.cache_key != key:
        raise RuntimeError(
            f"stage {stage}: {store.state_path} records key {output.cache_key[:16]} after flow run {child.name}, "
            f"expected {key[:16]}; was another run of {store.name!r} started at the same time?"
        )
    return output
