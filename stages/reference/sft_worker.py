"""One process of the SFT of pi_ref on several processes (stages.reference.sft_processes launches it):

    torchrun --standalone --nproc_per_node P -m stages.reference.sft_worker JOB_FOLDER

It fine-tunes the job's base model on its share of every batch's rows (stages.reference.sft), the gradients
summed over the processes; the first process saves the weights and the metrics into JOB_FOLDER.
Not imported by the stage, so that `-m` runs it once.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from schemas.reference import ReferenceConfig
from stages.models.store import load_causal_lm
from stages.reference.rows import EncodedRows
from stages.reference.sft import fine_tune_reference
from stages.reference.sft_processes import JOB_FILE, METRICS_FILE, MODEL_FOLDER
from stages.torchrun import init_process_group


def main(argv: Sequence[str] | None = None) -> None:
    """One process of the SFT: `torchrun --standalone --nproc_per_node P -m stages.reference.sft_worker JOB_FOLDER`."""
    parser = argparse.ArgumentParser(prog="python -m stages.reference.sft_worker", description=main.__doc__)
    parser.add_argument("job", type=Path)
    job = parser.parse_args(argv).job
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    spec = json.loads((job / JOB_FILE).read_text(encoding="utf-8"))
    cuda = torch.cuda.is_available()
    init_process_group()
    try:
        rank, processes = torch.distributed.get_rank(), torch.distributed.get_world_size()
        model = load_causal_lm(spec["model"]).to(torch.device("cuda") if cuda else torch.device("cpu"))
        count = len(spec["prompt_ids"])
        rows = EncodedRows(prompt_ids=spec["prompt_ids"], response_ids=spec["response_ids"], sft_rows=list(range(count)),
                           shared_prefix=spec["shared_prefix"])
        metrics = fine_tune_reference(
            model, rows, ReferenceConfig.model_validate(spec["reference"]), spec["seed"], rank=rank, processes=processes
        )
        if rank == 0:
            model.save_pretrained(job / MODEL_FOLDER)
            (job / METRICS_FILE).write_text(json.dumps(metrics), encoding="utf-8")
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
