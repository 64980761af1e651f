"""The optional SFT of pi_ref: summed-token NLL fine-tuning of the base model on the training rows."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from schemas.reference import ReferenceConfig
from stages.faults import failpoint
from stages.losses import nll, nll_batch
from stages.models.logprobs import response_token_logprobs
from stages.reference.rows import EncodedRows

log = logging.getLogger("alol.reference")


def fine_tune_reference(
    model: Any, rows: EncodedRows, ref: ReferenceConfig, seed: int
) -> dict[str, float | int]:
    """Summed-token NLL fine-tuning in place: loss = mean over the batch of -sum_t l_t (stages.losses.nll;
    AdamW (fused), grad-norm clip 1.0)."""
    if not rows.sft_rows:
        raise ValueError("reference.sft_epochs > 0 but the ingest output has no training rows to fine-tune pi_ref on")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=ref.sft_learning_rate, fused=True)  # as in train: one pass per tensor
    model.train()
    losses: list[float] = []
    epoch_means: list[float] = []
    for epoch in range(1, ref.sft_epochs + 1):
        order = [rows.sft_rows[i] for i in torch.randperm(len(rows.sft_rows), generator=generator).tolist()]
        batches = [order[s : s + ref.sft_batch_size] for s in range(0, len(order), ref.sft_batch_size)]
        for batch in tqdm(batches, desc=f"SFT pi_ref epoch {epoch}", unit="batch"):
            logprobs = response_token_logprobs(
                model, [rows.prompt_ids[i] for i in batch], [rows.response_ids[i] for i in batch]
            )
            loss = nll(nll_batch(logprobs)).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            failpoint("reference.sft")
        epoch_means.append(float(np.mean(losses[-len(batches) :])))
        log.info("SFT epoch %d: mean summed-token NLL %.4f", epoch, epoch_means[-1])
    model.eval()
    # Single batches are noisy; the per-epoch means show whether the fine-tuning converged.
    return {"sft_steps": len(losses), "sft_first_loss": losses[0], "sft_last_loss": losses[-1], "sft_epoch_losses": epoch_means}
