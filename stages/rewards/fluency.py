"""fluency = (1 / T) sum_t log p_LM(y_t | x, y_<t): the mean log-prob per response token under an
independent language model (default Gemma-3-270M, which no training reward or policy uses).

The prompt is rendered as the policies' prompts are (stages.models.tokenize: the LM's chat template,
else `role: content` lines and `assistant:`) and the response gets EOS appended, so every response has
at least one token and one that stops where it should scores higher. An evaluation judge
(`evaluate.judges`, kind `fluency`), not a training reward: its bounds are (-inf, 0].
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from schemas.evaluate import FluencyOptions
from stages.io import folder_files
from stages.models import logprobs, tokenize
from stages.models.logprobs import length_batches, response_token_logprobs
from stages.models.store import GEMMA3, gemma3_gguf_module, load_causal_lm, load_tokenizer, resolve_model
from stages.models.tokenize import encode_pair
from stages.rewards.base import Prompt, RewardComponent

log = logging.getLogger("alol.evaluate")


class Fluency(RewardComponent):
    kind = "fluency"
    lower = -math.inf
    upper = 0.0

    def __init__(self, options: FluencyOptions, device: str = "cpu", state=None, cache_dir: str | Path = "data/cache"):
        super().__init__(options, device, state)
        self.cache_dir = cache_dir

    def model_files(self) -> list[Path]:
        if self.options.model == GEMMA3:
            return []  # fingerprinted by the GGUF's sha256 (below), not by a converted folder of 1 GB
        return folder_files(resolve_model(self.options.model, self.cache_dir))

    def fingerprint(self) -> str | None:
        if self.options.model == GEMMA3:
            # The converted weights follow from the GGUF and from transformers' dequantisation.
            return f"{GEMMA3}:{gemma3_gguf_module().EXPECTED_SHA256}:transformers {metadata.version('transformers')}"
        return super().fingerprint()

    def code_fingerprint(self) -> str:
        """This module, the base module, and the tokenisation and log-prob code it scores with."""
        digest = hashlib.sha256(super().code_fingerprint().encode())
        for module in (tokenize, logprobs):
            digest.update(Path(inspect.getsourcefile(module)).read_bytes())
        return digest.hexdigest()

    def _load(self):
        folder = resolve_model(self.options.model, self.cache_dir)
        log.info("fluency judge: loading %s", folder)
        return load_tokenizer(folder), load_causal_lm(folder).to(self.device)

    @torch.no_grad()
    def _score(self, prompts: list[Prompt], responses: list[str]) -> np.ndarray:
        tokenizer, model = self.load()
        o = self.options
        pairs = [encode_pair(tokenizer, p, r, o.max_prompt_tokens, o.max_response_tokens) for p, r in zip(prompts, responses)]
        scores = np.empty(len(pairs), dtype=np.float64)
        for batch in length_batches([len(p) + len(r) for p, r in pairs], o.token_budget):
            rows = response_token_logprobs(model, [pairs[i][0] for i in batch], [pairs[i][1] for i in batch])
            for i, row in zip(batch, rows):
                scores[i] = float(row.double().mean())
        return scores
