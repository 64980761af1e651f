"""The README's `alol` commands as a user types them, on the tiny pipeline (a config file in place of
the default profile's SmolLM2 and corpus), through the Prefect flow: run and what it recomputes,
status, report, export, sql, compare (with seeds and the value ablation), the final split, and a run name
that holds other data."""

from __future__ import annotations

import json

import pytest
import yaml

from pipeline.cli import main
from pipeline.storage import RunStore
from stages.io import StageReader
from tests.support.train import WHOLE_PIPELINE, overrides, tiny_setup, write_rows

pytestmark = pytest.mark.e2e


def nested(dotted: dict) -> dict:
    """{"a.b": 1} -> {"a": {"b": 1}}: a YAML config file of --set overrides."""
    out: dict = {}
    for key, value in dotted.items():
        section, field = key.split(".", 1)
        out.setdefault(section, {})[field] = value
    return out


def test_readme_commands_on_tiny_inputs(tmp_path, prefect_backend, capsys):
    model, data = tiny_setup(tmp_path)
    my = tmp_path / "my.yaml"
    my.write_text(yaml.safe_dump(nested({**overrides(tmp_path, model, data), **WHOLE_PIPELINE, "run.name": "mine"})))
    store = RunStore(tmp_path / "runs", "mine")

    before: dict = {}

    def alol(command: str, *args: str) -> str:
        before.clear()
        before.update(store.state()["stages"])
        code = main([command, "--profile", "smoke", "--config", str(my), *args])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        return captured.out

    def fresh() -> list[str]:
        """The stages the last command computed (recorded anew, and not cached)."""
        return [stage for stage, entry in store.state()["stages"].items()
                if entry != before.get(stage) and not entry["cached"]]

    alol("run")
    assert fresh() == ["ingest", "score", "reference", "advantage", "train", "evaluate"]
    first = store.state()["stages"]
    alol("run", "--set", "train.algorithm=a_lol_seq")
    assert fresh() == ["train", "evaluate"], "only train and evaluate recompute"
    alol("run", "--stages", "score", "--refresh", "score")
    assert fresh() == ["score"] and store.state()["stages"]["score"]["content_hash"] == first["score"]["content_hash"]
    alol("run", "--set", "data.max_rows_per_split=200")  # caps nothing here, but a new ingest key
    assert fresh()[0] == "ingest" and store.state()["stages"]["ingest"]["rows"]["ingest"] == 46

    assert "evaluate" in alol("status")
    assert "evaluate: intact" in alol("status", "--verify")
    assert "reward difference pi_theta - pi_ref" in alol("report")

    assert "with its model card to" in alol("export", str(tmp_path / "exported"))
    alol("export", "--run", "mine", str(tmp_path / "exported-bf16"), "--dtype", "bf16")
    assert json.loads((tmp_path / "exported-bf16" / "config.json").read_text())["dtype"] == "bfloat16"

    top = alol("sql", "SELECT prompt_text, response, reward, advantage FROM joined WHERE split = 'train' "
                      "ORDER BY advantage DESC LIMIT 5").splitlines()
    assert top[0].split() == ["prompt_text", "response", "reward", "advantage"] and len(top) == 2 + 5
    # The eval table's models are pi_theta and pi_ref, as in the report: one row per test prompt each.
    prompts = StageReader(store.current("evaluate").path).metrics.prompts
    for model in ("pi_ref", "pi_theta"):
        rows = alol("sql", f"SELECT model, count(*) AS prompts, avg(reward) AS reward FROM eval WHERE model = '{model}' "
                           "GROUP BY model").splitlines()
        assert rows[0].split() == ["model", "prompts", "reward"] and len(rows) == 3, rows
        assert rows[2].split()[:2] == [model, str(prompts)], rows
    assert "joined (stage ingest + score + reference + advantage)" in alol("sql", "--describe")
    assert "prompt_tokens" in alol("sql", "--describe", "reference")

    out = alol("compare", "--algorithms", "a_lol", "nll")
    assert "comparison.md" in out and (tmp_path / "runs" / "mine" / "compare" / "comparison.md").is_file()
    alol("compare", "--set", "reference.pairs=data", "--algorithms", "a_lol", "nll", "--seeds", "2", "--value-ablation")
    comparison = (tmp_path / "runs" / "mine" / "compare" / "comparison.md").read_text()
    assert "a_lol (V=mean)" in comparison and "a_lol − nll" in comparison, comparison
    assert fresh() == ["train", "evaluate"], "the last method trained; the upstream stayed cached"

    # The locked final split: read only when asked, and every read counted under the run root.
    final = ("--set", "data.final_fraction=0.7")  # 3 test prompts, 1 final here
    alol("run", *final)
    assert store.final_split_reads() == []
    alol("run", "--final", *final)
    assert [r["cached"] for r in store.final_split_reads()] == [False]
    alol("compare", "--final", "--algorithms", "a_lol", *final)
    assert [r["cached"] for r in store.final_split_reads()] == [False, True]

    other = write_rows(tmp_path / "other.jsonl", seed=1)
    assert main(["run", "--profile", "smoke", "--config", str(my), "--set", f"data.path={other}"]) == 1
    assert "--set run.name=NAME" in capsys.readouterr().err
    alol("run", "--set", f"data.path={other}", "--force")
    assert "ingest" in fresh()
