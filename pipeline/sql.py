"""`alol sql`: read-only DuckDB over a run's stage outputs, one view per table.

The jail: a query is parsed by DuckDB and refused unless every statement reads (SELECT, or EXPLAIN of
a SELECT; never EXPLAIN ANALYZE, which executes what it explains); DuckDB reads files only under the
run's stage folders, external access is off and the settings are locked; `--out` never writes inside
a run root or the cache. A stage output that fails its hash check is left out (with a warning naming
it), so the intact tables of a partly damaged run can still be queried.

On an object store run root (stages.fs) the views read the store's objects through the run's fsspec
filesystem registered in DuckDB (no DuckDB extension is downloaded), and the allowed directories are
the run's stage prefixes there.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import RunStore
from schemas.base import UserInputError, column_description
from schemas.tables import JOINED_COLUMNS, JOINED_ROW, JOINED_SOURCES, JOINED_VIEW, PROMPT_TEXT, SCORE_COLUMNS, TABLES, joined_schema
from stages import fs
from stages.io import IntegrityError, StageReader, atomic_path

log = logging.getLogger("alol.sql")

READ_ONLY_HELP = (
    "only SELECT, WITH ... SELECT, DESCRIBE, SHOW, SUMMARIZE and EXPLAIN of a SELECT run; "
    "use --out FILE.parquet to save a result"
)


class SqlError(UserInputError):
    """A query that alol refuses or DuckDB cannot run."""


@dataclass
class RunViews:
    """The views of a run: table -> Parquet glob of the intact outputs, and the damaged stages
    (stage -> (its tables, why it failed the check)) whose tables are left out."""

    tables: dict[str, str]
    damaged: dict[str, tuple[list[str], str]] = field(default_factory=dict)

    def damaged_table(self, table: str) -> str | None:
        """The damaged stage that holds `table`, if any."""
        return next((stage for stage, (tables, _) in self.damaged.items() if table in tables), None)


def run_views(store: RunStore) -> RunViews:
    """The views of every stage output recorded in the run; each output's files are verified, and a
    damaged one is left out with a warning naming it."""
    state = store.state()["stages"]
    if not state:
        raise SqlError(f"run {store.name!r} under {store.root} has no stage outputs yet (alol run first)")
    views = RunViews(tables={})
    for stage, entry in state.items():
        try:
            reader = StageReader(store.folder(entry["path"]))
        except IntegrityError as exc:
            tables = sorted(entry.get("rows", {}))
            views.damaged[stage] = (tables, str(exc))
            log.warning("stage %s is damaged, its tables (%s) are left out: %s; `alol run` repairs it",
                        stage, ", ".join(tables) or "none", exc)
            continue
        for table in reader.tables():
            views.tables[table] = (
                fs.join(reader.location, table, "*.parquet") if fs.is_remote(reader.location) else reader.table_glob(table)
            )
    return views


def create_view_statements(views: dict[str, str]) -> list[str]:
    return [f"CREATE OR REPLACE VIEW \"{name}\" AS SELECT * FROM read_parquet('{glob}');" for name, glob in views.items()]


def joined_view_statement(views: dict[str, str]) -> str | None:
    """CREATE VIEW of `joined` (schemas.tables.JOINED_COLUMNS) over the table views, when the run has all of
    JOINED_SOURCES; None otherwise."""
    if not all(table in views for table in JOINED_SOURCES):
        return None
    alias = {table: table[0] for table in JOINED_SOURCES}
    select = []
    for table, name in JOINED_COLUMNS:
        if name == PROMPT_TEXT.name:
            select.append(f"{alias[table]}.prompt[-1].content AS {name}")
        elif name == SCORE_COLUMNS:
            select.append(f"{alias[table]}.* EXCLUDE (id)")
        else:
            select.append(f"{alias[table]}.{name}")
    joins = " ".join(f'LEFT JOIN "{t}" AS {alias[t]} ON {alias[t]}.id = {alias["ingest"]}.id' for t in JOINED_SOURCES[1:])
    return f'CREATE OR REPLACE VIEW "{JOINED_VIEW}" AS SELECT {", ".join(select)} FROM "ingest" AS {alias["ingest"]} {joins};'


def all_view_statements(views: dict[str, str]) -> list[str]:
    """The table views, then the joined view where the run has its tables (`alol sql --views`)."""
    joined = joined_view_statement(views)
    return create_view_statements(views) + ([joined] if joined else [])


def run_component_names(store: RunStore) -> list[str] | None:
    """The reward component columns of the run's score table (None before the score stage ran)."""
    current = store.current("score") if store.state_path.is_file() else None
    if current is None:
        return None
    columns = StageReader(current.path, verify=False).manifest.columns.get("score", {})
    return [name for name in columns if name not in ("id", "reward")]


def describe(table: str | None, component_names: list[str]) -> str:
    """Columns, Arrow types and descriptions of one table or view (every one when `table` is None)."""
    known = {name: (doc.stage, doc.row, doc.schema(component_names)) for name, doc in TABLES.items()}
    known[JOINED_VIEW] = (" + ".join(JOINED_SOURCES), JOINED_ROW, joined_schema(component_names))
    if table is not None and table not in known:
        raise SqlError(f"--describe {table}: no such table; the tables are {', '.join(known)}")
    blocks = []
    for name, (stage, row, schema) in known.items():
        if table is not None and name != table:
            continue
        rows = [(f.name, str(f.type), column_description(f) or "") for f in schema]
        widths = [max(len(r[i]) for r in rows) for i in range(2)]
        lines = [f"{name} (stage {stage}): {row}"]
        lines += [f"  {n.ljust(widths[0])}  {t.ljust(widths[1])}  {d}" for n, t, d in rows]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _statements(text: str) -> list[duckdb.Statement]:
    try:
        return duckdb.extract_statements(text)
    except duckdb.Error as exc:
        raise SqlError(f"cannot parse the query: {str(exc).splitlines()[0]}") from None


def explained_statement(text: str) -> str:
    """The statement an `EXPLAIN [(options)] <statement>` explains, as text; refuses EXPLAIN ANALYZE
    (in any spelling or option list), which executes the statement it explains."""
    tokens = [(offset, kind) for offset, kind in duckdb.tokenize(text) if kind != duckdb.token_type.comment]
    ends = [offset for offset, _ in tokens[1:]] + [len(text)]
    words = [text[offset:end].strip() for (offset, _), end in zip(tokens, ends)]
    if not words or words[0].upper() != "EXPLAIN":
        raise SqlError("alol sql is read-only: cannot tell what this EXPLAIN explains; " + READ_ONLY_HELP)
    position = 1
    if position < len(words) and words[position].startswith("("):
        depth = 0
        while position < len(words):
            depth += words[position].count("(") - words[position].count(")")
            if words[position].upper() in ("ANALYZE", "ANALYSE"):
                break
            position += 1
            if depth == 0:
                break
    if position < len(words) and words[position].upper() in ("ANALYZE", "ANALYSE"):
        raise SqlError("alol sql is read-only: EXPLAIN ANALYZE runs the statement it explains and is refused; " + READ_ONLY_HELP)
    if position >= len(words):
        raise SqlError("EXPLAIN of nothing")
    return text[tokens[position][0]:]


def check_read_only(query: str) -> None:
    """Refuse every statement that is not a SELECT (DuckDB's statement type) or an EXPLAIN of one."""
    statements = _statements(query)
    if not statements:
        raise SqlError("empty query")
    for statement in statements:
        kind = statement.type
        if kind == duckdb.StatementType.EXPLAIN:
            inner = _statements(explained_statement(statement.query))
            if len(inner) == 1 and inner[0].type == duckdb.StatementType.SELECT:
                continue
            kind = inner[0].type if inner else kind
            raise SqlError(f"alol sql is read-only: EXPLAIN of a {kind.name} statement is refused; " + READ_ONLY_HELP)
        if kind != duckdb.StatementType.SELECT:
            raise SqlError(f"alol sql is read-only: {kind.name} statements are refused; " + READ_ONLY_HELP)


def check_out_path(path: str | Path, protected: list[str | Path]) -> Path:
    """`--out`'s target, refused when it lies inside a run root or the cache (it would replace or add
    a file in a stage output or a cache entry)."""
    target = Path(path).expanduser().resolve()
    for folder in protected:
        folder = Path(folder).expanduser().resolve()
        if target == folder or target.is_relative_to(folder):
            raise SqlError(f"--out {path}: inside {folder}, which alol sql never writes to; choose a path outside it")
    return target


def connect(views: dict[str, str]) -> duckdb.DuckDBPyConnection:
    """In-memory DuckDB with the views, no file access beyond the run's outputs, settings locked."""
    con = duckdb.connect(":memory:")
    remote = sorted({glob.partition("://")[0] for glob in views.values() if fs.is_remote(glob)})
    for protocol in remote:
        con.register_filesystem(fs.filesystem(f"{protocol}://")[0])
    for statement in create_view_statements(views):
        con.execute(statement)
    joined = joined_view_statement(views)
    if joined is not None:
        try:
            con.execute(joined)
        except duckdb.BinderException as exc:  # tables written by an older alol (no prompt_tokens, ...)
            log.warning("view %s left out: %s; `alol run` rewrites the tables", JOINED_VIEW, str(exc).splitlines()[0])
    folders = sorted({
        fs.parent(fs.parent(glob)) + "/" if fs.is_remote(glob) else str(Path(glob).parent.parent) for glob in views.values()
    })
    con.execute("SET allowed_directories = ?", [folders])
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def query(store: RunStore, sql: str) -> duckdb.DuckDBPyRelation:
    check_read_only(sql)
    views = run_views(store)
    con = connect(views.tables)
    try:
        return con.sql(sql)
    except duckdb.CatalogException as exc:
        missing = re.search(r'Table with name "?([A-Za-z0-9_]+)"? does not exist', str(exc))
        stage = views.damaged_table(missing.group(1)) if missing else None
        if stage is not None:
            raise SqlError(
                f"table {missing.group(1)} belongs to stage {stage}, whose output is damaged "
                f"({views.damaged[stage][1]}); run `alol run` to recompute it"
            ) from None
        raise SqlError(str(exc).splitlines()[0]) from None
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
