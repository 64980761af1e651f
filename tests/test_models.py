"""stages.models on a tiny random Llama: tokenisation, batched log-probs against a naive loop,
generation, build_once."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from multiprocessing import get_context
from pathlib import Path

import pytest
import torch

from stages.models.generate import generate
from stages.models import logprobs
from stages.models.logprobs import (
    length_batches, pack_rows, packs_rows, response_logprobs_and_prompt_states, response_token_logprobs,
    shares_prefixes,
)
from stages.models.store import build_once, load_causal_lm, load_tokenizer, resolve_model
from stages.models.tokenize import (
    encode_pair, encode_prompt, render_prompt, response_truncated, template_prefix, token_digest,
)
from tests.support.models import tiny_model_folder

REPO = Path(__file__).resolve().parent.parent

PROMPTS = [
    [{"role": "user", "content": "hello there how are you today"}],
    [{"role": "user", "content": "tell me a joke"}],
    [
        {"role": "system", "content": "you are a bot"},
        {"role": "user", "content": "what is your name"},
        {"role": "assistant", "content": "my name is bot"},
        {"role": "user", "content": "where do you live and do you like music and dogs and cats"},
    ],
    [{"role": "user", "content": "one"}],
    [{"role": "user", "content": "numbers one two three four five six"}],
]
RESPONSES = ["i am fine thank you", "", "i live in the computer and i like jazz", "two three", "seven eight nine ten"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model")
    torch.set_num_threads(2)
    return load_causal_lm(folder), load_tokenizer(folder)


def _naive_logprobs(model, prompt, response):
    """log_softmax over the whole vocabulary of one unpadded sequence: the definition of l_t."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    positions = range(len(prompt) - 1, len(prompt) + len(response) - 1)
    return torch.stack([logp[pos, ids[0, pos + 1]] for pos in positions])


def _encoded(tokenizer, max_prompt=64, max_response=16):
    pairs = [encode_pair(tokenizer, p, r, max_prompt, max_response) for p, r in zip(PROMPTS, RESPONSES)]
    return [p for p, _ in pairs], [r for _, r in pairs]


def test_length_batches_cover_every_row_once_within_budget():
    lengths = [5, 17, 3, 40, 8, 8, 100, 1, 22]
    batches = length_batches(lengths, token_budget=48)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    for batch in batches:
        widest = max(lengths[i] for i in batch)
        assert len(batch) == 1 or widest * len(batch) <= 48
    assert batches[0] == [6]  # longer than the budget: alone, and first
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)


def _layout_cost(widths_and_bins, context_cost):
    width, bins = widths_and_bins
    return bins * width * (1 + width * context_cost)


@pytest.mark.parametrize("context_cost", [1 / 3456, 1 / 60])
def test_packed_layout_places_every_row_once_and_never_costs_more_than_padding(context_cost):
    lengths = [51, 90, 12, 33, 33, 70, 2, 64, 45, 20, 88, 7]
    layout = pack_rows(lengths, context_cost)
    assert sorted(i for members in layout.bins for i in members) == list(range(len(lengths)))
    for b, members in enumerate(layout.bins):
        spans = sorted((layout.starts[i], layout.starts[i] + lengths[i]) for i in members)
        assert spans[0][0] == 0 and all(end == start for (_, end), (start, _) in zip(spans, spans[1:]))  # end to end
        assert spans[-1][1] <= layout.width and all(layout.bin_of[i] == b for i in members)
    assert layout.width == max(sum(lengths[i] for i in members) for members in layout.bins)
    packed = _layout_cost((layout.width, len(layout.bins)), context_cost)
    assert packed <= _layout_cost((max(lengths), len(lengths)), context_cost)
    assert packed <= _layout_cost((sum(lengths), 1), context_cost)  # nor more than one bin of every row
    if context_cost < 1 / 1000:  # attention is cheap at these widths: next to no padding
        assert len(layout.bins) * layout.width <= 1.1 * sum(lengths) < 0.6 * len(lengths) * max(lengths)
    else:  # attention over a wide bin costs more than padding saves: several narrow bins
        assert 1 < len(layout.bins) < len(lengths) and layout.width < 2 * max(lengths)


def test_packed_forward_equals_the_padded_one(tiny):
    """The tiny Llama keeps packed rows apart (its mask follows the position ids), so batches are packed; l_t and
    the prompt states equal those of right-padded rows, and a row's neighbours in its bin do not leak into it."""
    model, tokenizer = tiny
    assert packs_rows(model)
    prompts, responses = _encoded(tokenizer)
    layout = pack_rows([len(p) + len(r) for p, r in zip(prompts, responses)], logprobs.context_cost(model.config))
    shared = next(members for members in layout.bins if len(members) > 1)  # else the test would not test packing
    first = min(shared, key=lambda i: layout.starts[i])
    changed = list(responses)
    changed[first] = [(t + 1) % model.config.vocab_size for t in changed[first]]  # what the later rows could see
    with torch.no_grad():
        packed, packed_states = response_logprobs_and_prompt_states(model, prompts, responses)
        padded, padded_states = logprobs._forward(model, prompts, responses, None, True)
        neighbour = response_token_logprobs(model, prompts, changed)
    for i in range(len(prompts)):
        torch.testing.assert_close(packed[i], padded[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(packed_states[i], padded_states[i], atol=1e-5, rtol=0)
        if i != first:
            torch.testing.assert_close(neighbour[i], packed[i], atol=1e-5, rtol=0)
    assert not torch.allclose(neighbour[first], packed[first])


class _IgnoresPositions(torch.nn.Module):
    """A causal LM whose forward drops position_ids: packed rows would see each other, so it must be padded."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    @property
    def device(self):
        return self.model.device

    def forward(self, position_ids=None, **kwargs):
        return self.model(**kwargs)


class _RefusesPositions(_IgnoresPositions):
    """A causal LM whose forward does not take position_ids at all."""

    def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, use_cache=False):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep, use_cache=use_cache)


def test_a_model_that_ignores_position_ids_is_padded_not_packed(tmp_path, caplog):
    model = load_causal_lm(tiny_model_folder(tmp_path / "model"))
    tokenizer = load_tokenizer(tmp_path / "model")
    wrapped = _IgnoresPositions(model)
    with caplog.at_level("WARNING", logger="alol.models"):
        assert not packs_rows(wrapped) and packs_rows(model)
        assert not packs_rows(_RefusesPositions(model))
    assert "_IgnoresPositions does not keep packed rows apart" in caplog.text
    assert "_RefusesPositions failed the packed-rows check (TypeError:" in caplog.text
    prompts, responses = _encoded(tokenizer)
    with torch.no_grad():
        got = response_token_logprobs(wrapped, prompts, responses)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        torch.testing.assert_close(got[i].double(), _naive_logprobs(model, p, r), atol=1e-4, rtol=0)


def test_template_prefix_is_what_one_message_prompts_start_with(tiny, tmp_path):
    _, tokenizer = tiny
    prefix = template_prefix(tokenizer)
    assert tokenizer.decode(prefix) == "<|im_start|>user\n"  # the tiny ChatML template has no system prompt
    prompts, _ = _encoded(tokenizer)
    assert [p[: len(prefix)] == prefix for p in prompts] == [True, True, False, True, True]  # row 2: own system message
    plain = load_tokenizer(tiny_model_folder(tmp_path / "plain", chat_template=False))
    assert plain.decode(template_prefix(plain)).startswith("user")


def test_pack_rows_with_a_shared_prefix_lays_out_only_the_rest(tiny):
    lengths, shares = [9, 30, 4, 12, 7], [True, True, False, True, True]
    layout = pack_rows(lengths, 1 / 256, prefix=5, shares=shares)
    laid = [n - 5 if s else n for n, s in zip(lengths, shares)]
    assert sorted(i for members in layout.bins for i in members) == list(range(5))
    for b, members in enumerate(layout.bins):
        spans = sorted((layout.starts[i], layout.starts[i] + laid[i]) for i in members)
        assert spans[0][0] == 5 and all(end == start for (_, end), (start, _) in zip(spans, spans[1:]))
        assert spans[-1][1] <= layout.width
    assert layout.width == 5 + max(sum(laid[i] for i in members) for members in layout.bins)
    assert [layout.skipped(i) for i in range(5)] == [5, 5, 0, 5, 5]
    with pytest.raises(ValueError, match="ends within it"):
        pack_rows([5, 9], 0.0, prefix=5, shares=[True, True])
    with pytest.raises(ValueError, match="none shares the prefix"):
        pack_rows([7, 9], 0.0, prefix=5, shares=[False, False])


def _positions_seen(model):
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(lambda module, args, out: seen.append(args[0].numel()))
    return seen, handle


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_shared_prefix_is_computed_once_per_packed_sequence_and_changes_no_row(tmp_path, attention):
    """Rows that start with the template prefix lay out only what follows it, attending to their bin's copy:
    l_t, prompt states and gradients are those of right-padded rows, the row with its own system message included,
    no row sees another, and the forward takes fewer positions than the rows have tokens."""
    model = load_causal_lm(tiny_model_folder(tmp_path / "model"))
    tokenizer = load_tokenizer(tmp_path / "model")
    model.set_attn_implementation(attention)
    prompts, responses = _encoded(tokenizer)
    prefix = template_prefix(tokenizer)
    assert shares_prefixes(model)
    seen, handle = _positions_seen(model)
    try:
        with torch.no_grad():
            shared, shared_states = response_logprobs_and_prompt_states(model, prompts, responses, prefix)
    finally:
        handle.remove()
    with torch.no_grad():
        padded, padded_states = logprobs._forward(model, prompts, responses, None, True)
    assert seen[0] < sum(len(p) + len(r) for p, r in zip(prompts, responses)) - 2 * len(prefix)
    for i in range(len(prompts)):
        torch.testing.assert_close(shared[i], padded[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(shared_states[i], padded_states[i], atol=1e-5, rtol=0)
    changed = [list(p) for p in prompts]
    changed[0][len(prefix)] = (changed[0][len(prefix)] + 1) % model.config.vocab_size  # after the shared prefix
    with torch.no_grad():
        neighbour = response_token_logprobs(model, changed, responses, prefix)
    assert not torch.allclose(neighbour[0], shared[0])
    for i in range(1, len(prompts)):
        torch.testing.assert_close(neighbour[i], shared[i], atol=1e-5, rtol=0)
    with torch.no_grad():  # one row alone lays out its prefix as a bin of its own, as in a batch
        alone = response_token_logprobs(model, prompts[:1], responses[:1], prefix)
    torch.testing.assert_close(alone[0], shared[0], atol=1e-5, rtol=0)

    def gradient(rows):
        model.zero_grad(set_to_none=True)
        (-torch.stack([r.sum() for r in rows]).sum()).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    with_prefix = gradient(response_token_logprobs(model, prompts, responses, prefix))
    without = gradient(logprobs._forward(model, prompts, responses, None, False)[0])
    torch.testing.assert_close(with_prefix, without, atol=1e-5, rtol=1e-4)
    assert with_prefix.abs().sum() > 0


class _IgnoresMask(_IgnoresPositions):
    """A causal LM whose forward drops a 4D attention mask: rows would see the rows before them in their bin."""

    def forward(self, attention_mask=None, **kwargs):
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = None
        return self.model(attention_mask=attention_mask, **kwargs)


def test_a_model_that_ignores_the_prefix_mask_computes_the_prefix_per_row(tmp_path, caplog):
    model = load_causal_lm(tiny_model_folder(tmp_path / "model"))
    tokenizer = load_tokenizer(tmp_path / "model")
    wrapped = _IgnoresMask(model)
    with caplog.at_level("WARNING", logger="alol.models"):
        assert not shares_prefixes(wrapped) and packs_rows(wrapped)
    assert "_IgnoresMask does not follow an explicit attention mask" in caplog.text
    prompts, responses = _encoded(tokenizer)
    with torch.no_grad():
        got = response_token_logprobs(wrapped, prompts, responses, template_prefix(tokenizer))
    for i, (p, r) in enumerate(zip(prompts, responses)):
        torch.testing.assert_close(got[i].double(), _naive_logprobs(model, p, r), atol=1e-4, rtol=0)


def test_prompt_left_truncated_response_gets_eos_then_right_truncated(tiny):
    """EOS is appended before truncating (the authors' rule): a response cut short ends without EOS."""
    _, tokenizer = tiny
    prompt = PROMPTS[2]
    full = encode_prompt(tokenizer, prompt, 10_000)
    assert render_prompt(tokenizer, prompt).endswith("<|im_start|>assistant\n")
    text = "i live in the computer and i like jazz"
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    cut, response = encode_pair(tokenizer, prompt, text, 12, 5)
    assert cut == full[-12:]
    assert response == whole[:5] and tokenizer.eos_token_id not in response
    assert response_truncated(tokenizer, response)
    exact = encode_pair(tokenizer, prompt, text, 12, len(whole) + 1)[1]
    assert exact == whole + [tokenizer.eos_token_id] and not response_truncated(tokenizer, exact)
    assert encode_pair(tokenizer, prompt, text, 12, len(whole))[1] == whole, "one token short of the EOS: cut"
    assert encode_pair(tokenizer, prompt, "", 12, 5)[1] == [tokenizer.eos_token_id]


def test_token_digest_changes_with_any_id_or_the_prompt_response_boundary():
    assert token_digest([1, 2], [3, 4]) == token_digest([1, 2], [3, 4])
    assert len({token_digest([1, 2], [3, 4]), token_digest([1, 2], [3, 5]), token_digest([1], [2, 3, 4]),
                token_digest([1, 2, 3], [4])}) == 4


def test_plain_prompt_and_pad_token_without_template(tmp_path):
    folder = tiny_model_folder(tmp_path / "plain", chat_template=False, pad_token=False)
    tokenizer = load_tokenizer(folder)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert render_prompt(tokenizer, PROMPTS[0]) == "user: hello there how are you today\nassistant:"
    ids = encode_prompt(tokenizer, PROMPTS[0], 100)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user: hello there how are you today\nassistant:"


@pytest.mark.parametrize("token_budget", [10_000, 40])
def test_batched_logprobs_equal_one_row_at_a_time(tiny, token_budget):
    model, tokenizer = tiny
    prompts, responses = _encoded(tokenizer)
    got: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for batch in length_batches([len(p) + len(r) for p, r in zip(prompts, responses)], token_budget):
            rows = response_token_logprobs(model, [prompts[i] for i in batch], [responses[i] for i in batch])
            got.update(zip(batch, rows))
    for i, (p, r) in enumerate(zip(prompts, responses)):
        naive = _naive_logprobs(model, p, r)
        assert got[i].shape == (len(r),)
        assert got[i].dtype == torch.float32
        torch.testing.assert_close(got[i].double(), naive, atol=1e-4, rtol=0)
        assert abs(got[i].sum().item() - naive.sum().item()) < 1e-4
    assert min(v.min().item() for v in got.values()) < -1.0  # the model is far from certain: a real test


def test_logprobs_are_differentiable(tiny):
    model, tokenizer = tiny
    prompts, responses = _encoded(tokenizer)
    rows = response_token_logprobs(model, prompts[:3], responses[:3])
    loss = -torch.stack([r.sum() for r in rows]).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)


def test_prompt_states_from_the_pair_forward_equal_a_prompt_only_forward(tiny):
    model, tokenizer = tiny
    prompts, responses = _encoded(tokenizer)
    with torch.no_grad():
        logprobs, states = response_logprobs_and_prompt_states(model, prompts, responses)
        alone = [model.get_decoder()(input_ids=torch.tensor([p])).last_hidden_state[0] for p in prompts]
        plain = response_token_logprobs(model, prompts, responses)
    for i, p in enumerate(prompts):
        assert states[i].shape == (len(p), model.config.hidden_size)
        torch.testing.assert_close(states[i], alone[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(logprobs[i], plain[i], atol=1e-6, rtol=0)


def test_batched_greedy_generation_equals_one_prompt_at_a_time(tiny):
    model, tokenizer = tiny
    batched = generate(model, tokenizer, PROMPTS, max_prompt_tokens=64, max_new_tokens=8, batch_size=3)
    single = [generate(model, tokenizer, [p], max_prompt_tokens=64, max_new_tokens=8, batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    assert any(text for text in batched)


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(tiny):
    model, tokenizer = tiny
    kwargs = dict(max_prompt_tokens=64, max_new_tokens=8, batch_size=5, do_sample=True, temperature=1.5)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = generate(model, tokenizer, PROMPTS, seed=1, **kwargs)
    assert torch.rand(1) == before
    assert generate(model, tokenizer, PROMPTS, seed=1, **kwargs) == first
    assert generate(model, tokenizer, PROMPTS, seed=2, **kwargs) != first


def test_resolve_model_rejects_a_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="config.json"):
        resolve_model(str(tmp_path / "empty"), tmp_path / "cache")


def _write_marker(folder: Path) -> None:
    """A builder that takes a moment and records each call in a log beside the cache."""
    with open(folder.parent / "calls.log", "a") as fh:
        fh.write("built\n")
    time.sleep(0.5)
    (folder / "weights.bin").write_bytes(b"x" * 1000)


def _build_marker(final: str) -> str:
    return str(build_once(Path(final), _write_marker))


def test_build_once_is_safe_when_two_processes_ask_at_once(tmp_path):
    final = tmp_path / "models" / "m"
    with get_context("spawn").Pool(2) as pool:
        results = pool.map(_build_marker, [str(final), str(final)])
    assert results == [str(final), str(final)]
    assert (tmp_path / "models" / "calls.log").read_text() == "built\n"
    assert (final / "weights.bin").stat().st_size == 1000
    assert not list(final.parent.glob(".m.tmp-*"))


def test_build_resumes_after_a_killed_build(tmp_path):
    final = tmp_path / "models" / "m"
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from stages.models.store import build_once
        def hang(folder):
            (folder / "weights.bin").write_bytes(b"partial")
            time.sleep(60)
        build_once(Path({str(final)!r}), hang)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not list(final.parent.glob(".m.tmp-*/weights.bin")):
            assert time.monotonic() < deadline, "the builder never started"
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    assert (final.parent / ".m.lock").exists() and list(final.parent.glob(".m.tmp-*"))
    assert not final.exists()
    build_once(final, _write_marker)
    assert (final / "weights.bin").read_bytes() == b"x" * 1000
    assert not list(final.parent.glob(".m.tmp-*"))


def test_failed_build_leaves_nothing_behind(tmp_path):
    final = tmp_path / "models" / "m"

    def broken(folder: Path) -> None:
        (folder / "half").write_text("x")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        build_once(final, broken)
    assert not final.exists() and not list(final.parent.glob(".m.tmp-*"))
