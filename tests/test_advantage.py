"""Advantage stage: A = R - V joined on id, the positive filter, the sampling weights, the metrics."""

import math

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.runner import cache_key
from schemas.advantage import ADVANTAGE_SCHEMA, QUANTILES, AdvantageMetrics
from schemas.algorithms import ALGORITHM_REGISTRY
from schemas.config import AlolConfig
from schemas.manifest import StageOutput
from schemas.reference import REFERENCE_SCHEMA
from stages import advantage
from stages.io import StageReader, StageWriter
from tests.support.outputs import commit_output
from tests.support.outputs import metrics as stage_metrics


def reference_table(ids, splits, values, preferences=None) -> pa.Table:
    n = len(ids)
    return pa.table(
        {"id": ids, "split": splits, "preference": preferences or [None] * n, "prompt_tokens": [4] * n, "ref_logprob": [-3.0] * n,
         "ref_token_logprobs": [[-1.0, -2.0]] * n, "response_tokens": [2] * n, "response_truncated": [False] * n,
         "token_hash": ["0" * 16] * n, "value": values},
        schema=REFERENCE_SCHEMA,
    )


def score_table(ids, rewards) -> pa.Table:
    return pa.table({"id": ids, "safety": [0.5] * len(ids), "reward": rewards})


def run_advantage(tmp_path, score: pa.Table, reference: pa.Table, cfg: AlolConfig | None = None, name="advantage"):
    inputs = {
        "score": commit_output(tmp_path / f"{name}-score", "score", {"score": score}),
        "reference": commit_output(tmp_path / f"{name}-reference", "reference", {"reference": reference}),
    }
    out = StageWriter(tmp_path / name)
    result = advantage.run(cfg or AlolConfig(), inputs, out)
    out.commit(stage="advantage", cache_key="a" * 64, result=result, config_fingerprints={}, config={}, inputs={},
               code_version="test", versions={})
    return result, StageReader(tmp_path / name)


def test_preference_data_trains_on_chosen_rows_unless_all_rows_are_asked_for(tmp_path):
    """advantage.rows: chosen leaves rejected responses out of the table, and out of the positive fraction."""
    ids = ["c1", "r1", "c2", "r2", "plain", "v1"]
    preferences = ["chosen", "rejected", "chosen", "rejected", None, "chosen"]
    splits = ["train"] * 5 + ["validation"]
    rewards = [1.0, 2.0, 0.1, 3.0, 0.8, 1.0]  # both rejected rows have A > 0, one chosen row has not
    reference = reference_table(ids, splits, [0.5] * 6, preferences)
    result, reader = run_advantage(tmp_path, score_table(ids, rewards), reference)
    assert reader.read("advantage")["id"].to_pylist() == ["c1", "c2", "plain"]
    m = result.metrics
    assert (m.rows, m.positive_rows, m.rejected_rows_left_out) == (3, 2, 2)
    assert m.positive_fraction == pytest.approx(2 / 3)
    assert (result.rows_in, result.rows_out, result.rows_rejected) == (5, 3, 2)

    every = AlolConfig.model_validate({"advantage": {"rows": "all"}})
    result, reader = run_advantage(tmp_path, score_table(ids, rewards), reference, every, name="all")
    assert reader.read("advantage")["id"].to_pylist() == ["c1", "c2", "plain", "r1", "r2"]
    assert (result.metrics.rows, result.metrics.positive_rows, result.metrics.rejected_rows_left_out) == (5, 4, 0)


def test_advantage_matches_numpy_for_train_rows_in_any_order(tmp_path):
    rng = np.random.default_rng(0)
    n = 200
    ids = [f"row{i:04d}" for i in range(n)]
    splits = ["train" if i % 4 else "validation" for i in range(n)]
    reward = rng.uniform(-0.2, 2.0, n)
    value = rng.uniform(0.0, 1.5, n)
    test_ids = [f"test{i}" for i in range(10)]  # score rows of other splits have no reference row
    order = rng.permutation(n)
    score = score_table([ids[i] for i in order] + test_ids, list(reward[order]) + [9.0] * 10)
    result, reader = run_advantage(tmp_path, score, reference_table(ids, splits, list(value)))

    table = reader.read("advantage").sort_by("id")
    assert [(f.name, f.type) for f in table.schema] == [(f.name, f.type) for f in ADVANTAGE_SCHEMA]
    train = np.array([s == "train" for s in splits])
    assert table["id"].to_pylist() == [i for i, t in zip(ids, train) if t]
    assert set(table["split"].to_pylist()) == {"train"}
    a = reward[train] - value[train]
    np.testing.assert_allclose(table["advantage"].to_numpy(), a)
    np.testing.assert_array_equal(table["positive"].to_numpy(zero_copy_only=False), a > 0)
    np.testing.assert_allclose(table["weight_advantage"].to_numpy(), np.maximum(a, 0))
    np.testing.assert_allclose(table["weight_reward"].to_numpy(), np.maximum(reward[train], 0))
    np.testing.assert_allclose(table["weight_uniform"].to_numpy(), 1.0)

    m = result.metrics
    assert isinstance(m, AdvantageMetrics) and reader.metrics == m, "the manifest gives back the typed metrics"
    assert result.rows_out == train.sum() == m.rows
    assert m.positive_rows == (a > 0).sum()
    assert m.positive_fraction == pytest.approx((a > 0).mean())
    assert m.reward_mean == pytest.approx(reward[train].mean())
    assert m.value_mean == pytest.approx(value[train].mean())
    assert m.negative_reward_rows == (reward[train] < 0).sum() > 0
    expected = np.quantile(a, QUANTILES)  # linear interpolation, as DuckDB's quantile_cont
    assert list(m.advantage_quantiles) == ["p1", "p5", "p25", "p50", "p75", "p95", "p99"]
    np.testing.assert_allclose(list(m.advantage_quantiles.values()), expected)


def test_training_row_without_score_names_the_row(tmp_path):
    """The first id (in id order) of the rows without a reward, and how many there are."""
    ids = ["d", "a", "b", "c"]
    score = score_table(["a", "c"], [1.0, 1.0])
    with pytest.raises(advantage.AdvantageError, match=r"training row id b has no finite `reward` .*2 rows in all"):
        run_advantage(tmp_path, score, reference_table(ids, ["train"] * 4, [0.1, 0.2, 0.3, 0.4]))


def test_nan_value_names_the_row_and_the_reference_table(tmp_path):
    ids = ["a", "b"]
    score = score_table(ids, [1.0, 1.0])
    with pytest.raises(advantage.AdvantageError, match=r"reference/\*\.parquet: training row id b has no finite `value`"):
        run_advantage(tmp_path, score, reference_table(ids, ["train"] * 2, [0.1, math.nan]))


def test_no_training_rows_is_an_error(tmp_path):
    score = score_table(["a"], [1.0])
    with pytest.raises(advantage.AdvantageError, match="no rows with split 'train'"):
        run_advantage(tmp_path, score, reference_table(["a"], ["validation"], [0.1]))


def test_every_algorithm_draws_by_a_weight_column_of_the_table():
    assert {spec.weight_column for spec in ALGORITHM_REGISTRY.values()} <= set(ADVANTAGE_SCHEMA.names)


def test_cache_key_ignores_train_settings():
    inputs = {
        name: StageOutput(stage=name, cache_key="k" * 64, path="/x", content_hash=name * 4) for name in ("score", "reference")
    }
    base = AlolConfig()
    changed = AlolConfig.model_validate(
        {"train": {"algorithm": "a_lol_kl", "kl_beta": 0.1, "steps": 7, "learning_rate": 1e-3}}
    )
    assert cache_key(base, "advantage", inputs) == cache_key(changed, "advantage", inputs)
    threads = AlolConfig.model_validate({"advantage": {"threads": 1}})
    assert cache_key(base, "advantage", inputs) != cache_key(threads, "advantage", inputs)
    every = AlolConfig.model_validate({"advantage": {"rows": "all"}})
    assert cache_key(base, "advantage", inputs) != cache_key(every, "advantage", inputs)


def test_recomputed_output_has_the_same_bytes(tmp_path):
    """Content-addressed caching needs a deterministic output: same inputs, same Parquet bytes."""
    import duckdb

    from schemas.config import load_config
    from stages.advantage import connect, write_advantage
    from stages.io import file_sha256, sql_literal

    ids = [f"{i:032x}" for i in range(20_000)]
    duckdb.sql(f"COPY (SELECT id, random() AS reward FROM (SELECT unnest({ids!r}) AS id)) TO '{tmp_path}/s.parquet'")
    duckdb.sql(f"COPY (SELECT id, 'train' AS split, NULL::VARCHAR AS preference, random() AS value "
               f"FROM read_parquet('{tmp_path}/s.parquet') "
               f"ORDER BY random()) TO '{tmp_path}/r.parquet'")
    cfg = load_config("smoke", overrides={"advantage.threads": 2})
    shas = []
    for n in range(3):
        con = connect(cfg, str(tmp_path))
        tables = [f"read_parquet({sql_literal(str(tmp_path / name))})" for name in ("s.parquet", "r.parquet")]
        write_advantage(con, *tables, tmp_path / f"a{n}.parquet")
        shas.append(file_sha256(tmp_path / f"a{n}.parquet"))
    assert len(set(shas)) == 1
    import pyarrow.parquet as pq

    written = pq.read_table(tmp_path / "a0.parquet").column("id").to_pylist()
    assert written == sorted(ids)


def test_narrow_sort_writes_the_bytes_of_the_one_step_query(tmp_path):
    """ADVANTAGE_SQL sorts only the input columns and derives the rest afterwards: the file must be byte for
    byte the one the plain formulation (derive every column, then ORDER BY id) writes, NaN and nulls included."""
    rng = np.random.default_rng(3)
    n = 5000
    ids = [f"{i:032x}" for i in rng.permutation(10 * n)[:n]]
    reward = list(rng.uniform(-0.5, 2.0, n))
    reward[7] = math.nan
    reference = reference_table(ids, ["train" if i % 5 else "validation" for i in range(n)], list(rng.uniform(0, 1.5, n)))
    score = score_table(ids[: n - 3], reward[: n - 3])  # three training rows without a score row: null reward
    plain = """
        SELECT r.id::VARCHAR AS id, r.split::VARCHAR AS split, s.reward::DOUBLE AS reward, r.value::DOUBLE AS value,
               (s.reward - r.value)::DOUBLE AS advantage, (s.reward - r.value > 0) AS positive,
               greatest(s.reward - r.value, 0)::DOUBLE AS weight_advantage, greatest(s.reward, 0)::DOUBLE AS weight_reward,
               1.0::DOUBLE AS weight_uniform
        FROM reference AS r LEFT JOIN score AS s USING (id)
        WHERE r.split = 'train' AND r.preference IS DISTINCT FROM 'rejected' ORDER BY id"""
    # From Parquet files, as the stage reads them: DuckDB infers which columns are non-null (and writes them
    # as required) from its source, so registered Arrow tables would test other bytes.
    pq.write_table(reference, tmp_path / "reference.parquet")
    pq.write_table(score, tmp_path / "score.parquet")
    con = duckdb.connect(config={"threads": 2})
    con.execute(f"CREATE VIEW reference AS SELECT * FROM read_parquet('{tmp_path / 'reference.parquet'}')")
    con.execute(f"CREATE VIEW score AS SELECT * FROM read_parquet('{tmp_path / 'score.parquet'}')")
    advantage.write_advantage(con, "score", "reference", tmp_path / "narrow.parquet")
    con.execute(f"COPY ({plain}) TO '{tmp_path / 'plain.parquet'}' (FORMAT parquet, COMPRESSION zstd, COMPRESSION_LEVEL 1)")
    assert (tmp_path / "narrow.parquet").read_bytes() == (tmp_path / "plain.parquet").read_bytes()
def test_constant_value_ablation_subtracts_the_mean_reward_of_the_value_targets(tmp_path):
    """advantage.value: constant ignores the head's V(x): A = R - mean R(x, y_ref) over the value targets."""
    ids = ["a", "b", "c", "d"]
    rewards = [0.2, 0.9, 0.6, 1.4]
    reference = reference_table(ids, ["train"] * 4, [0.1, 1.2, 0.3, 0.0])
    target_mean = 0.65
    inputs = {
        "score": commit_output(tmp_path / "score", "score", {"score": score_table(ids, rewards)}),
        "reference": commit_output(
            tmp_path / "reference", "reference", {"reference": reference},
            metrics_model=stage_metrics("reference", value_target_reward={"mean": target_mean, "std": 0.1, "min": 0.5, "max": 0.8}),
        ),
    }
    cfg = AlolConfig.model_validate({"advantage": {"value": "constant"}})
    out = StageWriter(tmp_path / "out")
    result = advantage.run(cfg, inputs, out)
    out.commit(stage="advantage", cache_key="a" * 64, result=result, config_fingerprints={}, config={}, inputs={},
               code_version="test", versions={})
    table = StageReader(tmp_path / "out").read("advantage").sort_by("id")
    np.testing.assert_allclose(table["value"].to_numpy(), target_mean)
    np.testing.assert_allclose(table["advantage"].to_numpy(), np.array(rewards) - target_mean)
    assert table["positive"].to_pylist() == [False, True, False, True]
    assert result.metrics.value_source == "constant" and result.metrics.positive_rows == 2
    assert cache_key(cfg, "advantage", {n: r.output() for n, r in inputs.items()}) != cache_key(
        AlolConfig(), "advantage", {n: r.output() for n, r in inputs.items()}
    ), "the ablation is its own advantage output"


def test_the_train_seed_changes_the_train_key_only():
    """`alol compare --seeds K` sets train.seed: only train's key changes (evaluate's follows through the train
    output it reads), so the upstream stays cached."""
    inputs = {
        name: StageOutput(stage=name, cache_key="k" * 64, path="/x", content_hash=name * 4)
        for name in ("ingest", "score", "reference", "advantage", "train")
    }
    base, seeded = AlolConfig(), AlolConfig.model_validate({"train": {"seed": 3}})
    assert seeded.train.seed_or(seeded.run.seed) == 3 and base.train.seed_or(7) == 7
    for stage in ("ingest", "score", "reference", "advantage", "evaluate"):
        assert cache_key(base, stage, inputs) == cache_key(seeded, stage, inputs), stage
    assert cache_key(base, "train", inputs) != cache_key(seeded, "train", inputs)
