"""Per-component score cache: one Parquet file (id, score) per cache key, written atomically.

The key (see `stages.score.component_cache_key`) covers the component's kind and options, its model
fingerprint, its code and the input's content hash, but not its name or weight: reweighting or renaming
a component, or adding another one, reuses these scores.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

log = logging.getLogger("alol.score")
SCHEMA = pa.schema([("id", pa.string()), ("score", pa.float64())])


class ScoreCache:
    """`<folder>/<key[:2]>/<key>.parquet`; the file's metadata holds how the scores were computed."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.parquet"

    def load(self, key: str, ids: pa.Array) -> tuple[np.ndarray, dict[str, Any]] | None:
        """Cached scores in the order of `ids`, and their metadata; None when absent, unreadable or not covering `ids`."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            table = pq.read_table(path)
            meta = json.loads((table.schema.metadata or {}).get(b"alol", b"{}"))
        except (OSError, pa.ArrowException, ValueError) as exc:
            log.warning("ignoring unreadable score cache %s: %s", path, exc)
            return None
        positions = pc.index_in(ids, value_set=table.column("id"))
        if positions.null_count:
            log.warning("ignoring score cache %s: it lacks %d of the input's ids", path, positions.null_count)
            return None
        scores = table.column("score").to_numpy()
        return scores[positions.to_numpy()], meta

    def save(self, key: str, ids: pa.Array, scores: np.ndarray, meta: dict[str, Any]) -> Path:
        """Write to a temporary file in the same folder, then rename: readers never see a partial file."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        table = pa.table({"id": ids, "score": pa.array(scores, pa.float64())}, schema=SCHEMA)
        table = table.replace_schema_metadata({"alol": json.dumps(meta, sort_keys=True)})
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            pq.write_table(table, tmp, compression="zstd")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path
