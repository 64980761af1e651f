"""The driver of the fault tests (tests/test_faults.py): one stage run in a child process that a
failpoint (stages.faults) may kill.

`run_stage_in_child` runs `pipeline.runner.execute_stage` in a child process, with ALOL_FAILPOINT
set to the given point, and reports how it ended: killed (SIGKILL), failed or done with its output.
The children are forked from a multiprocessing forkserver that imported torch, transformers and
the stages once, so a kill and its rerun cost a fork rather than an interpreter start (8 s here);
each child is still a process of its own that dies by SIGKILL as a killed `alol run` would. A
child takes the code version (pipeline.runner.code_version) of the test process, so that the cache
keys it computes are the test's even when a source file is edited while the tests run.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator  # noqa: F401 - these imports run once, in the forkserver (see above)
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM  # noqa: F401

import stages.evaluate  # noqa: F401
import stages.reference  # noqa: F401
import stages.score  # noqa: F401
import stages.train  # noqa: F401
from pipeline import runner
from schemas.config import AlolConfig
from schemas.manifest import StageOutput
from stages.faults import ENVIRONMENT_VARIABLE
from stages.io import atomic_write_text

_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload([__name__])


@dataclass(frozen=True)
class ChildRun:
    """How a child's stage run ended: its pid, exit code (-9: killed), output when it finished, and log."""

    pid: int
    exitcode: int
    output: StageOutput | None
    reused: bool | None
    log: str

    @property
    def killed(self) -> bool:
        return self.exitcode == -signal.SIGKILL


def run_stage_in_child(
    cfg: AlolConfig, stage: str, inputs: dict[str, StageOutput], folder: Path, failpoint: str | None = None,
    timeout: float = 120.0,
) -> ChildRun:
    """Run `stage` in a child process (ALOL_FAILPOINT=`failpoint` there); its log goes to `folder`.

    A child that runs past `timeout` seconds is killed and reported as a hang (AssertionError).
    """
    folder.mkdir(parents=True, exist_ok=True)
    result, log = folder / "result.json", folder / "log.txt"
    result.unlink(missing_ok=True)
    payload = {name: output.model_dump_json() for name, output in inputs.items()}
    args = (cfg.model_dump_json(), stage, payload, failpoint, runner.code_version(), str(result), str(log))
    child = _context.Process(target=_child, args=args)
    child.start()
    child.join(timeout)
    if child.is_alive():
        child.kill()
        child.join()
        raise AssertionError(f"{stage} (ALOL_FAILPOINT={failpoint}) still ran after {timeout} s:\n{_tail(log)}")
    done = json.loads(result.read_text(encoding="utf-8")) if result.is_file() else None
    return ChildRun(
        pid=child.pid, exitcode=child.exitcode, log=_tail(log),
        output=StageOutput.model_validate(done["output"]) if done else None, reused=done["reused"] if done else None,
    )


def _child(
    cfg_json: str, stage: str, inputs: dict[str, str], failpoint: str | None, code_version: str, result: str, log: str
) -> None:
    descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    logging.basicConfig(level=logging.INFO, force=True)
    if failpoint:
        os.environ[ENVIRONMENT_VARIABLE] = failpoint
    else:
        os.environ.pop(ENVIRONMENT_VARIABLE, None)
    torch.set_num_threads(1)  # tiny matrices: a second thread only waits for a core on a busy machine
    runner.code_version = lambda: code_version
    cfg = AlolConfig.model_validate_json(cfg_json)
    upstream = {name: StageOutput.model_validate_json(o) for name, o in inputs.items()}
    output, reused = runner.execute_stage(cfg, stage, upstream)
    atomic_write_text(result, json.dumps({"output": output.model_dump(mode="json"), "reused": reused}))


def _tail(log: Path, chars: int = 6000) -> str:
    return log.read_text(encoding="utf-8", errors="replace")[-chars:] if log.is_file() else "(no log)"
