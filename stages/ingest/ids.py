"""Ids and splits of ingested rows, and the set of ids already accepted (for de-duplication).

    id       = blake2b-128(source ‖ 0x00 ‖ canonical_json(prompt) ‖ 0x00 ‖ response)
    pair_id  = blake2b-128(id_chosen ‖ id_rejected)                  (preference rows only)
    u        = blake2b-64(canonical_json(prompt)) / 2^64 ∈ [0, 1)
    split    = train if u < f_train, validation if u < f_train + f_validation, else test
    final    = a test prompt with v < data.final_fraction, v = blake2b-64("final" ‖ 0x00 ‖ canonical_json(prompt)) / 2^64

Every function of a prompt takes its canonical JSON, so one prompt always lands in one split.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from schemas.ingest import FINAL, SplitFractions

SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "validation": "validation", "valid": "validation", "val": "validation", "dev": "validation",
    "test": "test", "testing": "test",
}
# Reused encoder: json.dumps builds a new encoder per call when given options, a cost at a million rows.
CANONICAL_JSON = json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def canonical_prompt(prompt: list[dict[str, str]]) -> str:
    return CANONICAL_JSON.encode(prompt)


def row_digest(source: str, prompt_json: str, response: str) -> bytes:
    """id = blake2b-128(source ‖ 0x00 ‖ canonical_json(prompt) ‖ 0x00 ‖ response)."""
    payload = "\x00".join((source, prompt_json, response)).encode("utf-8")
    return hashlib.blake2b(payload, digest_size=16).digest()


def pair_digest(chosen_id: bytes, rejected_id: bytes) -> bytes:
    """pair_id = blake2b-128(id_chosen ‖ id_rejected)."""
    return hashlib.blake2b(chosen_id + rejected_id, digest_size=16).digest()


def prompt_position(prompt_json: str) -> float:
    """u = blake2b-64(canonical_json(prompt)) / 2^64, uniform in [0, 1) and fixed for a prompt."""
    digest = hashlib.blake2b(prompt_json.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def hash_split(prompt_json: str, fractions: SplitFractions) -> str:
    """train if u < f_train, validation if u < f_train + f_validation, else test."""
    u = prompt_position(prompt_json)
    if u < fractions.train:
        return "train"
    return "validation" if u < fractions.train + fractions.validation else "test"


def carve_validation(prompt_json: str, fractions: SplitFractions) -> str:
    """A source train row goes to validation if u < f_validation / (f_train + f_validation)."""
    share = fractions.train + fractions.validation
    return "validation" if share > 0 and prompt_position(prompt_json) < fractions.validation / share else "train"


def carve_final(prompt_json: str, final_fraction: float) -> str:
    """A test row goes to the locked `final` split if v < final_fraction, v a prompt hash independent of u."""
    digest = hashlib.blake2b(("final\x00" + prompt_json).encode("utf-8"), digest_size=8).digest()
    return FINAL if int.from_bytes(digest, "big") / 2**64 < final_fraction else "test"


class SeenIds:
    """Ids already accepted, as sorted runs of 16-byte digests (16 bytes per id; a Python set needs ~100).

    Runs of similar size are merged, so adding n ids costs O(n log n) and a lookup searches O(log n) runs.
    """

    def __init__(self) -> None:
        self.runs: list[np.ndarray] = []

    def contains(self, keys: np.ndarray) -> np.ndarray:
        found = np.zeros(len(keys), dtype=bool)
        for run in self.runs:
            at = np.minimum(np.searchsorted(run, keys), len(run) - 1)
            found |= run[at] == keys
        return found

    def add(self, keys: list[bytes]) -> None:
        if not keys:
            return
        self.runs.append(np.sort(np.array(keys, dtype="S16")))
        while len(self.runs) > 1 and len(self.runs[-2]) <= 2 * len(self.runs[-1]):
            newer, older = self.runs.pop(), self.runs.pop()
            self.runs.append(np.sort(np.concatenate([older, newer])))
