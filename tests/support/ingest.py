"""Running the ingest stage in a test: `ingest(tmp_path, **data)` runs `stages.ingest.run` on `data`
settings, commits its output and opens it again; `rows`, `write_jsonl`, `assert_accounted` and the
sample files (`SAMPLES`, data/samples) are shared by the ingest tests."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from schemas.config import AlolConfig
from schemas.ingest import DataConfig
from schemas.manifest import StageResult
from stages.ingest import run
from stages.io import StageReader, StageWriter

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "samples"


def ingest(tmp_path: Path, **data: Any) -> tuple[StageResult, StageReader]:
    """Run the stage on `data` settings, commit its output and open it again (hashes verified)."""
    cfg = AlolConfig(data=DataConfig(**data))
    writer = StageWriter(tmp_path / "runs" / uuid.uuid4().hex[:8])
    result = run(cfg, {}, writer)
    writer.commit(
        stage="ingest", cache_key="test", result=result, config_fingerprints={}, config={}, inputs={},
        code_version="test", versions={},
    )
    return result, StageReader(writer.final_dir)


def rows(reader: StageReader, table: str = "ingest") -> list[dict[str, Any]]:
    return reader.read(table).to_pylist()


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def assert_accounted(result: StageResult, reader: StageReader) -> None:
    """rows_in = rows_out + rows_rejected, in the result, the manifest and the tables themselves."""
    out, rejected = reader.read("ingest").num_rows, reader.read("ingest_rejected").num_rows
    assert result.rows_in == result.rows_out + result.rows_rejected
    assert (result.rows_out, result.rows_rejected) == (out, rejected)
    assert reader.manifest.rows_in == out + rejected
    assert sum(result.metrics.rows_per_split.values()) == out
    assert sum(result.metrics.rejected_by_reason.values()) == rejected
    assert reader.metrics == result.metrics
