"""What the Prefect UI shows of an alol run: flow-run names, alol's log lines, the artifacts.

- Names: a flow run of `alol` is named after the stages it runs and the run (`reference (smoke)`,
  `all stages (smoke, a_lol)`: the algorithm (and a set train.seed, `V=mean` for the value ablation)
  when train or evaluate runs, so that the runs of `alol compare` differ); each stage's task run is the stage's name (pipeline.flow); a run of
  `alol/compare` after the run and what it compares (`compare (smoke: a_lol, nll; 2 seeds)`).
- Logs: alol's loggers (`alol.<stage>`, `alol.flow`, ...) reach the logs of the flow run, and task
  run, they are emitted in, in every process that runs the flow (`alol run`, a worker's flow-run
  process), whatever its working directory; a run that includes evaluate ends with one result line.
- Artifacts: `alol-<stage>` (the manifest of each stage), `alol-report` (the evaluation report, its
  plots embedded as data: URIs, and its links to table folders, which the UI cannot open, replaced by
  the `alol sql` command that reads each table: the UI cannot resolve paths relative to a stage
  folder) and `alol-metrics` (the summary table, floats to 4 significant digits).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import mimetypes
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler

from schemas.config import AlolConfig
from schemas.evaluate import Interval
from schemas.manifest import StageOutput
from schemas.stages import STAGE_NAMES
from schemas.tables import TABLES
from stages.catalog import METRICS_TABLE_FILE, REPORT_FILE
from stages.io import StageReader
from stages.report import interval_text

log = logging.getLogger("alol.flow")

ALOL_LOGGER = "alol"
ALL_STAGES = "all stages"
SIGNIFICANT_DIGITS = 4
METRICS_DESCRIPTION = (
    "alol evaluation on the test prompts, one row per model (pi_theta, the trained policy; pi_ref, the reference): "
    "mean reward with its 95% bootstrap interval, the mean of each reward component, mean length in words, "
    "distinct-1/2/3, and pi_theta's win/tie/loss rate against pi_ref per prompt. "
    f"Numbers to {SIGNIFICANT_DIGITS} significant digits; the report (`alol-report`) has the rest."
)


def run_label(cfg: AlolConfig | None, stages: Sequence[str] | None) -> str:
    """The name of a flow run: the stages it runs (`all stages`, or them in pipeline order), then in
    brackets the run name and, when train or evaluate is among them, the algorithm and train.seed when
    set, and `V=mean` for the value ablation (advantage.value: constant; so that the runs of
    `alol compare --seeds K --value-ablation` differ too). Without a
    configuration (it did not load: the flow then reports why), the stages alone. ASCII only: the
    UI's run graph (a canvas with a font of its own) left out a `·`."""
    selected = [s for s in STAGE_NAMES if s in set(stages or STAGE_NAMES)]
    what = ALL_STAGES if selected == list(STAGE_NAMES) else ", ".join(selected)
    if cfg is None:
        return what
    context = [cfg.run.name]
    if {"train", "evaluate"} & set(selected):
        context.append(cfg.train.algorithm)
        if cfg.train.seed is not None:
            context.append(f"seed {cfg.train.seed}")
    if {"advantage", "train", "evaluate"} & set(selected) and cfg.advantage.value == "constant":
        context.append("V=mean")  # the value ablation
    return f"{what} ({', '.join(context)})"


def compare_label(
    cfg: AlolConfig | None, algorithms: Sequence[str] | None, seeds: int = 1, value_ablation: bool = False
) -> str:
    """The name of a flow run of `alol/compare`: `compare (smoke: a_lol, nll; 2 seeds, value ablation)`;
    `every algorithm` when none is named; without a configuration, no run name."""
    what = ", ".join(algorithms) if algorithms else "every algorithm"
    extras = ([f"{seeds} seeds"] if seeds > 1 else []) + (["value ablation"] if value_ablation else [])
    context = f"{cfg.run.name}: {what}" if cfg is not None else what
    return f"compare ({context}{'; ' + ', '.join(extras) if extras else ''})"


def _in_a_run(record: logging.LogRecord) -> bool:
    """Records emitted outside any flow or task run (the CLI's own lines) stay off the API."""
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def send_alol_logs_to_prefect() -> None:
    """Send alol's log records, INFO and above, to the Prefect API (Prefect's own handler, which links
    each to the flow or task run it is emitted in). Idempotent; the flow calls it when it starts.

    Prefect's `logging.extra_loggers` setting does this only where the process's settings say so
    (prefect.toml is read from the working directory), and a worker's flow-run process logs at the
    root logger's WARNING, which would drop alol's INFO lines.
    """
    logger = logging.getLogger(ALOL_LOGGER)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if not any(isinstance(handler, APILogHandler) for handler in logger.handlers):
        handler = APILogHandler()
        handler.addFilter(_in_a_run)
        logger.addHandler(handler)


def log_result(cfg: AlolConfig, outputs: Mapping[str, StageOutput]) -> None:
    """The run's one-line result (the evaluation's headline), when evaluate is among its outputs: the
    last line of the flow run's logs, also when evaluate itself came from the cache."""
    if "evaluate" in outputs:
        metrics = StageReader(outputs["evaluate"].path, verify=False).metrics
        log.info("result of run %s (%s): %s", cfg.run.name, metrics.algorithm, metrics.headline())


def compare_result(run_name: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """The one-line result of `alol/compare`, its run's last log line: each method's test reward (pi_ref
    first) and, for the trained ones, the difference to pi_ref, with their 95% intervals."""
    def interval(row: Mapping[str, Any], key: str) -> str:
        return interval_text(Interval(mean=row[key], low=row[f"{key}_low"], high=row[f"{key}_high"]))

    methods = []
    for row in rows:
        difference = f" (difference {interval(row, 'reward_diff')})" if row.get("reward_diff") is not None else ""
        methods.append(f"{row['method']} {interval(row, 'reward')}{difference}")
    return f"result of compare {run_name}: test reward " + ", ".join(methods)


def significant(value: Any, digits: int = SIGNIFICANT_DIGITS) -> Any:
    """A finite float rounded to `digits` significant digits; anything else unchanged."""
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.{digits}g}")
    return value


_IMAGE = re.compile(r"!\[(?P<caption>[^\]]*)\]\((?P<path>[^)\s]+)\)")


def embed_images(markdown: str, folder: Path) -> str:
    """`markdown` with every image that names a file inside `folder` (a path relative to it) replaced
    by a data: URI of that file; other images (URLs, missing files, files outside) are left as they are."""
    root = folder.resolve()

    def embed(match: re.Match[str]) -> str:
        path = (root / match["path"]).resolve()
        mime = mimetypes.guess_type(path.name)[0]
        if ":" in match["path"] or not path.is_relative_to(root) or not path.is_file() or not (mime or "").startswith("image/"):
            return match[0]
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f"![{match['caption']}](data:{mime};base64,{data})"

    return _IMAGE.sub(embed, markdown)


_LINK = re.compile(r"(?<!!)\[(?P<caption>[^\]]*)\]\((?P<target>[^)\s]+)\)")


def table_links_as_queries(markdown: str, run_name: str) -> str:
    """`markdown` with every link to a file path (the report's links to table folders, `eval/` or
    `../../score/<key>/score/`, which the UI cannot open) replaced by its caption and the `alol sql`
    command that reads that table, `` eval (this stage): `alol sql --run demo "SELECT * FROM eval LIMIT 10"` ``;
    a path that is no table becomes its caption and the path as code. Images, URLs (anything with a
    scheme, data: URIs too) and #anchors are left as they are."""

    def replace(match: re.Match[str]) -> str:
        caption, target = match["caption"], match["target"]
        if ":" in target or target.startswith("#"):
            return match[0]
        table = PurePosixPath(target).name
        if table in TABLES:
            return f'{caption}: `alol sql --run {shlex.quote(run_name)} "SELECT * FROM {table} LIMIT 10"`'
        return f"{caption} (`{target}`)"

    return _LINK.sub(replace, markdown)


def manifest_markdown(reader: StageReader) -> str:
    m = reader.manifest
    rows = ", ".join(f"{t}: {n:,}" for t, n in m.table_rows().items()) or "-"
    lines = [
        f"### alol stage `{m.stage}`",
        "",
        "| field | value |",
        "|---|---|",
        f"| rows in / out / rejected | {m.rows_in:,} / {m.rows_out:,} / {m.rows_rejected:,} |",
        f"| tables | {rows} |",
        f"| content hash | `{m.content_hash()[:16]}` |",
        f"| cache key | `{m.cache_key[:16]}` |",
        f"| seconds | {m.seconds:.1f} |",
        f"| folder | `{reader.location}` |",
    ]
    scalar_metrics = {k: v for k, v in m.metrics.items() if isinstance(v, (int, float, str, bool))}
    if scalar_metrics:
        lines += ["", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in scalar_metrics.items()]
    return "\n".join(lines)


def publish_artifacts(reader: StageReader, run_name: str) -> None:
    """The manifest summary of every stage, and the evaluation report and metrics table when present
    (`run_name`: the run whose tables the report's `alol sql` commands read)."""
    stage = reader.manifest.stage
    create_markdown_artifact(key=f"alol-{stage}", markdown=manifest_markdown(reader), description=f"alol {stage} manifest")
    report = reader.path(REPORT_FILE)
    if report.is_file():
        markdown = table_links_as_queries(embed_images(report.read_text(encoding="utf-8"), report.parent), run_name)
        create_markdown_artifact(key="alol-report", markdown=markdown, description="alol evaluation report")
    metrics_table = reader.path(METRICS_TABLE_FILE)
    if metrics_table.is_file():
        rows = json.loads(metrics_table.read_text(encoding="utf-8"))
        table = [{column: significant(value) for column, value in row.items()} for row in rows]
        create_table_artifact(key="alol-metrics", table=table, description=METRICS_DESCRIPTION)
