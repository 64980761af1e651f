"""`alol sql`: read-only DuckDB over a run's stage outputs, one view per table."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import RunStore
from stages.io import StageReader, atomic_path

ALLOWED_STATEMENTS = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


class SqlError(ValueError):
    """A query that alol refuses or DuckDB cannot run."""


def run_views(store: RunStore) -> dict[str, str]:
    """Table name -> Parquet glob, for every table of every stage recorded in the run (files verified)."""
    state = store.state()["stages"]
    if not state:
        raise SqlError(f"run {store.name!r} under {store.root} has no stage outputs yet (alol run first)")
    views: dict[str, str] = {}
    for stage in state:
        reader = StageReader(state[stage]["path"])
        for table in reader.tables():
            views[table] = reader.table_glob(table)
    return views


def create_view_statements(views: dict[str, str]) -> list[str]:
    return [f"CREATE OR REPLACE VIEW \"{name}\" AS SELECT * FROM read_parquet('{glob}');" for name, glob in views.items()]


def check_read_only(query: str) -> None:
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as exc:
        raise SqlError(f"cannot parse the query: {exc}") from None
    if not statements:
        raise SqlError("empty query")
    for statement in statements:
        if statement.type not in ALLOWED_STATEMENTS:
            kind = statement.type.name
            raise SqlError(
                f"alol sql is read-only: {kind} statements are refused (only SELECT, WITH ... SELECT, "
                "DESCRIBE, SHOW, SUMMARIZE and EXPLAIN run); use --out FILE.parquet to save a result"
            )


def connect(views: dict[str, str]) -> duckdb.DuckDBPyConnection:
    """In-memory DuckDB with the views, no file access beyond the run's outputs, settings locked."""
    con = duckdb.connect(":memory:")
    for statement in create_view_statements(views):
        con.execute(statement)
    folders = sorted({str(Path(glob).parent.parent) for glob in views.values()})
    con.execute("SET allowed_directories = ?", [folders])
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def query(store: RunStore, sql: str) -> duckdb.DuckDBPyRelation:
    check_read_only(sql)
    con = connect(run_views(store))
    try:
        return con.sql(sql)
    except duckdb.Error as exc:
        raise SqlError(str(exc).splitlines()[0]) from None


def format_table(relation: duckdb.DuckDBPyRelation, max_rows: int = 200) -> str:
    """An aligned text table of the first `max_rows` rows."""
    columns = relation.columns
    rows = relation.limit(max_rows + 1).fetchall()
    shown = [["NULL" if v is None else _cell(v) for v in row] for row in rows[:max_rows]]
    widths = [max([len(c)] + [len(r[i]) for r in shown]) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in shown]
    if len(rows) > max_rows:
        out.append(f"... (first {max_rows} rows shown; use --format csv or --out for all)")
    return "\n".join(out)


def _cell(value: object) -> str:
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    text = text.replace("\n", "\\n")
    return text if len(text) <= 60 else text[:57] + "..."


def format_csv(relation: duckdb.DuckDBPyRelation) -> str:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(relation.columns)
    writer.writerows(relation.fetchall())
    return buf.getvalue()


def format_json(relation: duckdb.DuckDBPyRelation) -> str:
    rows = [dict(zip(relation.columns, row)) for row in relation.fetchall()]
    return json.dumps(rows, default=str, ensure_ascii=False, indent=1)


def write_parquet(relation: duckdb.DuckDBPyRelation, path: str | Path) -> int:
    """Stream the result to a Parquet file (temporary name, then rename). Returns the row count."""
    reader: pa.RecordBatchReader = relation.arrow()
    rows = 0
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, reader.schema) as writer:
        for batch in reader:
            writer.write_batch(batch)
            rows += batch.num_rows
    return rows
