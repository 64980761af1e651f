"""Ingest stage: read the offline data, check every row, give it an id and a split, write `ingest` and
`ingest_rejected`.

Sources (`data.source`, sources.py): the chatterbot-corpus English dialogues, a local JSONL / JSON / CSV /
Parquet file, or anything `datasets` loads (hub name or saved folder). Rows are streamed in record batches
of `data.batch_rows`; only a JSON array file is read whole. Row formats (`data.format`) are in formats.py.

    id       = blake2b-128(source ‖ 0x00 ‖ canonical_json(prompt) ‖ 0x00 ‖ response)
    pair_id  = blake2b-128(id_chosen ‖ id_rejected)                  (preference rows only)
    u        = blake2b-64(canonical_json(prompt)) / 2^64 ∈ [0, 1)
    split    = the source's split if it has one, else train if u < f_train,
               validation if u < f_train + f_validation, else test    (one prompt, one split)

Every candidate row ends in exactly one of the two tables, so rows_in = rows_out + rows_rejected.
A candidate row is one per source row, two for a preference pair (chosen and rejected). Rows cut by
`max_rows_per_split` go to `ingest_rejected` with reason `over_max_rows_per_split`.

Modules: sources.py (reading), formats.py (row formats and field checks), ids.py (ids, splits, seen ids),
split_cap.py (the per-split cap), ingestor.py (the row path and the accounting), errors.py (IngestError).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator

from tqdm import tqdm

from schemas.config import AlolConfig
from schemas.ingest import INGEST_SCHEMA, REJECTED_SCHEMA
from schemas.manifest import StageResult
from stages.ingest.ingestor import Ingestor, TableBuffer
from stages.ingest.sources import SourceRecord, open_source, source_fingerprint
from stages.io import StageReader, StageWriter

log = logging.getLogger("alol.ingest")


def external_inputs(cfg: AlolConfig) -> dict[str, str]:
    """The data files' digests, for the ingest cache key (pipeline.runner.STAGES)."""
    return source_fingerprint(cfg.data)


def batches(records: Iterator[SourceRecord], size: int) -> Iterator[list[SourceRecord]]:
    """The records in lists of `size` (the last one shorter)."""
    while batch := list(itertools.islice(records, size)):
        yield batch


def run(cfg: AlolConfig, inputs: dict[str, StageReader], out: StageWriter) -> StageResult:
    """Ingest `cfg.data` into the tables `ingest` and `ingest_rejected` (the module docstring has the rules)."""
    data = cfg.data
    source = open_source(data)
    records = tqdm(source.records, desc="ingest", unit="rows", disable=None, mininterval=1.0)
    with out.table("ingest", INGEST_SCHEMA) as kept, out.table("ingest_rejected", REJECTED_SCHEMA) as rejected:
        ingestor = Ingestor(
            data, source, TableBuffer(kept, INGEST_SCHEMA, data.batch_rows),
            TableBuffer(rejected, REJECTED_SCHEMA, data.batch_rows),
        )
        for batch in batches(iter(records), data.batch_rows):
            ingestor.feed(batch)
        result = ingestor.finish()
    log.info(
        "ingest %s: %d rows in, %d out %s, %d rejected %s", source.name, result.rows_in, result.rows_out,
        result.metrics.rows_per_split, result.rows_rejected, result.metrics.rejected_by_reason,
    )
    return result
