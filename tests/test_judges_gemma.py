"""The default judges for real on a few rows: fluency under Gemma-3-270M (converted once into the
checkout's git-ignored `data/cache`) and 1 - p(profane) from alt-profanity-check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from schemas.config import load_config
from stages.evaluate.judges import Judges

SHARED_CACHE = Path(__file__).resolve().parent.parent / "data" / "cache"

pytestmark = pytest.mark.slow


def test_default_judges_prefer_fluent_and_inoffensive_answers_and_are_cached(tmp_path):
    cfg = load_config("default", overrides={"run.cache_dir": str(SHARED_CACHE)})
    judges = Judges(cfg)
    assert judges.names == ["fluency", "inoffensive"]
    prompts = [[{"role": "user", "content": "What is the capital of France?"}]] * 3
    responses = [
        "The capital of France is Paris.",
        "France capital the of purple is quickly banana.",
        "Shut up, you fucking idiot.",
    ]
    ids = [f"{tmp_path.name}-{i}" for i in range(3)]  # a fresh cache entry for this test
    scores = judges.score(ids, prompts, responses)
    fluency, inoffensive = scores["fluency"], scores["inoffensive"]
    assert np.all(fluency < 0) and fluency[0] > fluency[1] + 1.0, fluency
    assert inoffensive[2] < 0.2 < 0.8 < min(inoffensive[0], inoffensive[1]), inoffensive
    again = Judges(cfg)
    np.testing.assert_array_equal(again.score(ids, prompts, responses)["fluency"], fluency)
    assert again.cache_hits == 2
