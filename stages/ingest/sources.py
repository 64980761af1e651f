"""Where ingested rows come from: `data.source` opened as a stream of SourceRecords.

Sources: the chatterbot-corpus English dialogues, a local JSONL / JSON / CSV / Parquet file, or anything
`datasets` loads (hub name or saved folder). Rows are streamed in record batches of `data.batch_rows`; only
a JSON array file is read whole. A row that cannot be read as fields (a JSONL line that is not an object,
undecodable bytes, a wrong CSV field count) becomes a record with a Problem, so it is rejected by row; a file
that cannot be read or parsed (bad YAML, a JSON array file that is not valid JSON, no CSV header, broken CSV
quoting, an unreadable Parquet footer) raises IngestError naming where.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from schemas.ingest import ColumnMapping, DataConfig
from stages.ingest.errors import IngestError
from stages.ingest.formats import Problem
from stages.ingest.ids import SPLIT_ALIASES
from stages.io import file_digest

FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")
UTF8_BOM = b"\xef\xbb\xbf"
CSV_FIELD_LIMIT = 2**31 - 1
# Reused encoder: json.dumps builds a new encoder per call when given options, a cost at a million rows.
META_JSON = json.JSONEncoder(ensure_ascii=False, sort_keys=True, default=str)


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


def open_source(data: DataConfig) -> Source:
    """The source `data.source` names, opened; its records are read lazily."""
    if data.source == "chatterbot":
        files = chatterbot_files()
        location = str(files[0].parent) if files else "chatterbot-corpus"
        return Source("chatterbot", location, read_chatterbot(files), fmt="prompt_response", mapping=ColumnMapping())
    if data.source == "file":
        return open_file(Path(data.path), data.batch_rows)
    return open_datasets(data)


def source_fingerprint(data: DataConfig) -> dict[str, str]:
    """The sha256 of every local file the source reads, by name: what the ingest cache key covers beyond the
    `data` settings, so an edited data file at the same path is ingested again. The chatterbot corpus
    files, the `file`, or every file of a saved `datasets` folder; a hub dataset gives none (its name
    and `dataset_config` stand for it; which revision `datasets` loads is its own cache's business).
    A path that is not there gives none either: ingest itself reports it."""
    if data.source == "chatterbot":
        files = chatterbot_files()
        root = files[0].parent if files else Path()
    else:
        path = Path(data.path or "")
        if data.source == "file":
            files, root = ([path] if path.is_file() else []), path.parent
        else:
            files, root = (sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []), path
    return {f.relative_to(root).as_posix(): file_digest(f) for f in files}


def chatterbot_files() -> list[Path]:
    """The English YAML files of the chatterbot-corpus package, found without importing it."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise IngestError("chatterbot-corpus", "", "package not installed; run `make setup` (chatterbot-corpus==1.3.3)")
    return sorted((Path(spec.submodule_search_locations[0]) / "data" / "english").glob("*.yml"))


def corpus_file_name(path: Path) -> str:
    """A corpus file as `ingest_rejected.source_file` names it: relative to the installed package
    (`chatterbot_corpus/data/english/ai.yml`, the same on every machine, so the output does not depend
    on where the environment lives), or the path itself for a file outside the package."""
    parts = path.parts
    if "chatterbot_corpus" not in parts:
        return str(path)
    start = len(parts) - 1 - parts[::-1].index("chatterbot_corpus")
    return "/".join(parts[start:])


def read_chatterbot(files: list[Path]) -> Iterator[SourceRecord]:
    """Each conversation's consecutive turns as prompt -> response; the row number counts pairs in a file."""
    for path in files:
        name = corpus_file_name(path)
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
                yield SourceRecord(name, row, None, raw=repr(turns), problem=problem)
                continue
            for turn in range(len(turns) - 1):
                row += 1
                fields = {"prompt": turns[turn], "response": turns[turn + 1], "topic": path.stem,
                          "conversation": number, "turn": turn + 1}
                yield SourceRecord(name, row, fields)


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
