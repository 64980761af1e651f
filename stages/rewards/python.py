"""A user reward function `package.module:function`, called on batches:

    function(prompts: list[list[{role, content}]], responses: list[str]) -> sequence of floats (one per row)

with bounds declared in the options (`lower`, `upper`). The function's module file is part of the
fingerprint, so editing it recomputes the cached scores.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import numpy as np

from stages.rewards.base import ComponentLoadError, Prompt, RewardComponent


def resolve(spec: str):
    module_name, _, function_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ComponentLoadError(
            f"python component {spec!r}: cannot import module {module_name!r} ({exc}); install the package "
            "that provides it or put its folder on PYTHONPATH"
        ) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ComponentLoadError(f"python component {spec!r}: module {module_name!r} has no function {function_name!r}")
    return function


class PythonFunction(RewardComponent):
    kind = "python"

    def __init__(self, options, device="cpu", state=None):
        super().__init__(options, device, state)
        self.lower, self.upper = options.lower, options.upper

    def model_files(self) -> list[Path]:
        source = inspect.getsourcefile(resolve(self.options.function))
        return [Path(source)] if source else []

    def _load(self):
        return resolve(self.options.function)

    def _score(self, prompts: list[Prompt], responses: list[str]) -> np.ndarray:
        scores = np.asarray(self.load()(prompts, responses), dtype=np.float64)
        if scores.shape != (len(responses),):
            raise ValueError(
                f"python component {self.options.function!r} returned shape {scores.shape} for {len(responses)} rows"
            )
        return scores
