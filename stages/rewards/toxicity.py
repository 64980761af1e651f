"""safety = 1 - P(toxic): the Jigsaw BiLSTM of `toxic-comment-classifier`, ported to PyTorch (no TensorFlow).

Model (Keras original): Embedding(20000, 50) -> Bidirectional LSTM(50, full sequences) -> max over time ->
Dense(50, relu) -> Dense(6, sigmoid) over the labels toxic, severe_toxic, obscene, threat, insult,
identity_hate. Input: the Keras Tokenizer's word ids (lower-cased, filter characters replaced by spaces,
split on spaces, ids >= 20000 dropped), the last 100 kept, zero-padded in front to 100. The LSTM runs over
the padding too (the Keras model has no mask), so the padding is part of the computation.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from schemas.score import TOXICITY_LABELS
from stages.rewards.base import ComponentLoadError, Prompt, RewardComponent, package_dir, require_files

PIP_SPEC = "toxic-comment-classifier==0.3.0"
MAX_LEN = 100


class KerasTokenizerState:
    """Stand-in for keras' Tokenizer class: unpickling only restores its attributes into this plain object."""


class RestrictedUnpickler(pickle.Unpickler):
    """Admits the Keras Tokenizer (as a plain attribute holder), the two collections it uses and plain builtin
    types; any other global (a function, `os.system`, `builtins.eval`) is refused."""

    ALLOWED = {
        ("keras.src.legacy.preprocessing.text", "Tokenizer"): KerasTokenizerState,
        ("keras.preprocessing.text", "Tokenizer"): KerasTokenizerState,
        ("keras_preprocessing.text", "Tokenizer"): KerasTokenizerState,
        ("collections", "OrderedDict"): OrderedDict,
        ("collections", "defaultdict"): defaultdict,
        **{("builtins", t.__name__): t for t in (int, float, str, bool, list, dict, tuple, set, frozenset)},
    }

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a tokenizer pickle") from None


@dataclass(frozen=True)
class WordTokenizer:
    """The parts of the Keras Tokenizer that `texts_to_sequences` uses."""

    word_index: dict[str, int]
    filters: str
    split: str
    lower: bool

    def ids(self, text: str) -> list[int]:
        """Keras `text_to_word_sequence` + `texts_to_sequences` (no OOV token): known words with id < num_words."""
        if self.lower:
            text = text.lower()
        text = text.translate(str.maketrans({c: self.split for c in self.filters}))
        return [self.word_index[w] for w in text.split(self.split) if w in self.word_index]

    def padded(self, texts: list[str], max_len: int = MAX_LEN) -> np.ndarray:
        """Keras `pad_sequences` defaults: keep the last `max_len` ids, zero-pad in front."""
        out = np.zeros((len(texts), max_len), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = self.ids(text)[-max_len:]
            if ids:
                out[row, max_len - len(ids):] = ids
        return out


def load_tokenizer(path: Path) -> WordTokenizer:
    with open(path, "rb") as fh:
        try:
            state = RestrictedUnpickler(fh).load()
        except pickle.UnpicklingError as exc:
            raise ComponentLoadError(f"{path}: {exc}") from None
    if not isinstance(state, KerasTokenizerState):
        raise ComponentLoadError(f"{path}: expected a pickled Keras Tokenizer, found {type(state).__name__}")
    attrs = vars(state)
    if attrs.get("char_level") or attrs.get("oov_token") is not None:
        raise ComponentLoadError(f"{path}: only word-level tokenizers without an OOV token are supported")
    num_words = attrs.get("num_words") or None
    index = {w: i for w, i in attrs["word_index"].items() if num_words is None or i < num_words}
    return WordTokenizer(word_index=index, filters=attrs["filters"], split=attrs["split"], lower=attrs["lower"])


def build_model(weights: Path):
    """The BiLSTM in torch with the Keras weights (Keras LSTM gates i, f, c, o = torch i, f, g, o)."""
    import h5py
    import torch
    from torch import nn

    class JigsawBiLSTM(nn.Module):
        def __init__(self, vocab: int, dim: int, units: int, hidden: int, labels: int):
            super().__init__()
            self.embedding = nn.Embedding(vocab, dim)
            self.lstm = nn.LSTM(dim, units, batch_first=True, bidirectional=True)
            self.dense = nn.Linear(2 * units, hidden)
            self.out = nn.Linear(hidden, labels)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            states, _ = self.lstm(self.embedding(ids))
            pooled = states.max(dim=1).values
            return torch.sigmoid(self.out(torch.relu(self.dense(pooled))))

    def var(h5: h5py.File, group: str, i: int) -> torch.Tensor:
        return torch.from_numpy(np.asarray(h5[f"layers/{group}/vars/{i}"], dtype=np.float32))

    with h5py.File(weights, "r") as h5:
        embedding = var(h5, "embedding", 0)
        units = h5["layers/bidirectional/forward_layer/cell/vars/1"].shape[0]
        hidden = h5["layers/dense/vars/1"].shape[0]
        labels = h5["layers/dense_1/vars/1"].shape[0]
        model = JigsawBiLSTM(embedding.shape[0], embedding.shape[1], units, hidden, labels)
        state = {"embedding.weight": embedding}
        for direction, suffix in (("forward_layer", ""), ("backward_layer", "_reverse")):
            cell = f"bidirectional/{direction}/cell"
            state[f"lstm.weight_ih_l0{suffix}"] = var(h5, cell, 0).T
            state[f"lstm.weight_hh_l0{suffix}"] = var(h5, cell, 1).T
            state[f"lstm.bias_ih_l0{suffix}"] = var(h5, cell, 2)
            state[f"lstm.bias_hh_l0{suffix}"] = torch.zeros(4 * units)
        state["dense.weight"], state["dense.bias"] = var(h5, "dense", 0).T, var(h5, "dense", 1)
        state["out.weight"], state["out.bias"] = var(h5, "dense_1", 0).T, var(h5, "dense_1", 1)
    model.load_state_dict({k: v.contiguous() for k, v in state.items()})
    return model.eval()


@lru_cache(maxsize=2)
def load_classifier(weights: str, tokenizer: str, device: str):
    """(tokenizer, model), loaded once per process and device."""
    return load_tokenizer(Path(tokenizer)), build_model(Path(weights)).to(device)


def asset_files() -> list[Path]:
    folder = package_dir("toxic_classifier", PIP_SPEC, no_deps=True) / "model"
    return require_files([folder / "model.weights.h5", folder / "tokenizer.pickle"], PIP_SPEC)


def predict(tokenizer: WordTokenizer, model, texts: list[str], device: str) -> np.ndarray:
    """P(label | text) for the six Jigsaw labels, shape (rows, 6)."""
    import torch

    ids = torch.from_numpy(tokenizer.padded(texts)).to(device)
    with torch.inference_mode():
        return model(ids).double().cpu().numpy()


def label_probabilities(texts: list[str], device: str = "cpu") -> np.ndarray:
    """`predict` with the packaged model (loaded once per process)."""
    weights, tokenizer_file = asset_files()
    return predict(*load_classifier(str(weights), str(tokenizer_file), device), texts, device)


class Toxicity(RewardComponent):
    """safety = 1 - P(label | response), label `toxic` by default."""

    kind = "toxicity"

    def model_files(self) -> list[Path]:
        return asset_files()

    def _load(self):
        weights, tokenizer_file = asset_files()
        return load_classifier(str(weights), str(tokenizer_file), self.device)

    def _score(self, prompts: list[Prompt], responses: list[str]) -> np.ndarray:
        tokenizer, model = self.load()
        column = TOXICITY_LABELS.index(self.options.label)
        return 1.0 - predict(tokenizer, model, responses, self.device)[:, column]
