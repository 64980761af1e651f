"""The run configuration: one section per stage, loaded from a profile or YAML file plus overrides."""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from schemas.advantage import AdvantageConfig
from schemas.base import Section, UserInputError
from schemas.evaluate import EvaluateConfig, check_judges
from schemas.algorithms import ALGORITHM_REGISTRY
from schemas.executor import Executor, Workers
from schemas.ingest import PAIRLESS_FORMATS, DataConfig
from schemas.reference import ReferenceConfig, ValueConfig, check_value_heads
from schemas.score import ScoreConfig
from schemas.train import TrainConfig

Profile = Literal["default", "smoke", "quality"]
PROFILES: tuple[str, ...] = Profile.__args__  # type: ignore[attr-defined]
"""The shipped profiles, schemas/profiles/<name>.yaml: the one list of profile names."""


class RunConfig(Section):
    """Where a run's outputs live and the seed every stage derives its randomness from."""

    root: str = Field(
        "data/runs",
        description="Folder holding all runs (relative paths resolve against the working directory), or an object "
        "store URL such as s3://bucket/prefix (needs the s3 extra; credentials and endpoint from the AWS_* "
        "environment variables and storage_options).",
    )
    name: str = Field("default", pattern=r"^[A-Za-z0-9_.-]+$", description="Run name: outputs go to <root>/<name>/.")
    seed: int = Field(0, description="Seed for splits of sampling, training and generation.")
    cache_dir: str = Field(
        "data/cache",
        description="Shared cache for converted models and per-component scores: a folder or an object store URL (s3://...).",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        exclude=True,
        repr=False,
        description="Options for the fsspec filesystem of an object store run.root / cache_dir (e.g. {key: ..., secret: ..., "
        "client_kwargs: {endpoint_url: ...}} for s3); never written to a manifest, run.json, log or Prefect parameter, "
        "so each worker gives its own (or uses the AWS_* environment variables).",
    )
    executor: Executor = Field(
        "local",
        description="Where score, reference and evaluate compute their rows: `local` in the stage's own process (imports "
        "no Ray), `ray` as Ray Data map_batches over shards of the stage input with an actor pool per stage "
        "(run.workers; needs the ray extra). The output is the same; Prefect orchestrates the stages either way.",
    )
    ray_address: str = Field(
        "",
        description="With executor ray: the cluster to join (`host:port` of its head, or `auto`); empty starts a Ray "
        "instance in this process bound to 127.0.0.1 with the dashboard off.",
    )
    workers: Workers = Field(
        default_factory=Workers, description="Actors, CPUs and GPUs per actor and shard rows of each stage under executor ray."
    )

    @model_validator(mode="after")
    def _ray_settings_need_ray(self) -> RunConfig:
        if self.executor == "local" and self.ray_address:
            raise ValueError("run.ray_address is set but run.executor is local: set run.executor=ray, or clear ray_address")
        return self


class AlolConfig(Section):
    """The whole configuration. Each stage's cache key uses the sections it reads (pipeline.stages)."""

    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    value: ValueConfig = Field(default_factory=ValueConfig)
    advantage: AdvantageConfig = Field(default_factory=AdvantageConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @model_validator(mode="after")
    def _value_heads_divide_hidden_size(self) -> AlolConfig:
        check_value_heads(self.reference, self.value)
        check_judges(self.evaluate.judges, self.score)
        if self.evaluate.split == "final" and self.data.final_fraction == 0:
            raise ValueError("evaluate.split: final needs a final split: set data.final_fraction > 0 (the default and quality profiles do)")
        return self

    @model_validator(mode="after")
    def _nodes_meet_somewhere(self) -> AlolConfig:
        """train.nodes > 1 meets at train.rendezvous under the local executor; under ray the stage picks the address."""
        train = self.train
        if train.nodes > 1 and self.run.executor == "local" and train.rendezvous is None:
            raise ValueError(
                f"train.nodes is {train.nodes} with run.executor local: set train.rendezvous to host:port on the first "
                "machine (each machine then runs the same `alol run --stages train`), or set run.executor ray"
            )
        if train.rendezvous is not None and self.run.executor == "ray":
            raise ValueError(
                "train.rendezvous is set but run.executor is ray, where the train stage places its nodes and picks "
                "the rendezvous itself: clear train.rendezvous, or set run.executor local"
            )
        return self

    def pairs_missing(self) -> bool:
        """True when the reference stage will give the pair algorithms no pairs: reference.pairs none, or
        `data` on data known to have none (chatterbot, a pair-less data.format)."""
        pairless = self.data.source == "chatterbot" or self.data.format in PAIRLESS_FORMATS
        return self.reference.pairs == "none" or (self.reference.pairs == "data" and pairless)

    @model_validator(mode="after")
    def _pair_algorithms_have_pairs(self) -> AlolConfig:
        """DPO and PRO need pairs: refused when pairs_missing (the train stage checks the cases only the data
        can tell)."""
        if ALGORITHM_REGISTRY[self.train.algorithm].needs_pairs and self.pairs_missing():
            raise ValueError(
                f"train.algorithm {self.train.algorithm} trains on preference pairs, but reference.pairs is "
                f"{self.reference.pairs}" + (" and the data has none" if self.reference.pairs == "data" else "")
                + ": set reference.pairs: built (pi_ref's own responses, ranked by reward) or auto (built only "
                "when the data has no pairs)"
            )
        return self


class ConfigError(UserInputError):
    """A configuration that cannot be used. `problems` lists (dotted path, message) pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = [f"invalid configuration ({source}):"] + [f"  {path}: {msg}" for path, msg in problems]
        super().__init__("\n".join(lines))


def _dotted(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "<root>"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.field=value`; the value is read as YAML (`1e-5`, `true`, `[a, b]`, `{k: v}`)."""
    if "=" not in text:
        raise ConfigError("--set", [(text, "expected section.field=value")])
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if len(path) < 2:
        raise ConfigError("--set", [(key, "expected a dotted path such as train.algorithm")])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError("--set", [(key, f"value is not valid YAML: {exc}")]) from None
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a nested dict. Accepts `["a.b=1"]` or `{"a.b": 1}` (deployment parameters)."""
    items = (
        [parse_override(o) for o in overrides]
        if isinstance(overrides, list)
        else [([p for p in k.split(".") if p], v) for k, v in overrides.items()]
    )
    for path, value in items:
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return data


def profile_path(name: str) -> Path:
    """A shipped profile's YAML file (schemas/profiles/<name>.yaml)."""
    if name not in PROFILES:
        raise ConfigError("--profile", [("profile", f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")])
    return Path(str(importlib.resources.files("schemas") / "profiles" / f"{name}.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [("<file>", f"cannot read: {exc.strerror}")]) from None
    try:
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "<file>"
        raise ConfigError(str(path), [(where, f"not valid YAML: {getattr(exc, 'problem', exc)}")]) from None
    if not isinstance(loaded, dict):
        raise ConfigError(str(path), [("<root>", "expected a mapping of sections")])
    return loaded


def load_config(
    profile: str | None = "default",
    config_file: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> AlolConfig:
    """Profile, then a user YAML file on top (section by section, field by field), then `--set` overrides."""
    data: dict[str, Any] = {}
    sources = []
    if profile:
        data = _read_yaml(profile_path(profile))
        sources.append(f"profile {profile}")
    if config_file:
        _deep_merge(data, _read_yaml(Path(config_file)))
        sources.append(str(config_file))
    if overrides:
        apply_overrides(data, overrides)
        sources.append("--set")
    try:
        return AlolConfig.model_validate(data)
    except ValidationError as exc:
        problems = [(_dotted(err["loc"]), err["msg"]) for err in exc.errors()]
        raise ConfigError(" + ".join(sources) or "defaults", problems) from None


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
