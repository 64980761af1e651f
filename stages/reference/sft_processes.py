"""The SFT of pi_ref on several processes of this machine (reference.sft_processes > 1).

The reference stage writes the job (the base model's folder, the token ids of the rows to fine-tune on,
reference.*, the seed) into a scratch folder and launches

    torchrun --standalone --nproc_per_node P -m stages.reference.sft_worker JOB_FOLDER

(stages.torchrun, as the train stage launches pipeline.launch). Each process (stages.reference.sft_worker)
runs stages.reference.sft.fine_tune_reference on its share of every batch's rows, the gradients summed over
the processes (gloo on CPU, NCCL on GPUs, one GPU each), so each step equals one process's step on the
whole batch, within float rounding (the sums are taken in another order) and without active dropout
(each process draws its own masks). The first process saves the weights and the metrics into the job
folder, and the stage continues with them as with a model it fine-tuned itself.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from schemas.reference import ReferenceConfig
from stages.models.store import load_causal_lm
from stages.reference.rows import EncodedRows
from stages.torchrun import failure, run_torchrun, torchrun_command

log = logging.getLogger("alol.reference")

JOB_FILE, MODEL_FOLDER, METRICS_FILE = "job.json", "model", "metrics.json"


def fine_tune_on_processes(base_path: Path, rows: EncodedRows, ref: ReferenceConfig, seed: int) -> tuple[Any, dict[str, Any]]:
    """The base model fine-tuned on ref.sft_processes processes (in eval mode, on the CPU), and the SFT metrics."""
    with tempfile.TemporaryDirectory(prefix="alol-sft-") as scratch:
        job = Path(scratch)
        (job / JOB_FILE).write_text(json.dumps({
            "model": str(base_path), "seed": seed, "reference": ref.model_dump(mode="json"),
            "prompt_ids": [rows.prompt_ids[i] for i in rows.sft_rows],
            "response_ids": [rows.response_ids[i] for i in rows.sft_rows], "shared_prefix": rows.shared_prefix,
        }), encoding="utf-8")
        log.info("SFT of pi_ref: launching %d processes (torchrun --standalone)", ref.sft_processes)
        status, tail = run_torchrun(torchrun_command("stages.reference.sft_worker", [str(job)], ref.sft_processes))
        if status != 0:
            raise failure(f"the SFT of pi_ref on {ref.sft_processes} processes", status, tail)
        model = load_causal_lm(job / MODEL_FOLDER)
        metrics = json.loads((job / METRICS_FILE).read_text(encoding="utf-8"))
    return model, metrics
