"""stages.cache.ParquetCache: entries come back in the order asked for with their metadata, entries
that lack ids or cannot be read are ignored, and two processes storing the same key both succeed."""

from __future__ import annotations

import logging
from multiprocessing import get_context

import pyarrow as pa
import pytest

from stages.cache import ParquetCache

KEY = "0f" + "1" * 62


def _table(ids: list[str]) -> pa.Table:
    return pa.table({"id": ids, "score": [float(len(i)) for i in ids]})


def test_entries_round_trip_in_the_order_asked_for(tmp_path):
    cache = ParquetCache(tmp_path / "scores")
    assert cache.load(KEY, ["a"]) is None
    path = cache.save(KEY, _table(["a", "bb", "ccc"]), {"seconds": 1.5})
    assert path == tmp_path / "scores" / "0f" / f"{KEY}.parquet"
    entry = cache.load(KEY, pa.array(["ccc", "a"]))
    assert entry.table.to_pydict() == {"id": ["ccc", "a"], "score": [3.0, 1.0]}
    assert entry.meta == {"seconds": 1.5}
    assert cache.load(KEY, ["a", "bb", "ccc"]).table.equals(_table(["a", "bb", "ccc"]))


def test_entries_lacking_ids_or_unreadable_are_ignored_with_a_warning(tmp_path, caplog):
    cache = ParquetCache(tmp_path)
    cache.save(KEY, _table(["a", "b"]))
    with caplog.at_level(logging.WARNING, logger="alol.cache"):
        assert cache.load(KEY, ["a", "z"]) is None
        assert "lacks 1 of the 2 ids" in caplog.text
        cache.path(KEY).write_bytes(b"not parquet")
        assert cache.load(KEY, ["a"]) is None
        assert "unreadable" in caplog.text and str(cache.path(KEY)) in caplog.text


def test_a_table_without_ids_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no 'id' column"):
        ParquetCache(tmp_path).save(KEY, pa.table({"score": [1.0]}))


def _store_many(folder: str) -> int:
    cache = ParquetCache(folder)
    for _ in range(20):
        cache.save(KEY, _table([str(i) for i in range(1000)]))
    return len(cache.load(KEY, ["0", "999"]).table)


def test_two_processes_storing_the_same_key_at_once_both_succeed(tmp_path):
    with get_context("spawn").Pool(2) as pool:
        assert pool.map(_store_many, [str(tmp_path)] * 2) == [2, 2]
    assert [p.name for p in ParquetCache(tmp_path).path(KEY).parent.iterdir()] == [f"{KEY}.parquet"]
