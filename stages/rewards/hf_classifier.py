"""Any `AutoModelForSequenceClassification` as a reward: with logits z over the model's labels and label k,

    softmax: exp(z_k) / sum_j exp(z_j)        sigmoid: 1 / (1 + exp(-z_k))

of the response alone, the (prompt, response) text pair, or a template with {prompt} and {response}.
This is how the paper's reward models (e.g. an OpenAssistant DeBERTa reward model on HH-RLHF) plug in.
"""

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
    transcript,
)


def model_folder(model: str, revision: str | None) -> Path:
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, revision=revision))
    except Exception as exc:  # noqa: BLE001 - any hub failure means the same thing here
        raise ComponentLoadError(
            f"hf_classifier model {model!r} is neither a local folder nor reachable on the hub ({exc}); "
            "give options.model as a folder holding the classifier and its tokenizer"
        ) from None


@lru_cache(maxsize=4)
def load_classifier(folder: str, device: str):
    """(tokenizer, model) in eval mode, once per process and device; a pad token is borrowed from EOS if missing."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


def label_index(config, label: int | str, folder: Path) -> int:
    """The logit column of `label` (an index, or a name from config.id2label)."""
    names = {str(name): int(i) for i, name in config.id2label.items()}
    if isinstance(label, str):
        if label not in names:
            raise ComponentLoadError(f"{folder}: no label {label!r}; the model's labels are {sorted(names)}")
        return names[label]
    if not 0 <= label < config.num_labels:
        raise ComponentLoadError(f"{folder}: label index {label} is outside 0..{config.num_labels - 1}")
    return label


class HfClassifier(RewardComponent):
    kind = "hf_classifier"

    def folder(self) -> Path:
        return model_folder(self.options.model, self.options.revision)

    def model_files(self) -> list[Path]:
        return folder_files(self.folder())

    def _load(self):
        folder = self.folder()
        tokenizer, model = load_classifier(str(folder), self.device)
        column = label_index(model.config, self.options.label, folder)
        if self.options.transform == "softmax" and model.config.num_labels == 1:
            raise ComponentLoadError(f"{folder}: one output logit, softmax is always 1; use options.transform: sigmoid")
        return tokenizer, model, column

    def inputs(self, prompts: list[Prompt], responses: list[str]) -> tuple[list[str], list[str] | None]:
        """(texts, text pairs or None) for the tokenizer."""
        opts = self.options
        prompt_text = last_user_turn if opts.prompt_format == "last_user" else transcript
        if opts.input == "response":
            return responses, None
        if opts.input == "pair":
            return [prompt_text(p) for p in prompts], responses
        return [opts.template.replace("{prompt}", prompt_text(p)).replace("{response}", r) for p, r in zip(prompts, responses)], None

    def _score(self, prompts: list[Prompt], responses: list[str]) -> np.ndarray:
        import torch

        tokenizer, model, column = self.load()
        texts, pairs = self.inputs(prompts, responses)
        batch = tokenizer(
            texts, pairs, padding=True, truncation=True, max_length=self.options.max_tokens, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            logits = model(**batch).logits.double()
        probs = torch.softmax(logits, dim=-1) if self.options.transform == "softmax" else torch.sigmoid(logits)
        return probs[:, column].cpu().numpy()
