"""Writes data/samples/pairs.parquet: chat prompts as list<struct<role, content>>, a response, a split column.

Run from the repository root: `.venv/bin/python data/samples/make_parquet.py`.
"""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROWS = [
    ("What is the tallest mountain on Earth?", "Mount Everest, at about 8,849 metres.", "train"),
    ("How do plants drink water?", "Their roots take it up and it rises through the stem.", "train"),
    ("Give me a word that rhymes with cat.", "Hat.", "train"),
    ("What is the opposite of cold?", "Hot.", "validation"),
    ("Which planet is closest to the sun?", "Mercury.", "test"),
]


def main() -> None:
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    table = pa.table(
        {
            "prompt": pa.array([[{"role": "user", "content": p}] for p, _, _ in ROWS], pa.list_(message)),
            "response": [r for _, r, _ in ROWS],
            "split": [s for _, _, s in ROWS],
            "difficulty": pa.array([1, 2, 1, 1, 2], pa.int32()),
        }
    )
    pq.write_table(table, Path(__file__).with_name("pairs.parquet"))


if __name__ == "__main__":
    main()
