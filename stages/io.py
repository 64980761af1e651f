"""The stage contract's I/O: how one stage output folder is written, committed and read back.

An output folder holds `<table>/part-*.parquet` for each table, any other files the stage wrote
(model folders, plots) and `manifest.json`. A stage writes into a temporary sibling folder;
`StageWriter.commit` hashes every file, writes the manifest and renames the folder into place, so a
crash never leaves a half-written output under its final name. `StageReader` re-hashes every file
against the manifest and refuses a mismatch.

The temporary folders are named after the process that writes them
(`.<key>.partial-<host>-<pid>-<start>-<hex>`, `start` its start time in 1/100 s), so a writer can
tell a folder left by a killed process on this host from one still being written, and removes the
former; other hosts' folders (a shared file system) are left alone.

An output folder may also be a prefix of an object store (`s3://bucket/...`, stages.fs): the writer
then writes into a local temporary folder the same way, and its commit uploads the files with the
manifest last (stages.remote: no rename on a store); a reader downloads the output into a verified
local mirror, so that `dir`, `path()`, `table_glob()` and `dataset()` are local as before, and
`location` is where the output lives.

This module knows nothing of runs, run.json or Prefect (pipeline.storage and pipeline.runner decide
where a folder goes); it is the one place that hashes files and writes atomically.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from schemas.manifest import OutputFile, Producer, StageManifest, StageMetrics, StageOutput, StageResult
from schemas.stages import STAGE_METRICS
from stages import fs, remote
from stages.faults import failpoint
from stages.temporaries import UNOWNED_STALE_SECONDS, remove_abandoned_temporaries, temporary_name  # noqa: F401 (re-exported)

log = logging.getLogger("alol.io")

MANIFEST = "manifest.json"
PART_ROWS = 1_000_000


class IntegrityError(RuntimeError):
    """A stage output whose files do not match its manifest."""


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | Path) -> str:
    """`file_sha256`, remembered per (path, size, mtime) so each file is hashed once per process."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_sha256(path)
    return _DIGESTS[key]


def folder_files(folder: Path) -> list[Path]:
    """Every file of a model folder (sorted), for fingerprints of hub or local models."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts)


def folder_digest(folder: str | Path) -> str:
    """sha256 over every file of `folder` (folder_files): its path inside the folder and its `file_digest`."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in folder_files(folder):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\x00")
        digest.update(file_digest(path).encode())
    return digest.hexdigest()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary name in the folder of `path` to write to; renamed over `path` when the block ends
    without an error (readers never see a partial file), removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def as_location(where: str | Path) -> fs.Location:
    """A local path as a Path (as given, not resolved), an object store URL as its string."""
    return where if fs.is_remote(where) else Path(where)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temporary name in the same folder, fsync, then rename over the final name (on an
    object store: one PUT, which makes the object visible whole or not at all)."""
    if fs.is_remote(path):
        fs.write_bytes(path, text.encode("utf-8"))
        return
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def sql_literal(text: str) -> str:
    """A single-quoted SQL string literal (file paths go into DuckDB's COPY, which takes no parameters)."""
    return "'" + text.replace("'", "''") + "'"


class TableWriter:
    """Appends record batches to Parquet parts of one table, starting a new part every `part_rows` rows."""

    def __init__(self, folder: Path, schema: pa.Schema, part_rows: int = PART_ROWS):
        self.folder = folder
        self.schema = schema
        self.part_rows = part_rows
        self.rows = 0
        self._part = 0
        self._rows_in_part = 0
        self._writer: pq.ParquetWriter | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def _part_path(self) -> Path:
        return self.folder / f"part-{self._part:05d}.parquet"

    def _open(self) -> pq.ParquetWriter:
        return pq.ParquetWriter(self._part_path(), self.schema, compression="zstd")

    @contextmanager
    def _naming_the_part(self) -> Iterator[None]:
        """An OSError while a part is written says which file it was (pyarrow's, e.g. a full disk's, names none)."""
        try:
            yield
        except OSError as exc:
            where = f"{self._part_path()} (table {self.folder.name!r})"
            if exc.errno is None:
                raise OSError(f"{exc}: {where}") from exc
            hint = "; free space on its file system and run the stage again" if exc.errno == errno.ENOSPC else ""
            raise OSError(exc.errno, f"{os.strerror(exc.errno)}: {where}{hint}") from exc

    def write(self, data: pa.RecordBatch | pa.Table | dict[str, list[Any]]) -> None:
        if isinstance(data, dict):
            data = pa.Table.from_pydict(data, schema=self.schema)
        elif isinstance(data, pa.RecordBatch):
            data = pa.Table.from_batches([data])
        if data.num_rows == 0:
            return
        data = data.select(self.schema.names).cast(self.schema)
        offset = 0
        while offset < data.num_rows:
            with self._naming_the_part():
                failpoint("io.write")
                if self._writer is None:
                    self._writer = self._open()
                take = min(data.num_rows - offset, self.part_rows - self._rows_in_part)
                self._writer.write_table(data.slice(offset, take))
                offset += take
                self._rows_in_part += take
                self.rows += take
                if self._rows_in_part >= self.part_rows:
                    self._close_part()

    def _close_part(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._part += 1
            self._rows_in_part = 0

    def close(self) -> None:
        with self._naming_the_part():
            if self._writer is None and self._part == 0:
                # An empty table still gets one (empty) part, so readers see its schema.
                pq.write_table(self.schema.empty_table(), self._part_path())
                self._part = 1
            self._close_part()


class StageWriter:
    """The output of one stage run: tables and files, committed atomically with a manifest.

    Creating a writer removes the temporary folders killed writers left beside its output folder.
    For an output on an object store (`location` a URL) the folders are those of its local mirror.
    """

    def __init__(self, final_dir: str | Path):
        self.location = as_location(final_dir)
        self.final_dir = fs.local_mirror(self.location)
        parent = self.final_dir.parent
        # The folders this writer creates (deepest first): `abort` removes those it leaves empty.
        self._created = list(itertools.takewhile(lambda p: not p.exists(), (parent, *parent.parents)))
        parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned_temporaries(parent)
        self.dir = temporary_name(self.final_dir, "partial")
        self.dir.mkdir(parents=True)
        self._tables: dict[str, TableWriter] = {}
        self.started = datetime.now(timezone.utc)

    @contextmanager
    def table(self, name: str, schema: pa.Schema, part_rows: int = PART_ROWS) -> Iterator[TableWriter]:
        """`with out.table("score", SCHEMA) as t: t.write(batch)`."""
        if name in self._tables:
            raise ValueError(f"table {name!r} is already written by this stage")
        writer = TableWriter(self.dir / name, schema, part_rows)
        self._tables[name] = writer
        try:
            yield writer
        finally:
            writer.close()

    def write_table(self, name: str, data: pa.Table, schema: pa.Schema | None = None) -> None:
        with self.table(name, schema or data.schema) as writer:
            writer.write(data)

    def external_table(self, name: str, schema: pa.Schema) -> Path:
        """Declare a table whose Parquet parts the stage writes itself (e.g. DuckDB `COPY ... TO`); returns its folder.

        The caller must write at least one part matching `schema` into the folder before `run` returns.
        """
        if name in self._tables:
            raise ValueError(f"table {name!r} is already written by this stage")
        self._tables[name] = TableWriter(self.dir / name, schema)
        return self._tables[name].folder

    def path(self, relative: str) -> Path:
        """A path inside the output folder for a non-table file (model weights, plots, reports)."""
        path = self.dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def abort(self) -> None:
        """Discard the output: the temporary folder, and the folders this writer created when they are empty."""
        shutil.rmtree(self.dir, ignore_errors=True)
        for folder in self._created:
            try:
                folder.rmdir()
            except FileNotFoundError:
                continue
            except OSError:  # not empty: another output or another writer's folder is in it
                break

    def commit(
        self,
        *,
        stage: str,
        cache_key: str,
        result: StageResult,
        config_fingerprints: dict[str, str],
        config: dict[str, Any],
        inputs: dict[str, str],
        code_version: str,
        versions: dict[str, str],
        producer: Producer | None = None,
    ) -> StageManifest:
        expected = STAGE_METRICS[stage]
        if type(result.metrics) is not expected:
            raise TypeError(f"stage {stage} returned metrics of type {type(result.metrics).__name__}, expected {expected.__name__}")
        outputs: list[OutputFile] = []
        columns: dict[str, dict[str, str]] = {}
        for file in sorted(p for p in self.dir.rglob("*") if p.is_file()):
            rel = file.relative_to(self.dir).as_posix()
            table = rel.split("/", 1)[0] if "/" in rel and rel.split("/", 1)[0] in self._tables else None
            rows = pq.ParquetFile(file).metadata.num_rows if table and file.suffix == ".parquet" else None
            outputs.append(OutputFile(path=rel, table=table, rows=rows, bytes=file.stat().st_size, sha256=file_sha256(file)))
        for name, writer in self._tables.items():
            columns[name] = {f.name: str(f.type) for f in writer.schema}
        finished = datetime.now(timezone.utc)
        manifest = StageManifest(
            stage=stage,
            cache_key=cache_key,
            config_fingerprints=config_fingerprints,
            config=config,
            inputs=inputs,
            code_version=code_version,
            rows_in=result.rows_in,
            rows_out=result.rows_out,
            rows_rejected=result.rows_rejected,
            outputs=outputs,
            columns=columns,
            metrics=result.metrics.model_dump(mode="json"),
            started=self.started,
            finished=finished,
            seconds=(finished - self.started).total_seconds(),
            versions=versions,
            producer=producer,
            execution=result.execution,
        )
        atomic_write_text(self.dir / MANIFEST, manifest.model_dump_json(indent=2))
        if fs.is_remote(self.location):
            files = [remote.FileEntry(f.path, f.bytes, f.sha256) for f in outputs]
            remote.upload_folder(self.dir, self.location, files, MANIFEST)
        if self.final_dir.exists():
            # Same cache key computed again (forced refresh, or a damaged earlier output): replace it.
            stale = temporary_name(self.final_dir, "stale")
            os.replace(self.final_dir, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(self.dir, self.final_dir)
        if fs.is_remote(self.location):
            remote.evict(keep=self.final_dir)
        return manifest


class StageReader:
    """A committed stage output. Construction checks every file against the manifest.

    `location` is where the output lives (a folder, or an object store URL); `dir` is a local folder
    holding its files (the location itself, or its verified local mirror, downloaded on first use).
    """

    def __init__(self, folder: str | Path, verify: bool = True):
        self.location = as_location(folder)
        self._dir = self.location if isinstance(self.location, Path) else None
        self.bytes_downloaded = 0
        manifest_path = fs.join(self.location, MANIFEST)
        try:
            self._manifest_bytes = fs.read_bytes(manifest_path)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise IntegrityError(f"{self.location}: no {MANIFEST}; the stage output is missing or incomplete") from None
        self.manifest = StageManifest.model_validate_json(self._manifest_bytes)
        if verify:
            self.verify()

    @property
    def dir(self) -> Path:
        if self._dir is None:
            self._materialise()
        return self._dir

    def _materialise(self) -> None:
        files = [remote.FileEntry(f.path, f.bytes, f.sha256) for f in self.manifest.outputs]
        try:
            self._dir, self.bytes_downloaded = remote.materialise(self.location, files, MANIFEST, self._manifest_bytes)
        except remote.RemoteIntegrityError as exc:
            raise IntegrityError(str(exc)) from None

    def verify(self) -> None:
        if not isinstance(self.location, Path):
            self._dir = None
            self._materialise()
            return
        for f in self.manifest.outputs:
            path = self.dir / f.path
            if not path.is_file():
                raise IntegrityError(f"{path}: listed in {self.dir / MANIFEST} but missing")
            if path.stat().st_size != f.bytes or file_sha256(path) != f.sha256:
                raise IntegrityError(f"{path}: content differs from the sha256 in {self.dir / MANIFEST}")

    @property
    def content_hash(self) -> str:
        return self.manifest.content_hash()

    def tables(self) -> list[str]:
        return sorted(self.manifest.columns)

    def table_glob(self, table: str) -> str:
        return str(self.dir / table / "*.parquet")

    def sql_table(self, table: str) -> str:
        """`read_parquet('<glob>')`: the table as a DuckDB table expression."""
        if table not in self.manifest.columns:
            raise KeyError(f"{self.dir}: stage {self.manifest.stage!r} wrote no table {table!r} (has {self.tables()})")
        return f"read_parquet({sql_literal(self.table_glob(table))})"

    @property
    def metrics(self) -> StageMetrics:
        """The stage's metrics as its typed model (schemas.stages.STAGE_METRICS), validated on read."""
        return STAGE_METRICS[self.manifest.stage].model_validate(self.manifest.metrics)

    def dataset(self, table: str) -> pads.Dataset:
        if table not in self.manifest.columns:
            raise KeyError(f"{self.dir}: stage {self.manifest.stage!r} wrote no table {table!r} (has {self.tables()})")
        return pads.dataset(str(self.dir / table), format="parquet")

    def read(self, table: str, columns: list[str] | None = None, filter: Any = None) -> pa.Table:
        return self.dataset(table).to_table(columns=columns, filter=filter)

    def path(self, relative: str) -> Path:
        return self.dir / relative

    def output(self) -> StageOutput:
        return StageOutput(
            stage=self.manifest.stage,
            cache_key=self.manifest.cache_key,
            path=str(self.location.resolve()) if isinstance(self.location, Path) else self.location,
            content_hash=self.content_hash,
            rows=self.manifest.table_rows(),
        )
