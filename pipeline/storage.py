"""Where a run's stage outputs live: the folders of one run and its run.json record.

Layout of a run:  <run.root>/<run.name>/<stage>/<cache key[:16]>/{<table>/part-*.parquet, files..., manifest.json}
and <run.root>/<run.name>/run.json, which records the output folder each stage last produced or reused.
How one output folder is written and read is stages.io's business.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from schemas.config import AlolConfig
from schemas.manifest import StageOutput
from stages.io import atomic_write_text


class RunStore:
    """The folders of one run and its `run.json` record of which output each stage uses."""

    def __init__(self, root: str | Path, name: str):
        self.root = Path(root).resolve()
        self.name = name
        self.dir = self.root / name

    @classmethod
    def of(cls, cfg: AlolConfig) -> RunStore:
        """The run `cfg.run.name` under `cfg.run.root`."""
        return cls(cfg.run.root, cfg.run.name)

    def stage_dir(self, stage: str, cache_key: str) -> Path:
        return self.dir / stage / cache_key[:16]

    @property
    def state_path(self) -> Path:
        return self.dir / "run.json"

    def state(self) -> dict[str, Any]:
        if not self.state_path.is_file():
            return {"run": self.name, "stages": {}}
        return json.loads(self.state_path.read_text(encoding="utf-8"))

    def record(self, output: StageOutput, *, cached: bool, seconds: float) -> None:
        state = self.state()
        state["stages"][output.stage] = {
            **output.model_dump(),
            "cached": cached,
            "seconds": round(seconds, 3),
            "recorded": datetime.now(timezone.utc).isoformat(),
        }
        atomic_write_text(self.state_path, json.dumps(state, indent=2))
        atomic_write_text(self.root / "LATEST", self.name)

    def current(self, stage: str) -> StageOutput | None:
        entry = self.state()["stages"].get(stage)
        if entry is None:
            return None
        return StageOutput.model_validate({k: entry[k] for k in StageOutput.model_fields})

    @staticmethod
    def latest_name(root: str | Path) -> str | None:
        pointer = Path(root) / "LATEST"
        return pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None
