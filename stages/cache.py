"""A keyed store of small Parquet tables under a folder, shared across runs (under `run.cache_dir`).

Each entry is `<folder>/<key[:2]>/<key>.parquet`: a table with an `id` column, plus JSON metadata
saying how it was computed. The key says what the rows depend on (the caller builds it); the ids
guard against an entry that does not cover the rows asked for. Users: the score stage's
per-component scores and the evaluate stage's generations of pi_ref.

Writes go to a temporary name and are renamed into place (stages.io.atomic_path): a reader never
sees a partial entry, and two processes storing the same key at once both succeed. On an object store
(`run.cache_dir` a URL, stages.fs) an entry is one object written in one PUT, which is as atomic. An entry that
cannot be read, or lacks some of the ids asked for, is ignored with a warning (the caller computes
and stores it again).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages import fs
from stages.io import atomic_path

log = logging.getLogger("alol.cache")
METADATA_KEY = b"alol"


@dataclass(frozen=True)
class CacheEntry:
    """The rows of a stored table in the order of the ids asked for, and the metadata stored with it."""

    table: pa.Table
    meta: dict[str, Any]


class ParquetCache:
    """`<folder>/<key[:2]>/<key>.parquet` for each key."""

    def __init__(self, folder: fs.Location):
        self.folder = folder if fs.is_remote(folder) else Path(folder)

    @classmethod
    def under(cls, cache_dir: str, name: str) -> ParquetCache:
        """The cache `<run.cache_dir>/<name>` (a local folder or an object store prefix)."""
        return cls(fs.join(fs.location(cache_dir), name) if fs.is_remote(cache_dir) else Path(cache_dir) / name)

    def path(self, key: str) -> fs.Location:
        return fs.join(self.folder, key[:2], f"{key}.parquet")

    def load(self, key: str, ids: pa.Array | list[str]) -> CacheEntry | None:
        """The entry's rows for `ids`, in that order; None when absent, unreadable or lacking some of `ids`."""
        path = self.path(key)
        if not fs.is_file(path):
            return None
        try:
            table = pq.read_table(path) if isinstance(path, Path) else pq.read_table(pa.BufferReader(fs.read_bytes(path)))
            meta = json.loads((table.schema.metadata or {}).get(METADATA_KEY, b"{}"))
            positions = pc.index_in(pa.array(ids, pa.string()), value_set=table.column("id"))
        except (OSError, KeyError, pa.ArrowException, ValueError) as exc:
            log.warning("ignoring unreadable cache entry %s: %s", path, exc)
            return None
        if positions.null_count:
            log.warning("ignoring cache entry %s: it lacks %d of the %d ids asked for", path, positions.null_count, len(ids))
            return None
        return CacheEntry(table.take(positions).replace_schema_metadata(None), meta)

    def save(self, key: str, table: pa.Table, meta: dict[str, Any] | None = None) -> Path:
        """Store `table` (it must have an `id` column) under `key`, atomically, with `meta` as JSON."""
        if "id" not in table.column_names:
            raise ValueError(f"cache entry {key}: the table has no 'id' column (has {table.column_names})")
        path = self.path(key)
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta or {}, sort_keys=True)})
        if not isinstance(path, Path):
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink, compression="zstd")
            fs.write_bytes(path, sink.getvalue().to_pybytes())
            return path
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp, compression="zstd")
        return path
