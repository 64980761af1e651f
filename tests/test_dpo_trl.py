"""Our DPO against a peer nobody here wrote: TRL's DPOTrainer (`trl`, a test extra) with precomputed reference
log-probs, on one fixed batch of pairs of a tiny random Llama: the same token ids, the same reference
log-probs (our reference pass of another model), the same beta. Loss and every parameter's gradient agree."""

from __future__ import annotations

import pytest
import torch
import trl

from schemas.config import load_config
from stages.losses import loss_function
from stages.models.store import load_causal_lm, load_tokenizer
from stages.models.tokenize import encode_pair, token_digest
from stages.reference import reference_logprobs
from stages.train.step import PolicyForward, encode_micro_batch, micro_batch_loss
from tests.support.models import tiny_model_folder

BETA = 0.3
PAIRS = [  # (prompt, chosen, rejected): different lengths, so both sides of the batch are padded
    ("hello there how are you", "i am fine thank you", "no"),
    ("what is your name", "my name is bot", "tell me a joke about cats and dogs"),
    ("do you like music", "i like jazz and rock", "the quick brown fox"),
]


def _our_rows(tokenizer, reference_model):
    """The rows as the train stage reads them: chosen then rejected, with pi_ref's log-probs from our reference pass."""
    rows = []
    for k, (prompt, *responses) in enumerate(PAIRS):
        messages = [{"role": "user", "content": prompt}]
        for side, response in zip(("chosen", "rejected"), responses):
            p, r = encode_pair(tokenizer, messages, response, 32, 16)
            lp = reference_logprobs(reference_model, [p], [r], token_budget=256, progress=False).token_logprobs[0]
            rows.append({"id": f"{k}-{side}", "prompt": messages, "response": response, "prompt_ids": p,
                         "response_ids": r, "token_hash": token_digest(p, r), "response_tokens": len(r),
                         "ref_token_logprobs": lp.tolist(), "ref_logprob": float(lp.astype("float64").sum()),
                         "reward": 0.0, "advantage": 0.0})
    return rows


def _trl_trainer(model, tokenizer, tmp_path):
    from datasets import Dataset

    def conversation(role, text):
        return [{"role": role, "content": text}]

    dataset = Dataset.from_list(
        [{"prompt": conversation("user", p), "chosen": conversation("assistant", c),
          "rejected": conversation("assistant", r)} for p, c, r in PAIRS]
    )
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"), beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=True,
        per_device_train_batch_size=len(PAIRS), report_to=[], use_cpu=True, bf16=False, fp16=False,
        dataset_num_proc=None, save_strategy="no", logging_strategy="no",
    )
    return trl.DPOTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=dataset)


def test_dpo_loss_and_gradients_equal_trl_dpo_trainer_with_precomputed_reference(tmp_path):
    torch.manual_seed(0)
    folder = tiny_model_folder(tmp_path / "tiny")
    tokenizer = load_tokenizer(folder)
    rows = _our_rows(tokenizer, load_causal_lm(tiny_model_folder(tmp_path / "ref", seed=1)).eval())

    ours = load_causal_lm(folder).train()
    cfg = load_config("smoke", overrides={"train.algorithm": "dpo", "train.dpo_beta": BETA, "reference.pairs": "built",
                                          "reference.max_prompt_tokens": 32, "reference.max_response_tokens": 16})
    batch = encode_micro_batch(rows, tokenizer, cfg, group_size=2)
    our_loss = micro_batch_loss(PolicyForward(ours, ours), batch, loss_function(cfg.train)).loss
    our_loss.backward()

    trainer = _trl_trainer(load_causal_lm(folder), tokenizer, tmp_path)
    chosen, rejected = rows[0::2], rows[1::2]
    examples = [{"prompt_ids": c["prompt_ids"], "chosen_ids": c["response_ids"], "rejected_ids": r["response_ids"],
                 "ref_chosen_logps": c["ref_logprob"], "ref_rejected_logps": r["ref_logprob"]}
                for c, r in zip(chosen, rejected)]
    inputs = trainer.data_collator(examples)
    theirs = trainer.model.train()
    trl_loss = trainer.compute_loss(theirs, inputs)
    trl_loss.backward()

    margins = [(c["ref_logprob"], r["ref_logprob"]) for c, r in zip(chosen, rejected)]
    assert len({round(a - b, 3) for a, b in margins}) == len(margins), "the reference margins differ per pair"
    assert our_loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    assert abs(our_loss.item() - torch.nn.functional.softplus(torch.tensor(0.0)).item()) > 1e-3, "not a zero margin"
    their_grads = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, their_grads[name].grad, rtol=0, atol=1e-5, msg=name)
    assert max(p.grad.abs().max().item() for p in ours.parameters()) > 1e-3, "the gradient is not trivially zero"
