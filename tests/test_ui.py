"""What the Prefect UI shows of a run: flow-run names, alol's log lines, the report with its plots.

Unit tests of the pure parts (pipeline/ui.py), and one end-to-end test (marked e2e) in a real
headless browser, Debian's `chromium`: `alol up` (server, work pools, one worker per pool) on a free
port runs the tiny pipeline as the deployment `alol/full` (reference, train and evaluate as runs of
their own deployments on the GPU pool) and a comparison of two algorithms as `alol/compare`, then
`alol run` runs it in-process with advantage refreshed. The flow runs, their logs and the artifacts are read from the Prefect API; the flow-run
pages and the report's artifact page are rendered by chromium (`--dump-dom`).

Without chromium the browser test is skipped (install: `apt-get install -y chromium`), except under
CI=true, where it fails: .ci/run installs it. The API test runs either way.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline import services as alol_services
from pipeline.ui import compare_label, compare_result, embed_images, run_label, significant, table_links_as_queries
from schemas.config import load_config
from schemas.evaluate import PI_REF, PI_THETA
from schemas.stages import STAGE_NAMES
from tests.support.outputs import metrics, model_metrics
from tests.support.services import PREFECT, REPO, alol, ok, prefect_env, run, stop_all
from tests.support.train import WHOLE_PIPELINE, overrides, tiny_setup

log = logging.getLogger("alol.tests.ui")

LOG_DELIVERY_S = 30.0
"""Logs reach the API in batches, shortly after they are emitted."""

# ---------------------------------------------------------------------------------------------
# The pure parts


def test_run_label_names_the_stages_the_run_and_the_algorithm_where_it_matters():
    cfg = load_config("smoke", overrides={"run.name": "demo", "train.algorithm": "a_lol_seq"})
    assert run_label(cfg, None) == run_label(cfg, list(STAGE_NAMES)) == "all stages (demo, a_lol_seq)"
    assert run_label(cfg, ["reference"]) == "reference (demo)"
    assert run_label(cfg, ["advantage", "score"]) == "score, advantage (demo)", "pipeline order"
    assert run_label(cfg, ["evaluate"]) == "evaluate (demo, a_lol_seq)"
    assert run_label(None, ["train"]) == "train"
    seeded = load_config("smoke", overrides={"run.name": "demo", "train.seed": 3, "advantage.value": "constant"})
    assert run_label(seeded, None) == "all stages (demo, a_lol, seed 3, V=mean)"
    assert run_label(seeded, ["advantage"]) == "advantage (demo, V=mean)" and run_label(seeded, ["reference"]) == "reference (demo)"


def test_compare_label_names_the_run_the_algorithms_and_the_seeds():
    cfg = load_config("smoke", overrides={"run.name": "demo"})
    assert compare_label(cfg, ["a_lol", "nll"]) == "compare (demo: a_lol, nll)"
    assert compare_label(cfg, None, seeds=3, value_ablation=True) == "compare (demo: every algorithm; 3 seeds, value ablation)"
    assert compare_label(None, ["dpo"], seeds=2) == "compare (dpo; 2 seeds)"


def test_compare_result_gives_each_methods_reward_and_its_difference_to_pi_ref():
    interval = lambda key, mean: {key: mean, f"{key}_low": mean - 0.1, f"{key}_high": mean + 0.1}  # noqa: E731
    rows = [
        {"method": "pi_ref", **interval("reward", 0.5), "reward_diff": None},
        {"method": "a_lol", **interval("reward", 0.625), **interval("reward_diff", 0.125)},
    ]
    assert compare_result("demo", rows) == (
        "result of compare demo: test reward pi_ref 0.500 [0.400, 0.600], "
        "a_lol 0.625 [0.525, 0.725] (difference 0.125 [0.025, 0.225])"
    )


def test_table_links_become_the_alol_sql_command_that_reads_the_table():
    markdown = (
        "## Tables\n\n- [eval (this stage)](eval/)\n- [score (score)](../../score/ab12/score/)\n"
        "- [notes](notes/extra.txt)\n[docs](https://example.org/t/) [top](#tables) ![A plot](data:image/png;base64,AAAA)\n"
    )
    assert table_links_as_queries(markdown, "my run") == (
        "## Tables\n\n"
        "- eval (this stage): `alol sql --run 'my run' \"SELECT * FROM eval LIMIT 10\"`\n"
        "- score (score): `alol sql --run 'my run' \"SELECT * FROM score LIMIT 10\"`\n"
        "- notes (`notes/extra.txt`)\n[docs](https://example.org/t/) [top](#tables) ![A plot](data:image/png;base64,AAAA)\n"
    )


PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
)


def test_embed_images_inlines_files_of_the_folder_and_leaves_everything_else(tmp_path):
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "a.png").write_bytes(PNG)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path.parent / "outside.png").write_bytes(PNG)
    markdown = (
        "# r\n![A plot](plots/a.png)\n![gone](plots/missing.png)\n![url](https://example.org/x.png)\n"
        "![text](notes.txt)\n![escape](../outside.png)\n[a link](plots/a.png)\n"
    )
    embedded = embed_images(markdown, tmp_path)
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert embedded == markdown.replace("![A plot](plots/a.png)", f"![A plot]({uri})")


def test_headline_gives_both_rewards_and_the_difference_with_its_interval():
    policy = model_metrics([], reward={"mean": 0.61234, "low": 0.5, "high": 0.7})
    evaluation = metrics(
        "evaluate", policy_is_reference=False, models={PI_THETA: policy, PI_REF: model_metrics([])},
        difference={"reward": {"mean": 0.61234, "low": 0.40004, "high": 0.80006}},
    )
    assert evaluation.headline() == "test reward: pi_theta 0.6123, pi_ref 0.0000, difference 0.6123 [0.4000, 0.8001]"
    same = metrics("evaluate", policy_is_reference=True)
    assert same.headline().endswith("(pi_theta is pi_ref: no checkpoint beat it)")


def test_significant_rounds_finite_floats_only():
    assert significant(0.123456789) == 0.1235 and significant(12345.678) == 12350.0 and significant(-2.5e-7) == -2.5e-7
    assert significant(3) == 3 and significant(True) is True and significant("0.123456") == "0.123456" and significant(None) is None
    assert significant(float("inf")) == float("inf")


# ---------------------------------------------------------------------------------------------
# End to end: a real server, workers and browser


def _chromium() -> str:
    found = shutil.which("chromium")
    if found:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail("CI=true but `chromium` is not on PATH: .ci/run installs it (apt-get install -y chromium)")
    pytest.skip("`chromium` is not installed (apt-get install -y chromium): the UI is checked in a real browser")


def _dom(chromium: str, url: str, profile: Path) -> str:
    """The page as chromium renders it after its scripts ran (the UI loads everything from the API)."""
    args = [
        chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
        "--window-size=1400,1000", "--virtual-time-budget=30000", "--run-all-compositor-stages-before-draw", "--dump-dom", url,
    ]
    started = time.monotonic()
    done = subprocess.run(args, capture_output=True, text=True, timeout=180)
    log.info("chromium %s: %.1f s", url, time.monotonic() - started)
    assert done.returncode == 0 and "<html" in done.stdout, f"chromium exited {done.returncode}: {done.stderr[-2000:]}"
    return done.stdout


def _text(dom: str) -> str:
    body = dom[dom.find("<body"):]
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split())


def _api(api_url: str, method: str, *args: Any) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        return getattr(client, method)(*args)


def _logs(api_url: str, flow_run_id, *expected: str) -> list[tuple[str, str]]:
    """(logger, message) of the flow run's logs, once every `expected` text is among the messages
    (or LOG_DELIVERY_S passed)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + LOG_DELIVERY_S
    while True:
        logs = _api(api_url, "read_logs", LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        lines = [(entry.name, entry.message) for entry in logs]
        if all(any(text in message for _, message in lines) for text in expected) or time.monotonic() > deadline:
            return lines
        time.sleep(0.5)


def _loggers(lines: list[tuple[str, str]]) -> set[str]:
    return {name for name, _ in lines}


@dataclass
class UiRun:
    """The tiny pipeline, run once on the workers of `alol up` and once in-process, and where to look."""

    api_url: str
    settings: dict[str, Any]
    names: dict[str, str]  # "full" and each accelerator stage -> its flow run's expected name
    result_line: str
    watched: str  # what `prefect deployment run alol/full --watch` printed
    runs: dict[str, Any]  # flow run name -> the worker run of that name
    compare: Any  # the flow run of `alol/compare`
    algorithm: str  # the run's train.algorithm (compared with nll)
    local: Any  # the flow run of `alol run`


@pytest.fixture(scope="module")
def ui_run(tmp_path_factory) -> UiRun:
    tmp = tmp_path_factory.mktemp("ui")
    model, data = tiny_setup(tmp)
    settings = overrides(tmp, model, data, **WHOLE_PIPELINE)
    cfg = load_config("smoke", overrides=settings)
    names = {"full": f"all stages ({cfg.run.name}, {cfg.train.algorithm})", "reference": f"reference ({cfg.run.name})"}
    names.update({s: f"{s} ({cfg.run.name}, {cfg.train.algorithm})" for s in ("train", "evaluate")})
    home = tmp / "prefect-home"
    env = prefect_env(home)
    # The python reward (tests.support.train:cats_reward) is imported by the workers' flow-run processes.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    try:
        started = time.monotonic()
        ok(alol(["up", "--port", "0", "--home", str(home)], env))
        log.info("alol up: %.1f s", time.monotonic() - started)
        api_url = env["PREFECT_API_URL"] = alol_services.Services.load(home).api_url

        started = time.monotonic()
        params = json.dumps({"profile": "smoke", "overrides": settings})
        watched = ok(run([PREFECT, "deployment", "run", "alol/full", "--params", params, "--watch"], env, 600))
        log.info("alol/full on the workers: %.1f s", time.monotonic() - started)
        runs = {r.name: r for r in _api(api_url, "read_flow_runs")}

        started = time.monotonic()
        params = json.dumps({"profile": "smoke", "overrides": settings, "algorithms": [cfg.train.algorithm, "nll"]})
        ok(run([PREFECT, "deployment", "run", "alol/compare", "--params", params, "--watch"], env, 600))
        log.info("alol/compare on the GPU worker: %.1f s", time.monotonic() - started)
        compare = [r for r in _api(api_url, "read_flow_runs") if r.name.startswith("compare")]
        assert len(compare) == 1, [r.name for r in compare]
        seen = {r.id for r in runs.values()} | {r.id for r in _api(api_url, "read_flow_runs")}

        # In-process, advantage recomputed (train and evaluate stay cached: the same advantage output).
        started = time.monotonic()
        sets = [arg for key, value in settings.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
        ok(alol(["run", "--profile", "smoke", *sets, "--refresh", "advantage"], env, 600))
        log.info("alol run: %.1f s", time.monotonic() - started)
        local = [r for r in _api(api_url, "read_flow_runs") if r.id not in seen]
        assert len(local) == 1, [r.name for r in local]
        result_line = f"result of run {cfg.run.name} ({cfg.train.algorithm}): test reward: pi_theta "
        yield UiRun(api_url, settings, names, result_line, watched, runs, compare[0], cfg.train.algorithm, local[0])
    finally:
        started = time.monotonic()
        leftovers = stop_all(home, env)
        log.info("alol down: %.1f s", time.monotonic() - started)
    assert leftovers == [], f"alol down left processes running: {leftovers}"


@pytest.mark.e2e
def test_flow_runs_are_named_and_their_logs_hold_alol_lines_and_the_result(ui_run):
    """Read from the API: the names, the logs of the worker runs and of `alol run`, the artifacts."""
    api_url, names, result_line = ui_run.api_url, ui_run.names, ui_run.result_line
    assert set(ui_run.runs) == set(names.values()), "each flow run is named after its stages and the run"
    assert all(r.state.name == "Completed" for r in ui_run.runs.values())
    assert result_line in ui_run.watched, f"`--watch` shows alol's lines: {ui_run.watched[-4000:]}"

    parent = _logs(api_url, ui_run.runs[names["full"]].id, result_line)
    assert {"alol.ingest", "alol.score", "alol.advantage", "alol.flow", "alol.routing"} <= _loggers(parent), sorted(_loggers(parent))
    assert any(m.startswith(result_line) for _, m in parent), "the result line is in the worker run's logs"
    for stage in ("reference", "train", "evaluate"):
        child = _logs(api_url, ui_run.runs[names[stage]].id, f"{stage}: ")
        assert f"alol.{stage}" in _loggers(child), (stage, sorted(_loggers(child)))
        assert any(n == "alol.flow" and m.startswith(f"{stage}: ") for n, m in child), f"{stage}: the task's summary line"
    evaluate = _logs(api_url, ui_run.runs[names["evaluate"]].id, "test reward: pi_theta")
    assert any(n == "alol.evaluate" and m.startswith("test reward: pi_theta") and "difference" in m for n, m in evaluate), evaluate

    local = ui_run.local
    assert local.name == names["full"] and local.deployment_id is None and local.state.name == "Completed"
    local_lines = _logs(api_url, local.id, result_line)
    assert {"alol.advantage", "alol.flow"} <= _loggers(local_lines), sorted(_loggers(local_lines))
    assert any(m.startswith(result_line) for _, m in local_lines), "the result line of the cached evaluation"

    compare = ui_run.compare
    assert compare.name == f"compare (tiny: {ui_run.algorithm}, nll)" and compare.state.name == "Completed", compare.name
    compare_lines = _logs(api_url, compare.id, "result of compare tiny: test reward pi_ref ")
    assert any(m.startswith("compare: nll") for _, m in compare_lines), "alol's lines in its logs"
    assert any(m.startswith("result of compare tiny: test reward pi_ref ") and "nll " in m for _, m in compare_lines[-3:]), \
        "the comparison's one-line result ends its logs"

    artifacts = {a.key: a for a in _api(api_url, "read_latest_artifacts")}
    assert "](plots/" not in artifacts["alol-report"].data and "](data:image/png;base64," in artifacts["alol-report"].data
    assert "](eval/)" not in artifacts["alol-report"].data, "no link to a table folder (the UI cannot open it)"
    assert 'eval (this stage): `alol sql --run tiny "SELECT * FROM eval LIMIT 10"`' in artifacts["alol-report"].data
    assert artifacts["alol-compare"].data.startswith("# alol compare: run tiny")
    metrics = artifacts["alol-metrics"]
    assert metrics.description and "pi_theta" in metrics.description
    table = json.loads(metrics.data) if isinstance(metrics.data, str) else metrics.data
    floats = [v for row in table for v in row.values() if isinstance(v, float)]
    assert floats and all(v == significant(v) for v in floats), table


_LOG_ROW_TASK = re.compile(r'<div class="log-row__trailing"><div>[^<]*</div><div>([^<]*)</div>')


@pytest.mark.e2e
def test_the_ui_pages_show_the_stages_the_result_and_the_report_plots(request):
    """The flow-run pages (their logs name each stage's task run) and the report's artifact page, in chromium."""
    chromium = _chromium()
    ui_run: UiRun = request.getfixturevalue("ui_run")
    ui, names = ui_run.api_url.removesuffix("/api"), ui_run.names
    profile = request.getfixturevalue("tmp_path") / "chromium"

    worker = _dom(chromium, f"{ui}/runs/flow-run/{ui_run.runs[names['full']].id}", profile)
    assert names["full"] in _text(worker) and ui_run.result_line in _text(worker), _text(worker)[:3000]
    assert {"ingest", "score", "advantage"} <= set(_LOG_ROW_TASK.findall(worker)), _LOG_ROW_TASK.findall(worker)
    local = _dom(chromium, f"{ui}/runs/flow-run/{ui_run.local.id}", profile)
    assert ui_run.result_line in _text(local), _text(local)[:3000]
    assert set(STAGE_NAMES) <= set(_LOG_ROW_TASK.findall(local)), _LOG_ROW_TASK.findall(local)

    artifacts = {a.key: a for a in _api(ui_run.api_url, "read_latest_artifacts")}
    report = artifacts["alol-report"]
    page = _dom(chromium, f"{ui}/artifacts/artifact/{report.latest_id}", profile)
    images = re.findall(r'<img[^>]*src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"', page)
    assert len(images) == report.data.count("](data:image/png;base64,") >= 2, _text(page)[:3000]
    assert not re.findall(r'href="(?:\.\./|eval/)[^"]*"', page), "no dead link to a table folder"
    assert 'eval (this stage): alol sql --run tiny "SELECT * FROM eval LIMIT 10"' in _text(page), _text(page)[-3000:]

    compare = _dom(chromium, f"{ui}/runs/flow-run/{ui_run.compare.id}", profile)
    assert ui_run.compare.name in _text(compare), _text(compare)[:3000]
