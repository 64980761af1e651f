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


@pytest.mark.parametrize("slots", [2, 3, 7])
def test_greedy_decode_gives_each_prompt_the_tokens_of_transformers_generate(tiny, slots):
    """Continuous batching over fewer slots than prompts (rows admitted as others finish, prompts of
    different lengths moving the shared columns, the batch shrinking at the tail) against `generate`
    on each prompt alone."""
    tokenizer, model = tiny
    prompts = [[{"role": "user", "content": " ".join(CORPUS[i % 8].split()[: 2 + (5 * i) % 9])}] for i in range(7)]
    encoded = [encode_prompt(tokenizer, p, 64) for p in prompts]
    max_new = 24
    alone = [generate_module._left_padded([row], tokenizer.pad_token_id, model.device) for row in encoded]
    # A random model seldom says EOS: stop at a token it does say, mid-row, so rows finish at different steps.
    free = [hf_greedy(model, ids, mask, eos_id=-1, pad_id=tokenizer.pad_token_id, max_new_tokens=max_new)[0] for ids, mask in alone]
    stop = Counter(t for row in free for t in row[2:12]).most_common(1)[0][0]
    theirs = [hf_greedy(model, ids, mask, eos_id=stop, pad_id=tokenizer.pad_token_id, max_new_tokens=max_new)[0] for ids, mask in alone]

    finished = []
    with torch.no_grad():
        ours = generate_module.greedy_decode(
            model, encoded, eos_id=stop, pad_id=tokenizer.pad_token_id, max_new_tokens=max_new, slots=slots,
            on_finished=finished.append,
        )
    assert ours == theirs
    lengths = {len(row) for row in ours}
    assert len(lengths) > 1 and min(lengths) < max_new  # rows ended early and freed their slots
    assert all(row[-1] == stop for row in ours if len(row) < max_new)
    assert sorted(map(tuple, finished)) == sorted(map(tuple, ours))  # every row reported once, as it ended


def test_slots_make_room_for_a_longer_prompt_and_compact_full_buffers(tiny):
    """A prompt longer than the columns in use moves every row right; a full buffer drops the columns no
    live row uses; the tokens stay those of `generate` on each prompt alone."""
    tokenizer, model = tiny
    short = encode_prompt(tokenizer, [{"role": "user", "content": "hi"}], 64)
    long = encode_prompt(tokenizer, [{"role": "user", "content": " ".join(CORPUS[:3])}], 64)
    assert len(long) > len(short) + 8
    steps = 3 * len(long)
    theirs = [hf_greedy(model, *generate_module._left_padded([row], tokenizer.pad_token_id, model.device), eos_id=-1,
                        pad_id=tokenizer.pad_token_id, max_new_tokens=steps + 1)[0] for row in (short, long)]
    rows: list[list[int]] = [[], []]
    lengths = []
    with torch.no_grad():
        state = generate_module._Slots(model, 2, capacity=len(short) + 2)
        first = state.admit([0], [0], [short], tokenizer.pad_token_id)
        assert state.length == len(short)
        second = state.admit([1], [1], [long], tokenizer.pad_token_id)  # longer than the columns in use
        assert state.length == len(long)
        assert state.mask[0].sum() == len(short) and state.mask[1].sum() == len(long)
        tokens = torch.stack([first[0], second[0]])
        rows[0].append(int(first[0]))
        rows[1].append(int(second[0]))
        for step in range(steps):
            if step == 4:
                state.release(1)  # the long row ends: its columns before the short row's are no longer used
            tokens = state.step(tokens)
            lengths.append(state.length)
            rows[0].append(int(tokens[0]))
            if step < 4:
                rows[1].append(int(tokens[1]))
    assert any(later < earlier for earlier, later in zip(lengths, lengths[1:]))  # a full buffer was compacted
    assert state.capacity >= state.length
    assert rows[0] == theirs[0]
    assert rows[1] == theirs[1][: len(rows[1])]


def test_a_shared_prefix_is_computed_once_and_the_tokens_stay_those_of_generate(tiny):
    """Prompts that open alike (a system prompt and the role header): its keys and values are computed once,
    the prefills see only what follows it, and every row still gets `generate`'s tokens on its prompt alone."""
    tokenizer, model = tiny
    system = {"role": "system", "content": " ".join(CORPUS[5].split()[:12])}
    prompts = [[system, {"role": "user", "content": " ".join(CORPUS[i % 8].split()[: 1 + (3 * i) % 7])}] for i in range(6)]
    encoded = [encode_prompt(tokenizer, p, 64) for p in prompts]
    prefix = generate_module.shared_prefix(encoded)
    assert len(prefix) > 10 and all(row[: len(prefix)] == prefix for row in encoded)
    theirs = [hf_greedy(model, *generate_module._left_padded([row], tokenizer.pad_token_id, model.device), eos_id=-1,
                        pad_id=tokenizer.pad_token_id, max_new_tokens=10)[0] for row in encoded]
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    try:
        with torch.no_grad():
            ours = generate_module.greedy_decode(model, encoded, eos_id=-1, pad_id=tokenizer.pad_token_id, max_new_tokens=10,
                                                 slots=4)
    finally:
        hook.remove()
    assert ours == theirs
    prefills = [shape for shape in seen if shape[1] > 1]
    assert prefills[0] == (1, len(prefix))  # the prefix, once
    longest_rest = max(len(row) for row in encoded) - len(prefix)
    assert all(shape[1] <= longest_rest for shape in prefills[1:]) and len(prefills) >= 2


def test_a_shard_decodes_each_row_as_the_whole_does_given_the_whole_sets_prefix(tiny):
    """Two prompts of a shard may share more than all prompts do, and a longer prefix changes the last bits of
    their logits: with the whole set's prefix_length, the shard's rows equal the whole decode's."""
    tokenizer, model = tiny
    opening = " ".join(CORPUS[2].split()[:6])
    contents = [opening + " one", opening + " two", "hello there", " ".join(CORPUS[4].split()[:5])]
    encoded = [encode_prompt(tokenizer, [{"role": "user", "content": c}], 64) for c in contents]
    whole_prefix = len(generate_module.shared_prefix(encoded))
    assert len(generate_module.shared_prefix(encoded[:2])) > whole_prefix + 4  # the shard alone would share more
    settings = {"eos_id": -1, "pad_id": tokenizer.pad_token_id, "max_new_tokens": 8, "slots": 2}
    with torch.no_grad():
        whole = generate_module.greedy_decode(model, encoded, **settings)
        shard = generate_module.greedy_decode(model, encoded[:2], prefix_length=whole_prefix, **settings)
        with pytest.raises(ValueError, match="prefix_length 40: not a prefix"):
            generate_module.greedy_decode(model, encoded, prefix_length=40, **settings)
    assert shard == whole[:2]


def test_the_shared_prefix_leaves_every_prompt_a_token_of_its_own():
    assert generate_module.shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5, 6]]) == [1, 2, 3]
    assert generate_module.shared_prefix([[1, 2, 3], [1, 2, 3, 4]]) == [1, 2]  # the shortest keeps its last token
    assert generate_module.shared_prefix([[1, 2], [7, 2]]) == []
    assert generate_module.shared_prefix([[4, 5, 6]]) == [4, 5]
    assert generate_module.shared_prefix([]) == []


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


def test_greedy_decode_under_cpu_autocast_gives_the_tokens_of_generate_under_it(tiny):
    """train.mixed_precision bf16: accelerate runs the model's forward in bf16 autocast, so the validation decodes
    get bf16 values and fp32 keys (after the rotary embedding), and packed fp32 layers bf16 inputs; the slots
    take the dtypes the keys and values come in."""
    tokenizer, model = tiny
    prompts = [[{"role": "user", "content": " ".join(CORPUS[i % 8].split()[: 2 + (3 * i) % 7])}] for i in range(5)]
    encoded = [encode_prompt(tokenizer, p, 64) for p in prompts]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = [hf_greedy(model, *generate_module._left_padded([row], tokenizer.pad_token_id, model.device), eos_id=-1,
                            pad_id=tokenizer.pad_token_id, max_new_tokens=12)[0] for row in encoded]
        with torch.no_grad(), generate_module.packed_linears(model, rows=2):
            ours = generate_module.greedy_decode(model, encoded, eos_id=-1, pad_id=tokenizer.pad_token_id, max_new_tokens=12,
                                                 slots=2)
    assert ours == theirs
    with torch.no_grad():
        fp32 = generate_module.greedy_decode(model, encoded, eos_id=-1, pad_id=tokenizer.pad_token_id, max_new_tokens=12, slots=2)
    assert fp32 != ours  # the bf16 decodes are of bf16 activations, not a silent fp32 run
