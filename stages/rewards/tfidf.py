"""The paper's informativeness score (LoL-RL `get_batch_tfidf_reward`).

Terms: lower-cased runs of two or more word characters (scikit-learn's default `\\b\\w\\w+\\b`). Fit on the
training responses: idf(t) = ln((1 + n) / (1 + df(t))) + 1 over n documents. A response with term counts
c(t) over the vocabulary gets w(t) = c(t) idf(t) / ||c idf||_2 and

    tfidf = mean_{t: c(t) > 0} w(t) x (k / 10 if k < 5 else 1),   k = number of distinct vocabulary terms,

and 0 when k = 0. Every w(t) is in (0, 1], so the score is in [0, 1].
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np

from stages.rewards.base import Prompt, RewardComponent

TOKEN = re.compile(r"(?u)\b\w\w+\b")


def terms(text: str) -> list[str]:
    return TOKEN.findall(text.lower())


def fit_idf(responses: Iterable[str]) -> dict[str, Any]:
    """Vocabulary and smoothed idf of the training responses: {"documents": n, "idf": {term: idf}}."""
    document_frequency: Counter[str] = Counter()
    documents = 0
    for text in responses:
        documents += 1
        document_frequency.update(set(terms(text)))
    idf = {t: math.log((1 + documents) / (1 + df)) + 1.0 for t, df in sorted(document_frequency.items())}
    return {"documents": documents, "idf": idf}


def informativeness(text: str, idf: dict[str, float], min_terms: int, divisor: float) -> float:
    counts = Counter(t for t in terms(text) if t in idf)
    if not counts:
        return 0.0
    weights = np.array([c * idf[t] for t, c in counts.items()], dtype=np.float64)
    weights /= np.linalg.norm(weights)
    penalty = len(counts) / divisor if len(counts) < min_terms else 1.0
    return float(weights.mean() * penalty)


class Tfidf(RewardComponent):
    kind = "tfidf"
    fitted = True

    @classmethod
    def fit(cls, options, train_responses: Iterable[str]) -> dict[str, Any]:
        return fit_idf(train_responses)

    def _load(self) -> dict[str, float]:
        if self.state is None:
            raise ValueError("the tfidf component must be fitted on the training responses first (Tfidf.fit)")
        return self.state["idf"]

    def _score(self, prompts: list[Prompt], responses: list[str]) -> list[float]:
        idf = self.load()
        return [informativeness(text, idf, self.options.min_terms, self.options.penalty_divisor) for text in responses]
