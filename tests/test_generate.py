"""Greedy decoding (stages.models.generate): our loop gives transformers' `generate(do_sample=False)` tokens."""

from collections import Counter
import logging

import pytest
import torch

from stages.models import generate as generate_module
from stages.models.store import load_causal_lm, load_tokenizer
from stages.models.tokenize import encode_prompt
from tests.support.models import CORPUS, tiny_model_folder


def hf_greedy(model, input_ids, attention_mask, eos_id, pad_id, max_new_tokens):
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, eos_token_id=eos_id)
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    rows = []
    for row in output[:, input_ids.shape[1] :].tolist():
        rows.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tiny_model_folder(tmp_path_factory.mktemp("generate") / "tiny")
    return load_tokenizer(folder), load_causal_lm(folder).eval()


def test_greedy_loop_gives_the_tokens_of_transformers_generate_as_rows_finish(tiny):
    tokenizer, model = tiny
    prompts = [[{"role": "user", "content": " ".join(CORPUS[i % 8].split()[: 2 + i])}] for i in range(7)]
    encoded = [encode_prompt(tokenizer, p, 64) for p in prompts]
    input_ids, attention_mask = generate_module._left_padded(encoded, tokenizer.pad_token_id, model.device)
    max_new = 24
    # A random model seldom says EOS: stop at a token it does say, mid-row, so rows finish at different steps.
    free = hf_greedy(model, input_ids, attention_mask, eos_id=-1, pad_id=tokenizer.pad_token_id, max_new_tokens=max_new)
    stop = Counter(t for row in free for t in row[2:12]).most_common(1)[0][0]

    ours = generate_module.greedy_batch(model, input_ids, attention_mask, eos_id=stop, max_new_tokens=max_new)
    theirs = hf_greedy(model, input_ids, attention_mask, eos_id=stop, pad_id=tokenizer.pad_token_id, max_new_tokens=max_new)
    assert ours == theirs
    lengths = {len(row) for row in ours}
    assert len(lengths) > 1 and min(lengths) < max_new  # rows left the batch early (the pruning was exercised)
    assert all(row[-1] == stop for row in ours if len(row) < max_new)


def test_generate_logs_progress_and_keeps_prompt_order(tiny, caplog):
    tokenizer, model = tiny
    prompts = [[{"role": "user", "content": text}] for text in CORPUS[:5]]
    log = logging.getLogger("alol.test-generate")
    with caplog.at_level(logging.INFO, logger=log.name):
        together = generate_module.generate(model, tokenizer, prompts, max_prompt_tokens=64, max_new_tokens=8,
                                            batch_size=2, progress=log)
    one_by_one = [generate_module.generate(model, tokenizer, [p], max_prompt_tokens=64, max_new_tokens=8, batch_size=1)[0]
                  for p in prompts]
    assert together == one_by_one
    assert any("greedy decoding: 5/5 rows" in r.getMessage() and "ETA" in r.getMessage() for r in caplog.records)
