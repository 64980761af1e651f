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
    model: Any, rows: EncodedRows, ref: ReferenceConfig, seed: int, rank: int = 0, processes: int = 1
) -> dict[str, float | int]:
    """Summed-token NLL fine-tuning in place: loss = mean over the batch of -sum_t l_t (stages.losses.nll;
    AdamW (fused), grad-norm clip 1.0).

    As process `rank` of `processes` (stages.reference.sft_processes) it takes its share of each batch's rows
    (share_of_batch) and backpropagates their -sum_t l_t summed over its rows / the batch's rows; the gradients
    (and losses) are summed over the processes before the clip, so every step is one process's step on the
    whole batch. All processes draw the same batches (the same seed)."""
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
        for batch in tqdm(batches, desc=f"SFT pi_ref epoch {epoch}", unit="batch", disable=rank > 0):
            mine = share_of_batch(batch, rank, processes)
            optimizer.zero_grad(set_to_none=True)
            loss = torch.zeros((), device=model.device)
            if mine:
                logprobs = response_token_logprobs(
                    model, [rows.prompt_ids[i] for i in mine], [rows.response_ids[i] for i in mine], rows.shared_prefix
                )
                loss = nll(nll_batch(logprobs)).loss * (len(mine) / len(batch))
                loss.backward()
            if processes > 1:
                loss = sum_over_processes(model, loss.detach())
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            failpoint("reference.sft")
        epoch_means.append(float(np.mean(losses[-len(batches) :])))
        if rank == 0:
            log.info("SFT epoch %d: mean summed-token NLL %.4f", epoch, epoch_means[-1])
    model.eval()
    # Single batches are noisy; the per-epoch means show whether the fine-tuning converged.
    return {
        "sft_steps": len(losses), "sft_processes": processes, "sft_first_loss": losses[0], "sft_last_loss": losses[-1],
        "sft_epoch_losses": epoch_means,
    }


def share_of_batch(batch: list[int], rank: int, processes: int) -> list[int]:
    """Process `rank`'s consecutive share of the batch's rows: sizes differ by at most one, the larger first."""
    size, extra = divmod(len(batch), processes)
    start = rank * size + min(rank, extra)
    return batch[start : start + size + (rank < extra)]


def sum_over_processes(model: Any, loss: torch.Tensor) -> torch.Tensor:
    """Sum every parameter's gradient (zero where this process had no rows) and the loss over the processes."""
    for parameter in model.parameters():
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        torch.distributed.all_reduce(parameter.grad)
    total = loss.to(torch.float64).reshape(1)
    torch.distributed.all_reduce(total)
    return total[0]
