"""The ingest stage's row path: source records become checked, identified, split, de-duplicated rows, and
each candidate row is written to `ingest` or `ingest_rejected` (TableBuffer batches the writes).

Per batch of records: read each record in its row format (formats.py), give the valid ones a split and
ids (ids.py), reject any whose id was already accepted, then keep the group, reject it, or offer it to
its split's cap (split_cap.py). `finish` writes what the caps kept and accounts for every candidate:
rows_in = rows_out + rows_rejected.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from schemas.ingest import DataConfig, IngestMetrics
from schemas.manifest import StageResult
from stages.ingest.errors import IngestError
from stages.ingest.formats import (
    Candidate,
    Limits,
    Problem,
    detect_format,
    format_columns,
    partner_problem,
    to_candidates,
)
from stages.ingest.ids import (
    SPLIT_ALIASES,
    SeenIds,
    canonical_prompt,
    carve_final,
    carve_validation,
    hash_split,
    pair_digest,
    row_digest,
)
from stages.ingest.sources import META_JSON, Source, SourceRecord, safe_text
from stages.ingest.split_cap import Group, SplitCap
from stages.io import TableWriter

log = logging.getLogger("alol.ingest")

CAPPED = "over_max_rows_per_split"
FORMAT_HELP = (
    "expected `messages`, `prompt`+`chosen`+`rejected`, `chosen`+`rejected` (HH-RLHF) or "
    "`prompt`+`response`/`completion`; set data.format and data.columns"
)


class TableBuffer:
    """Rows collected column by column and written as one record batch every `batch_rows` rows."""

    def __init__(self, writer: TableWriter, schema: pa.Schema, batch_rows: int):
        self.writer, self.schema, self.batch_rows = writer, schema, batch_rows
        self.columns: dict[str, list[Any]] = {name: [] for name in schema.names}
        self.rows = 0

    def append(self, row: dict[str, Any]) -> None:
        for name, values in self.columns.items():
            values.append(row[name])
        self.rows += 1
        if self.rows >= self.batch_rows:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.writer.write(pa.Table.from_pydict(self.columns, schema=self.schema))
            self.columns = {name: [] for name in self.schema.names}
            self.rows = 0


class Ingestor:
    """Turns source records into checked, identified, split, de-duplicated rows and routes each candidate
    to `ingest` or `ingest_rejected`."""

    def __init__(self, data: DataConfig, source: Source, kept: TableBuffer, rejected: TableBuffer):
        self.data, self.source = data, source
        self.kept, self.rejected = kept, rejected
        self.mapping = source.mapping or data.columns
        self.limits = Limits(data.max_prompt_chars, data.max_response_chars)
        self.fmt: str | None = None
        self.used_columns: frozenset[str] = frozenset()
        fmt = source.fmt or (None if data.format == "auto" else data.format)
        if fmt is None and source.columns is not None:
            fmt = self._detect(source.columns, source.location, "header")
        if fmt is not None:
            self._use_format(fmt)
        self.seen = SeenIds()
        self.caps = {split: SplitCap(cap) for split in data.splits() if (cap := data.split_cap(split))}
        self.source_rows = self.rows_in = self.rows_out = 0
        self.split_rows: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.pairs_out = 0

    def _detect(self, columns: list[str], file: str, where: str) -> str:
        fmt = detect_format(columns, self.mapping)
        if fmt is None:
            columns_text = f"cannot tell the row format from the columns {sorted(columns)}"
            raise IngestError(file, where, f"{columns_text}: {FORMAT_HELP}")
        log.info("ingest format: %s (from the columns of %s)", fmt, file)
        return fmt

    def _use_format(self, fmt: str) -> None:
        """Read every following row in `fmt`; the columns it does not consume become `meta`."""
        self.fmt = fmt
        self.used_columns = frozenset(format_columns(fmt, self.mapping))

    def feed(self, records: list[SourceRecord]) -> None:
        groups = [self._group(record) for record in records]
        self._deduplicate(groups)
        for group in groups:
            self._route(group)

    def _group(self, record: SourceRecord) -> Group:
        self.source_rows += 1
        if record.problem is not None:
            return Group(record, [Candidate(None, None, None, record.problem)])
        if self.fmt is None:
            fmt = detect_format(record.data, self.mapping)
            if fmt is None:
                problem = Problem("<row>", "unknown_format", f"the fields {sorted(record.data)} fit no row format")
                return Group(record, [Candidate(None, None, None, problem)])
            self._use_format(fmt)
            log.info("ingest format: %s (from the fields of %s row %d)", self.fmt, record.file, record.row)
        group = Group(record, to_candidates(self.fmt, record.data, self.mapping, self.limits))
        if not group.valid:
            return group
        prompt_json = canonical_prompt(group.candidates[0].prompt)
        group.split, problem = self._split(record, prompt_json)
        if problem is not None:
            group.reject_all(problem)
            return group
        group.ids = [row_digest(self.source.name, prompt_json, c.response) for c in group.candidates]
        if len(group.ids) == 2:
            group.pair_id = pair_digest(*group.ids)
        extra = {k: v for k, v in record.data.items() if k not in self.used_columns}
        group.meta = safe_text(META_JSON.encode(extra)) if extra else "{}"
        return group

    def _split(self, record: SourceRecord, prompt_json: str) -> tuple[str | None, Problem | None]:
        split, problem = self._source_split(record, prompt_json)
        if split == "test" and self.data.final_fraction > 0:
            return carve_final(prompt_json, self.data.final_fraction), None
        return split, problem

    def _source_split(self, record: SourceRecord, prompt_json: str) -> tuple[str | None, Problem | None]:
        given = record.split if record.split is not None else record.data.get(self.mapping.split)
        if given is None:
            return hash_split(prompt_json, self.data.split_fractions), None
        split = SPLIT_ALIASES.get(given.strip().lower()) if isinstance(given, str) else None
        if split is None:
            detail = f"split {given!r} is not one of train, validation, test (or {', '.join(sorted(SPLIT_ALIASES))})"
            return None, Problem(self.mapping.split, "unknown_split", detail)
        if split == "train" and self.source.carve_validation:
            return carve_validation(prompt_json, self.data.split_fractions), None
        return split, None

    def _deduplicate(self, groups: list[Group]) -> None:
        """Reject every group with an id already accepted (earlier batch or earlier in this batch)."""
        valid = [g for g in groups if g.valid]
        keys = np.array([i for g in valid for i in g.ids], dtype="S16")
        earlier = self.seen.contains(keys) if len(keys) else np.zeros(0, dtype=bool)
        fresh: set[bytes] = set()
        accepted: list[bytes] = []
        position = 0
        for group in valid:
            duplicate = [bool(earlier[position + k]) or key in fresh for k, key in enumerate(group.ids)]
            position += len(group.ids)
            if any(duplicate):
                self._mark_duplicate(group, duplicate)
            else:
                fresh.update(group.ids)
                accepted.extend(group.ids)
        self.seen.add(accepted)

    @staticmethod
    def _mark_duplicate(group: Group, duplicate: list[bool]) -> None:
        problems = [
            Problem("id", "duplicate_id", f"same source, prompt and response as an earlier row (id {key.hex()})")
            for key in group.ids
        ]
        for k, candidate in enumerate(group.candidates):
            if duplicate[k]:
                candidate.problem = problems[k]
            else:
                candidate.problem = partner_problem(problems[1 - k])

    def _route(self, group: Group) -> None:
        self.rows_in += len(group.candidates)
        if not group.valid:
            for candidate in group.candidates:
                self._reject(group.record, candidate.problem)
        elif group.split not in self.caps:
            self._keep(group)
        else:
            for cut in self.caps[group.split].offer(group):
                self._cut(cut)

    def _reject(self, record: SourceRecord, problem: Problem) -> None:
        if self.data.on_invalid == "fail":
            raise IngestError.invalid_row(record.file, record.row, problem)
        self._write_rejected(record, problem)

    def _cut(self, group: Group) -> None:
        limit = self.data.split_cap(group.split)
        detail = f"split {group.split!r} already holds data.max_rows_per_split={limit} rows with smaller ids"
        for _ in group.candidates:
            self._write_rejected(group.record, Problem("split", CAPPED, detail))

    def _write_rejected(self, record: SourceRecord, problem: Problem) -> None:
        self.reasons[problem.reason] += 1
        self.rejected.append(
            {"source_file": record.file, "source_row": record.row, "field": problem.field,
             "reason": problem.reason, "detail": problem.detail, "raw": record.raw_text()}
        )

    def _keep(self, group: Group) -> None:
        pair_id = group.pair_id.hex() if group.pair_id else None
        for key, candidate in zip(group.ids, group.candidates, strict=True):
            self.kept.append(
                {"id": key.hex(), "split": group.split, "prompt": candidate.prompt, "response": candidate.response,
                 "pair_id": pair_id, "preference": candidate.preference, "source": self.source.name,
                 "meta": group.meta}
            )
        self.rows_out += len(group.candidates)
        self.split_rows[group.split] += len(group.candidates)
        self.pairs_out += pair_id is not None

    def finish(self) -> StageResult:
        """Write the groups each split cap kept (in id order), flush, and account for every candidate."""
        for split in self.data.splits():
            if split in self.caps:
                for group in self.caps[split].kept():
                    self._keep(group)
        self.kept.flush()
        self.rejected.flush()
        if self.source_rows == 0:
            raise IngestError(self.source.location, "", "the source holds no rows")
        if self.fmt is None and self.reasons["unknown_format"]:
            raise IngestError(self.source.location, "", f"no row fits a known row format: {FORMAT_HELP}")
        rows_rejected = sum(self.reasons.values())
        if self.rows_in != self.rows_out + rows_rejected:
            raise RuntimeError(f"ingest lost rows: {self.rows_in} in, {self.rows_out} out, {rows_rejected} rejected")
        if self.rows_out == 0:
            log.warning("no valid rows in %s: every row is in ingest_rejected", self.source.name)
        return StageResult(
            rows_in=self.rows_in,
            rows_out=self.rows_out,
            rows_rejected=rows_rejected,
            metrics=IngestMetrics(
                source=self.source.name,
                format=self.fmt,
                source_rows=self.source_rows,
                rows_per_split={split: self.split_rows[split] for split in self.data.splits()},
                pairs_out=self.pairs_out,
                rejected_by_reason=dict(sorted(self.reasons.items())),
                rows_invalid=rows_rejected - self.reasons[CAPPED],
                rows_in_equals_out_plus_rejected=True,
            ),
        )
