"""The `alol` command line: run the pipeline, look at a run, query it with SQL."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from pipeline import console
from schemas.base import UserInputError
from schemas.config import PROFILES, AlolConfig, ConfigError, load_config, parse_override
from schemas.stages import STAGE_NAMES



FINAL_HELP = (
    "evaluate on the locked final split (evaluate.split=final; needs data.final_fraction > 0); every read is "
    "counted in <run.root>/final_split_reads/ (one file per read)"
)


def _config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", choices=PROFILES, default="default", help="shipped profile (default: default)")
    parser.add_argument("--config", metavar="FILE", help="YAML file applied on top of the profile")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
        help="override one field (repeatable), e.g. --set train.algorithm=a_lol_seq",
    )


def _overrides(args: argparse.Namespace) -> dict:
    overrides = {".".join(path): value for path, value in map(parse_override, args.overrides)}
    if getattr(args, "final", False):
        overrides["evaluate.split"] = "final"
    return overrides


def _config(args: argparse.Namespace) -> AlolConfig:
    from stages import fs

    cfg = load_config(args.profile, args.config, _overrides(args))
    fs.configure(cfg.run.storage_options)  # an object store run.root or cache_dir opens with them
    return cfg


def _store(args: argparse.Namespace, cfg: AlolConfig | None = None):
    """The run `--run` names (default: the latest run under run.root, else run.name)."""
    from pipeline.storage import RunStore

    cfg = cfg or _config(args)
    name = args.run or RunStore.latest_name(cfg.run.root) or cfg.run.name
    return RunStore(cfg.run.root, name)


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline import preflight

    from pipeline.cached_run import all_cached

    cfg = _config(args)  # read once; a config error stops here, before Prefect starts
    # A warm rerun (every stage cached) needs no Prefect, and no data source or model: only writable folders.
    outputs = all_cached(cfg, stages=args.stages, refresh=args.refresh,
                         before_recording=lambda c, s: preflight.check_writable(c, s, force=args.force))
    if outputs is None:
        preflight.check(cfg, stages=args.stages, refresh=args.refresh, force=args.force)  # so do missing inputs, models, folders
        checked_at = console.seconds_since_start()  # before the flow's imports (Prefect): they count as its start
        from pipeline.flow import run_alol

        console.filter_terminal_handlers()  # Prefect's own, added when it is imported
        outputs = run_alol(cfg, stages=args.stages, refresh=args.refresh, checked_at=checked_at)
    print(_status_table(cfg.run.root, cfg.run.name, only=list(outputs)))
    return 0


def _status_table(root: str, name: str, only: list[str] | None = None) -> str:
    from pipeline.storage import RunStore

    store = RunStore(root, name)
    stages = store.state()["stages"]
    if not stages:
        return f"run {name!r} under {store.root}: no stage has run yet"
    final_reads = len(store.final_split_reads())
    header = ("stage", "rows", "content hash", "state", "seconds", "computed by", "folder")
    lines = []
    for stage in STAGE_NAMES:
        entry = stages.get(stage)
        if entry is None or (only is not None and stage not in only):
            continue
        rows = ", ".join(f"{t} {n:,}" for t, n in entry["rows"].items())
        waited = entry.get("waiting_seconds", 0.0)
        state = ("cached" if entry["cached"] else "fresh") + (f" (waited {waited:.0f} s)" if waited >= 5 else "")
        found = store.folder(entry["path"])
        folder = found if isinstance(found, str) else os.path.relpath(found)
        lines.append((stage, rows, entry["content_hash"][:12], state, f"{entry['seconds']:.1f}", _producer(entry), folder))
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    fmt = lambda row: "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip()  # noqa: E731
    footer = [f"the final split has been read {final_reads} time(s) under {store.root}"] if final_reads else []
    return "\n".join([f"run {name} ({store.dir})", fmt(header), *map(fmt, lines), *footer])


def _producer(entry: dict) -> str:
    """Who computed a recorded output: its flow run's name, else pid@host; how long it took."""
    by = entry.get("computed_by") or {}
    who = by.get("run") or (f"pid {by['pid']}@{by['host']}" if by.get("pid") else "?")
    return f"{who} in {by['seconds']:.1f} s" if "seconds" in by else who


def cmd_status(args: argparse.Namespace) -> int:
    store = _store(args)
    print(_status_table(str(store.root), store.name))
    if not args.verify:
        return 0
    problems = store.verify()
    for stage in (s for s in STAGE_NAMES if s in problems):
        print(f"{stage}: {'intact' if problems[stage] is None else 'DAMAGED: ' + problems[stage]}")
    damaged = [s for s, problem in problems.items() if problem is not None]
    if damaged:
        print(f"damaged: {', '.join(damaged)}; `alol run` recomputes them", file=sys.stderr)
        return 1
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    from pipeline import sql

    cfg = _config(args)
    store = _store(args, cfg)
    if args.describe is not None:
        components = sql.run_component_names(store) or [c.name for c in cfg.score.components]
        print(sql.describe(args.describe or None, components))
        return 0
    if args.views:
        print("\n".join(sql.all_view_statements(sql.run_views(store).tables)))
        return 0
    if not args.query:
        raise SystemExit("alol sql: give a query, --views or --describe")
    out = sql.check_out_path(args.out, [store.root, cfg.run.cache_dir]) if args.out else None
    relation = sql.query(store, args.query)
    if out is not None:
        rows = sql.write_parquet(relation, out)
        print(f"wrote {rows:,} rows to {args.out}")
    elif args.format == "csv":
        sys.stdout.write(sql.format_csv(relation))
    elif args.format == "json":
        print(sql.format_json(relation))
    else:
        print(sql.format_table(relation))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.report_cli import print_report

    print(print_report(args.run, _config(args)))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from stages.export import export_run
    from stages.io import StageReader

    cfg = _config(args)
    store = _store(args, cfg)
    readers = {}
    for stage in STAGE_NAMES:
        current = store.current(stage)
        if current is not None:
            readers[stage] = StageReader(current.path)  # verified: a damaged output is refused here
    result = export_run(cfg, readers, args.dir, args.dtype, store.name)
    if result.policy_is_reference:
        print(f"no checkpoint of run {store.name} beat pi_ref on validation: exported pi_ref ({result.source})")
    what = "pi_ref" if result.policy_is_reference else "the policy"
    print(f"exported {what} of run {store.name} ({args.dtype}) with its model card to {result.folder}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from pipeline.report_cli import compare_main

    console.filter_terminal_handlers()  # Prefect's own, added when it is imported
    return compare_main(args.profile, args.config, _overrides(args), args.algorithms, args.seeds, args.value_ablation)


def cmd_up(args: argparse.Namespace) -> int:
    from pipeline.services import summary, up

    print(summary(up(home=args.home, port=args.port)))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from pipeline.services import down

    print("\n".join(down(home=args.home)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alol", description="Offline RL for language models (A-LoL and baselines).")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline (cached stages are reused)")
    _config_options(run)
    run.add_argument("--stages", nargs="+", choices=STAGE_NAMES, help="run only these stages on the existing upstream outputs")
    run.add_argument("--refresh", nargs="+", choices=STAGE_NAMES, default=[], help="recompute these stages even when cached")
    run.add_argument("--force", action="store_true", help="reuse a run name that holds another data source (replaces its record)")
    run.add_argument("--final", action="store_true", help=FINAL_HELP)
    run.set_defaults(func=cmd_run)

    status = sub.add_parser("status", help="per stage of a run: rows, content hash, cached or fresh, seconds")
    _config_options(status)
    status.add_argument("--run", help="run name (default: the latest run)")
    status.add_argument("--verify", action="store_true", help="re-hash every output; exit 1 naming what is damaged")
    status.set_defaults(func=cmd_status)

    sql = sub.add_parser("sql", help="query a run's tables with DuckDB (read-only)")
    _config_options(sql)
    sql.add_argument("query", nargs="?", help="a SELECT statement over the views (ingest, score, reference, ..., joined)")
    sql.add_argument("--run", help="run name (default: the latest run)")
    sql.add_argument("--format", choices=("table", "csv", "json"), default="table")
    sql.add_argument("--out", metavar="FILE.parquet", help="write the result to a Parquet file")
    sql.add_argument("--views", action="store_true", help="print CREATE VIEW statements for the duckdb CLI")
    sql.add_argument(
        "--describe", nargs="?", const="", metavar="TABLE",
        help="print the columns, types and descriptions of TABLE (every table and the joined view without one)",
    )
    sql.set_defaults(func=cmd_sql)

    report = sub.add_parser("report", help="print the evaluation metrics of a run")
    _config_options(report)
    report.add_argument("--run", help="run name (default: the latest run)")
    report.set_defaults(func=cmd_report)

    export = sub.add_parser("export", help="write a run's policy as a transformers folder with a model card")
    _config_options(export)
    export.add_argument("dir", metavar="DIR", help="the new folder to write (must not exist, or be empty)")
    export.add_argument("--run", help="run name (default: the latest run)")
    export.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="weights' dtype (default fp32)")
    export.set_defaults(func=cmd_export)

    compare = sub.add_parser("compare", help="train and evaluate several algorithms over one cached upstream")
    _config_options(compare)
    compare.add_argument("--algorithms", nargs="+", help="algorithms to compare (default: every algorithm of the registry)")
    compare.add_argument(
        "--seeds", type=int, default=1, metavar="K",
        help="train and evaluate each algorithm with K seeds (train.seed = seed + 0..K-1) over one cached upstream",
    )
    compare.add_argument("--final", action="store_true", help=FINAL_HELP)
    compare.add_argument(
        "--value-ablation", action="store_true",
        help="also run each A-LoL variant with advantage.value=constant (V = mean reward: the value head's ablation)",
    )
    compare.set_defaults(func=cmd_compare)

    up = sub.add_parser("up", help="start a local Prefect server, work pools, deployments (prefect.yaml) and workers")
    up.add_argument("--port", type=int, default=4200, help="server port on 127.0.0.1 (default 4200; 0: a free port)")
    up.add_argument("--home", default=".alol/prefect-home", help="PREFECT_HOME of the server: database, logs, PIDs")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="stop what `alol up` started: workers first, then the server")
    down.add_argument("--home", default=".alol/prefect-home", help="the --home given to `alol up`")
    down.set_defaults(func=cmd_down)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 1 an error (one line per problem; --debug shows the traceback), 2 a bad
    configuration, 130 interrupted (Ctrl-C)."""
    args = build_parser().parse_args(argv)
    debug = bool(args.debug or os.environ.get("ALOL_DEBUG"))
    console.setup(debug)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"alol: {exc}", file=sys.stderr)
        return 2
    except UserInputError as exc:
        if debug:
            raise
        for line in str(exc).splitlines():
            print(f"alol: error: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("alol: interrupted", file=sys.stderr)
        return console.INTERRUPTED_EXIT
    except Exception as exc:  # noqa: BLE001 - one clear line for the user; --debug shows the traceback
        if debug:
            raise
        print(f"alol: error: {type(exc).__name__}: {exc} (--debug shows the traceback)", file=sys.stderr)
        return 1


def entry() -> None:
    """The `alol` command: main() under alol's memory allocator (pipeline.allocator re-executes the process
    once to put it in place)."""
    from pipeline.allocator import exec_with_allocator

    exec_with_allocator()
    sys.exit(main())


if __name__ == "__main__":
    entry()
