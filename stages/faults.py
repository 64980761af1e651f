"""Failpoints: named places in the stage code where a fault test kills the process or fills the disk.

For fault-injection tests only (tests/test_faults.py); a no-op in normal runs. `failpoint(name)`
does nothing unless the environment variable ALOL_FAILPOINT names that point:

    ALOL_FAILPOINT=reference.sft             SIGKILL this process at the first hit of reference.sft
    ALOL_FAILPOINT=train.step@3              SIGKILL it at the third hit (hits are counted per process)
    ALOL_FAILPOINT=io.write:enospc           raise OSError(ENOSPC) there, as a full disk would, from
                                             the first hit on (a full disk stays full)

that is `<point>[@<hit>][:kill|:enospc]`. In a worker that torchrun started again after a worker died
(TORCHELASTIC_RESTART_COUNT above 0) no failpoint fires: the fault is injected in the first life only,
as `executor.shard` is for Ray actors, so a test sees what the restart recovers. The OSError carries no file name, as pyarrow's does not:
the code around the point says which file it was writing.

The points:
- `score.component_cached`: a component's scores were computed and stored in the score cache
  (stages.score.score_column), before the next component and before the output is committed.
- `reference.sft`: one SFT step of pi_ref was taken (stages.reference.fine_tune_reference).
- `reference.logprobs`: one batch of the log-prob pass was computed (stages.reference.reference_logprobs).
- `train.step`: one optimiser step is finished, its resume checkpoint saved when it was due
  (stages.train.run).
- `evaluate.reference_generations`: pi_ref's generations are in the generation cache, the
  policy's not generated yet (stages.evaluate.run).
- `io.write`: a Parquet part of a table is about to be written (stages.io.TableWriter.write).
- `io.upload`: a file of an output committed to an object store is about to be uploaded, the manifest
  last (stages.remote.upload_folder).
"""

from __future__ import annotations

import errno
import os
import signal

ENVIRONMENT_VARIABLE = "ALOL_FAILPOINT"
ACTIONS = ("kill", "enospc")
TORCHRUN_RESTARTS = "TORCHELASTIC_RESTART_COUNT"
"""How often torchrun has started this worker's group again (0 in its first life)."""

_hits: dict[str, int] = {}


def failpoint(name: str) -> None:
    """Kill this process, or raise OSError(ENOSPC), when ALOL_FAILPOINT names this point and hit."""
    spec = os.environ.get(ENVIRONMENT_VARIABLE)
    if not spec:
        return
    point, hit, action = parse(spec)
    if point != name or int(os.environ.get(TORCHRUN_RESTARTS, "0")) > 0:
        return
    _hits[spec] = _hits.get(spec, 0) + 1
    if _hits[spec] < hit:
        return
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    os.kill(os.getpid(), signal.SIGKILL)


def parse(spec: str) -> tuple[str, int, str]:
    """`<point>[@<hit>][:<action>]` -> (point, hit, action)."""
    rest, _, action = spec.partition(":")
    point, _, hit = rest.partition("@")
    action = action or "kill"
    if not point or action not in ACTIONS or not (hit or "1").isdigit() or int(hit or 1) < 1:
        raise ValueError(f"{ENVIRONMENT_VARIABLE}={spec!r}: expected <point>[@<hit>][:kill|:enospc], e.g. train.step@3")
    return point, int(hit or 1), action
