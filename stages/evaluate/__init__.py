"""Evaluate stage: generate on the test prompts with pi_theta and pi_ref, score both, compare, report.

- `prompts`: the distinct prompts of ingest's test split (or, with evaluate.split: final, of the locked
  final split), and Do-Not-Answer questions.
- Decoding and scoring run through `run.executor` (stages.executor; Ray actors of `run.workers.evaluate`).
- `generation`: the generation settings and pi_ref's generations through a cache shared across runs
  (`<run.cache_dir>/generations`), so that a second algorithm over the same upstream generates only
  with its own policy; the policy's generations are pi_ref's when the train stage kept no checkpoint.
- `table`: the `eval` table, both models' responses scored by the score stage's components.
- `judges`: the scores no training reward uses (evaluate.judges), columns of `eval` beside `reward`.
- `harmlessness`: optionally, both models on Do-Not-Answer prompts scored by the safety component
  (`eval_harmlessness` has no judge columns).
- `outputs`: the report, its plots and the metrics files.

Outputs: the `eval` table (schemas.evaluate.eval_schema), optionally `eval_harmlessness`,
`metrics.json` (schemas.evaluate.EvaluateMetrics), `metrics_table.json` (the summary rows, for a
table artifact), `report.md` and `plots/*.png`. The metrics add to each component's numbers those of
every judge, and the length-controlled reward difference (stages.metrics.length_controlled_difference). They are a function of the inputs' files, the config
and the code: no timing (the train stage's are in its own metrics) and nothing about the shared
cache (whether pi_ref's generations came from it is in the manifest only), so recomputing train
to the same content hash leaves this stage's cache key, and output, as they were.
"""

from __future__ import annotations

import logging
from typing import Any

from schemas.config import AlolConfig
from schemas.evaluate import MODELS, PI_REF, PI_THETA, EvaluateMetrics, TrainSummary, eval_schema
from schemas.manifest import StageResult
from stages.catalog import load_scorer
from stages.evaluate.generation import Generations, generation_settings
from stages.evaluate.harmlessness import harmlessness
from stages.evaluate.judges import Judges
from stages.evaluate.outputs import write_report
from stages.evaluate.prompts import test_prompts
from stages.evaluate.table import eval_table, score_both
from stages.executor import ShardMapper
from stages.faults import failpoint
from stages.io import StageReader, StageWriter
from stages.metrics import compare_models, length_controlled_difference, words
from stages.report import advantage_statistics

log = logging.getLogger("alol.evaluate")


def _train_summary(train: StageReader) -> TrainSummary:
    m = train.metrics
    return TrainSummary(
        policy_is_reference=m.policy_is_reference, best_step=m.best_step, best_validation_reward=m.best_validation_reward,
        reference_validation_reward=m.reference_validation_reward,
    )


def _config(cfg: AlolConfig, inputs: dict[str, StageReader]) -> dict[str, Any]:
    """The configuration behind this output: what each upstream stage read, plus this stage's sections."""
    merged: dict[str, Any] = {}
    for reader in inputs.values():
        merged.update(reader.manifest.config)
    merged.update({name: getattr(cfg, name).model_dump(mode="json") for name in ("evaluate", "reference", "score")})
    merged["run.seed"] = cfg.run.seed
    return merged


def run(cfg: AlolConfig, inputs: dict[str, StageReader], out: StageWriter) -> StageResult:
    """Generate, score, write the `eval` table, metrics and report."""
    ids, prompts = test_prompts(inputs["ingest"], cfg.evaluate.split)
    scorer = load_scorer(cfg, inputs["score"])
    mapper = ShardMapper.for_stage(cfg, "evaluate")
    generations = Generations(cfg, inputs, mapper)
    reference = generations.reference(ids, prompts)
    failpoint("evaluate.reference_generations")
    responses = {PI_REF: reference, PI_THETA: generations.policy(prompts, reference)}
    scores = score_both(mapper, scorer, ids, prompts, responses, generations.policy_is_reference)
    judges = Judges(cfg)
    scores[PI_REF].update(judges.score(ids, prompts, responses[PI_REF]))  # the policy's too when it is pi_ref
    if not generations.policy_is_reference:
        scores[PI_THETA].update(judges.score(ids, prompts, responses[PI_THETA]))
    schema = eval_schema(scorer.component_names, judges.names)
    table = eval_table(ids, prompts, responses, scores, schema)
    out.write_table("eval", table, schema)

    samples, seed = cfg.evaluate.bootstrap_samples, cfg.run.seed
    lengths = {m: [len(words(r)) for r in responses[m]] for m in MODELS}
    controlled, slope = length_controlled_difference(
        scores[PI_THETA]["reward"], lengths[PI_THETA], scores[PI_REF]["reward"], lengths[PI_REF], samples, seed
    )
    fields: dict[str, Any] = {
        "algorithm": inputs["train"].metrics.algorithm,
        "split": cfg.evaluate.split,
        "prompts": len(ids),
        "components": list(scorer.component_names),
        "judges": judges.names,
        "bootstrap_samples": samples,
        "policy_is_reference": generations.policy_is_reference,
        **compare_models(responses[PI_THETA], scores[PI_THETA], responses[PI_REF], scores[PI_REF], samples, seed),
        "length_controlled": {"difference": controlled.as_dict(), "slope_per_word": slope},
        "train": _train_summary(inputs["train"]).model_dump(),
        "generation": generation_settings(cfg),
    }
    rows_in, rows_out = len(ids), table.num_rows
    if cfg.evaluate.harmlessness_prompts > 0:
        fields["harmlessness"] = harmlessness(cfg, generations, scorer, out, eval_schema(scorer.component_names))
        rows_in += fields["harmlessness"]["prompts"]
        rows_out += 2 * fields["harmlessness"]["prompts"]
    advantage_values = inputs["advantage"].read("advantage", columns=["advantage"])["advantage"].to_numpy()
    fields["advantage"] = advantage_statistics(advantage_values)
    fields["reference_generations_cached"] = generations.reference_cache_hits
    metrics = EvaluateMetrics.model_validate(fields)
    rewards = {m: scores[m]["reward"] for m in MODELS}
    write_report(out, inputs, metrics, _config(cfg, inputs), rewards, advantage_values)
    log.info("%s", metrics.headline())
    return StageResult(rows_in=rows_in, rows_out=rows_out, metrics=metrics, execution=mapper.execution())
