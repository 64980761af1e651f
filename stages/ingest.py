"""Ingest stage: read the offline data, check every row, give it an id and a split, write `ingest` and
`ingest_rejected`.

Sources (`data.source`): the chatterbot-corpus English dialogues, a local JSONL / JSON / CSV / Parquet
file, or anything `datasets` loads (hub name or saved folder). Rows are streamed in record batches of
`data.batch_rows`; only a JSON array file is read whole.

    id       = blake2b-128(source ‖ 0x00 ‖ canonical_json(prompt) ‖ 0x00 ‖ response)
    pair_id  = blake2b-128(id_chosen ‖ id_rejected)                  (preference rows only)
    u        = blake2b-64(canonical_json(prompt)) / 2^64 ∈ [0, 1)
    split    = the source's split if it has one, else train if u < f_train,
               validation if u < f_train + f_validation, else test    (one prompt, one split)

Every candidate row ends in exactly one of the two tables, so rows_in = rows_out + rows_rejected.
A candidate row is one per source row, two for a preference pair (chosen and rejected). Rows cut by
`max_rows_per_split` go to `ingest_rejected` with reason `over_max_rows_per_split`.
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import importlib.util
import itertools
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from tqdm import tqdm

from schemas.base import UserInputError
from schemas.config import AlolConfig
from schemas.ingest import INGEST_SCHEMA, REJECTED_SCHEMA, SPLITS, ColumnMapping, DataConfig, IngestMetrics, SplitFractions
from schemas.manifest import StageResult
from stages.io import StageReader, StageWriter, TableWriter
from stages.ingest_formats import (
    Candidate,
    Limits,
    Problem,
    detect_format,
    format_columns,
    partner_problem,
    to_candidates,
)

log = logging.getLogger("alol.ingest")

SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "validation": "validation", "valid": "validation", "val": "validation", "dev": "validation",
    "test": "test", "testing": "test",
}
FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")
CAPPED = "over_max_rows_per_split"
FORMAT_HELP = (
    "expected `messages`, `prompt`+`chosen`+`rejected`, `chosen`+`rejected` (HH-RLHF) or "
    "`prompt`+`response`/`completion`; set data.format and data.columns"
)
UTF8_BOM = b"\xef\xbb\xbf"
CSV_FIELD_LIMIT = 2**31 - 1
# Reused encoders: json.dumps builds a new encoder per call when given options, a cost at a million rows.
CANONICAL_JSON = json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(",", ":"))
META_JSON = json.JSONEncoder(ensure_ascii=False, sort_keys=True, default=str)


class IngestError(UserInputError):
    """Input that cannot be ingested. The message is one line naming the file, the row or line and the field."""

    def __init__(self, file: str, where: str, message: str):
        self.file, self.where = file, where
        text = f"{file}: {where}: {message}" if where else f"{file}: {message}"
        super().__init__(" ".join(text.splitlines()))

    @classmethod
    def invalid_row(cls, file: str, row: int, problem: Problem) -> IngestError:
        return cls(
            file,
            f"row {row}, field {problem.field!r}",
            f"{problem.detail} [{problem.reason}]; fix the row or set data.on_invalid=quarantine to set it aside",
        )


def safe_text(text: str) -> str:
    """Text storable as UTF-8: lone surrogates (undecodable bytes) become U+FFFD."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


@dataclass
class SourceRecord:
    """One source row: its file and 1-based row number, its fields, or the problem that kept it unread."""

    file: str
    row: int
    data: dict[str, Any] | None
    raw: str | None = None
    split: str | None = None
    problem: Problem | None = None

    def raw_text(self) -> str:
        if self.raw is None:
            self.raw = META_JSON.encode(self.data)
        return safe_text(self.raw)


@dataclass
class Source:
    """An opened source: its name (part of every id) and its records, plus what is known before any row."""

    name: str
    location: str
    records: Iterator[SourceRecord]
    columns: list[str] | None = None
    fmt: str | None = None
    mapping: ColumnMapping | None = None
    carve_validation: bool = False


# --- sources -------------------------------------------------------------------------------------


def open_source(data: DataConfig) -> Source:
    if data.source == "chatterbot":
        files = chatterbot_files()
        location = str(files[0].parent) if files else "chatterbot-corpus"
        return Source("chatterbot", location, read_chatterbot(files), fmt="prompt_response", mapping=ColumnMapping())
    if data.source == "file":
        return open_file(Path(data.path), data.batch_rows)
    return open_datasets(data)


def chatterbot_files() -> list[Path]:
    """The English YAML files of the chatterbot-corpus package, found without importing it."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise IngestError("chatterbot-corpus", "", "package not installed; run `make setup` (chatterbot-corpus==1.3.3)")
    return sorted((Path(spec.submodule_search_locations[0]) / "data" / "english").glob("*.yml"))


def read_chatterbot(files: list[Path]) -> Iterator[SourceRecord]:
    """Each conversation's consecutive turns as prompt -> response; the row number counts pairs in a file."""
    for path in files:
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            mark = getattr(exc, "problem_mark", None)
            raise IngestError(str(path), f"line {mark.line + 1}" if mark else "", f"not valid YAML: {exc}") from None
        conversations = document.get("conversations") if isinstance(document, dict) else None
        if not isinstance(conversations, list):
            raise IngestError(str(path), "", "no 'conversations' list in this chatterbot corpus file")
        row = 0
        for number, turns in enumerate(conversations, start=1):
            if not isinstance(turns, list):
                row += 1
                problem = Problem("conversations", "wrong_type", f"conversation {number} is not a list of turns")
                yield SourceRecord(str(path), row, None, raw=repr(turns), problem=problem)
                continue
            for turn in range(len(turns) - 1):
                row += 1
                fields = {"prompt": turns[turn], "response": turns[turn + 1], "topic": path.stem,
                          "conversation": number, "turn": turn + 1}
                yield SourceRecord(str(path), row, fields)


def open_file(path: Path, batch_rows: int) -> Source:
    if not path.is_file():
        raise IngestError(str(path), "", "no such file (data.path)")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return Source(path.name, str(path), read_jsonl(path))
    if suffix == ".json":
        return Source(path.name, str(path), read_json_array(path))
    if suffix == ".csv":
        header, records = read_csv(path)
        return Source(path.name, str(path), records, columns=header)
    if suffix == ".parquet":
        parquet = open_parquet(path)
        records = read_parquet(path, parquet, batch_rows)
        return Source(path.name, str(path), records, columns=parquet.schema_arrow.names)
    raise IngestError(str(path), "", f"unknown file type {suffix!r}; expected one of {', '.join(FILE_SUFFIXES)}")


def read_jsonl(path: Path) -> Iterator[SourceRecord]:
    """One JSON object per line, read line by line; blank lines are skipped, the row number is the line number."""
    file = str(path)
    with open(path, "rb") as fh:
        for line_number, line in enumerate(fh, start=1):
            if line_number == 1 and line.startswith(UTF8_BOM):
                line = line[len(UTF8_BOM):]
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raw = line.decode("utf-8", "replace").rstrip("\r\n")
                problem = Problem("<row>", "undecodable", f"byte {exc.start + 1} of the line is not valid UTF-8")
                yield SourceRecord(file, line_number, None, raw=raw, problem=problem)
                continue
            yield json_record(file, line_number, text.rstrip("\r\n"))


def json_record(file: str, row: int, text: str) -> SourceRecord:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        problem = Problem("<row>", "invalid_json", f"not valid JSON at column {exc.colno}: {exc.msg}")
        return SourceRecord(file, row, None, raw=text, problem=problem)
    if not isinstance(value, dict):
        problem = Problem("<row>", "not_an_object", f"expected a JSON object, got {type(value).__name__}")
        return SourceRecord(file, row, None, raw=text, problem=problem)
    return SourceRecord(file, row, value, raw=text)


def read_json_array(path: Path) -> Iterator[SourceRecord]:
    """A JSON array of objects, read whole; the row number is the element's 1-based position."""
    file = str(path)
    content = path.read_bytes()
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = content.count(b"\n", 0, exc.start) + 1
        raise IngestError(file, f"line {line}", f"byte {exc.start + 1} is not valid UTF-8") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise IngestError(file, f"line {exc.lineno}, column {exc.colno}", f"not valid JSON: {exc.msg}") from None
    if not isinstance(value, list):
        raise IngestError(file, "line 1", f"expected a JSON array of objects, got {type(value).__name__}")
    for row, item in enumerate(value, start=1):
        if isinstance(item, dict):
            yield SourceRecord(file, row, item)
        else:
            problem = Problem("<row>", "not_an_object", f"expected a JSON object, got {type(item).__name__}")
            yield SourceRecord(file, row, None, raw=json.dumps(item, ensure_ascii=False), problem=problem)


def read_csv(path: Path) -> tuple[list[str], Iterator[SourceRecord]]:
    """A CSV file with a header row. Undecodable bytes survive as lone surrogates, so the field that holds
    them is rejected by name; the row number is the line the record starts on."""
    file = str(path)
    # Fields are limited by data.max_*_chars (rejected row by row), not by the csv module's 128 KiB default.
    csv.field_size_limit(CSV_FIELD_LIMIT)
    fh = open(path, newline="", encoding="utf-8-sig", errors="surrogateescape")
    reader = csv.reader(fh)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        fh.close()
        raise IngestError(file, f"line {reader.line_num}", f"not valid CSV: {exc}") from None
    if not header or not any(name.strip() for name in header):
        fh.close()
        raise IngestError(file, "line 1", "no header row; the first line must name the columns")
    repeated = sorted(name for name, count in Counter(header).items() if count > 1)
    if repeated:
        fh.close()
        raise IngestError(file, "line 1", f"column names repeated in the header: {repeated}")
    return header, _csv_records(file, fh, reader, header)


def _csv_records(file: str, fh: Any, reader: Any, header: list[str]) -> Iterator[SourceRecord]:
    with fh:
        start = reader.line_num + 1
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise IngestError(file, f"line {reader.line_num}", f"not valid CSV: {exc}") from None
            row, start = start, reader.line_num + 1
            if not fields:
                continue
            if len(fields) != len(header):
                problem = Problem("<row>", "wrong_field_count", f"{len(fields)} fields, the header names {len(header)}")
                yield SourceRecord(file, row, None, raw=safe_text(",".join(fields)), problem=problem)
                continue
            yield SourceRecord(file, row, dict(zip(header, fields, strict=True)))


def open_parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise IngestError(str(path), "footer", f"not a readable Parquet file: {exc}") from None


def read_parquet(path: Path, parquet: pq.ParquetFile, batch_rows: int) -> Iterator[SourceRecord]:
    """Record batches of a Parquet file; the row number is the 1-based row position in the file."""
    row = 0
    batches = parquet.iter_batches(batch_size=batch_rows)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as exc:
            raise IngestError(str(path), f"row {row + 1}", f"cannot read Parquet data: {exc}") from None
        for fields in batch.to_pylist():
            row += 1
            yield SourceRecord(str(path), row, fields)


def open_datasets(data: DataConfig) -> Source:
    """A saved `datasets` folder (`save_to_disk`) or anything `datasets.load_dataset` accepts.

    All splits of a DatasetDict keep their names (train/validation/test and aliases); when the source has
    a train split but no validation split, validation is carved out of train by prompt hash. A single
    split (`data.dataset_split`, or a saved Dataset) is divided by prompt hash unless it has a split column.
    """
    import datasets

    path = Path(data.path)
    try:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            name = path.name
            if data.dataset_split and isinstance(loaded, datasets.DatasetDict):
                if data.dataset_split not in loaded:
                    raise IngestError(str(path), "", f"no split {data.dataset_split!r} (has {sorted(loaded)})")
                loaded = loaded[data.dataset_split]
        else:
            loaded = datasets.load_dataset(data.path, name=data.dataset_config, split=data.dataset_split)
            name = data.path if data.dataset_config is None else f"{data.path}/{data.dataset_config}"
    except IngestError:
        raise
    except Exception as exc:  # datasets raises many kinds (not found, offline, bad config): one clear line
        raise IngestError(data.path, "", f"cannot load with datasets: {type(exc).__name__}: {exc}") from None
    if isinstance(loaded, datasets.Dataset):
        records = _dataset_records(name, {None: loaded}, data.batch_rows)
        return Source(name, data.path, records, columns=loaded.column_names)
    splits = {}
    for split_name in loaded:
        alias = SPLIT_ALIASES.get(split_name.lower())
        if alias is None:
            raise IngestError(
                name, "", f"split {split_name!r} is not train/validation/test; pick one with data.dataset_split"
            )
        splits[alias] = loaded[split_name]
    columns = sorted({c for ds in splits.values() for c in ds.column_names})
    records = _dataset_records(name, splits, data.batch_rows)
    carve = "train" in splits and "validation" not in splits
    return Source(name, data.path, records, columns=columns, carve_validation=carve)


def _dataset_records(name: str, splits: dict[str | None, Any], batch_rows: int) -> Iterator[SourceRecord]:
    for split, dataset in splits.items():
        file = name if split is None else f"{name}[{split}]"
        row = 0
        for batch in dataset.iter(batch_size=batch_rows):
            columns = list(batch)
            for values in zip(*(batch[c] for c in columns), strict=True):
                row += 1
                yield SourceRecord(file, row, dict(zip(columns, values, strict=True)), split=split)


# --- ids, splits, deduplication, the per-split cap -----------------------------------------------


def canonical_prompt(prompt: list[dict[str, str]]) -> str:
    return CANONICAL_JSON.encode(prompt)


def row_digest(source: str, prompt_json: str, response: str) -> bytes:
    """id = blake2b-128(source ‖ 0x00 ‖ canonical_json(prompt) ‖ 0x00 ‖ response)."""
    payload = "\x00".join((source, prompt_json, response)).encode("utf-8")
    return hashlib.blake2b(payload, digest_size=16).digest()


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


@dataclass
class Group:
    """The candidates of one source record (two for a preference pair), with what is decided about them."""

    record: SourceRecord
    candidates: list[Candidate]
    split: str | None = None
    meta: str = "{}"
    ids: list[bytes] = field(default_factory=list)
    pair_id: bytes | None = None

    @property
    def valid(self) -> bool:
        return all(c.problem is None for c in self.candidates)

    @property
    def order_key(self) -> int:
        """Position in 'id order' for the per-split cap: a pair is kept or cut as a whole, by its pair_id."""
        return int.from_bytes(self.pair_id or self.ids[0], "big")

    def reject_all(self, problem: Problem) -> None:
        for candidate in self.candidates:
            candidate.problem = candidate.problem or problem


class SplitCap:
    """Keeps the groups that form the longest prefix, in key order, whose rows add up to at most `limit`.

    Streaming with memory O(limit): a max-heap of kept groups; whenever the kept rows exceed the limit
    the largest key is cut, and every key at or above the smallest key ever cut is cut on arrival.
    Whatever the arrival order, the kept set is the same.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.heap: list[tuple[int, int, Group]] = []
        self.rows = 0
        self.cutoff: int | None = None
        self._count = itertools.count()

    def offer(self, group: Group) -> list[Group]:
        """Add a group; return the groups cut by this offer (possibly the new one)."""
        key = group.order_key
        if self.cutoff is not None and key >= self.cutoff:
            return [group]
        heapq.heappush(self.heap, (-key, next(self._count), group))
        self.rows += len(group.candidates)
        cut = []
        while self.rows > self.limit:
            negative_key, _, largest = heapq.heappop(self.heap)
            self.rows -= len(largest.candidates)
            self.cutoff = -negative_key if self.cutoff is None else min(self.cutoff, -negative_key)
            cut.append(largest)
        return cut

    def kept(self) -> list[Group]:
        return [group for _, _, group in sorted(self.heap, key=lambda entry: -entry[0])]


# --- output --------------------------------------------------------------------------------------


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
        self.caps = {split: SplitCap(cap) for split in SPLITS if (cap := data.split_cap(split))}
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
            group.pair_id = hashlib.blake2b(b"".join(group.ids), digest_size=16).digest()
        extra = {k: v for k, v in record.data.items() if k not in self.used_columns}
        group.meta = safe_text(META_JSON.encode(extra)) if extra else "{}"
        return group

    def _split(self, record: SourceRecord, prompt_json: str) -> tuple[str | None, Problem | None]:
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
        for split in SPLITS:
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
                rows_per_split={split: self.split_rows[split] for split in SPLITS},
                pairs_out=self.pairs_out,
                rejected_by_reason=dict(sorted(self.reasons.items())),
                rows_invalid=rows_rejected - self.reasons[CAPPED],
                rows_in_equals_out_plus_rejected=True,
            ),
        )


def batches(records: Iterator[SourceRecord], size: int) -> Iterator[list[SourceRecord]]:
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
