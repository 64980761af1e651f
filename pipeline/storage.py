"""Where a run's stage outputs live: the folders of one run and its run.json record.

Layout of a run:  <run.root>/<run.name>/<stage>/<cache key[:16]>/{<table>/part-*.parquet, files..., manifest.json}
and <run.root>/<run.name>/run.json, which records the output folder each stage last produced or reused,
and what happened: computed by which process and flow run, seconds spent computing and waiting.
Stored paths are relative to the run root (`portable`), so a run root can be moved or copied; in
memory they are absolute (`resolve`). How one output folder is written and read is stages.io's business.

The run root may be an object store URL (`s3://bucket/prefix`, stages.fs): folders are then URL
strings, run.json and LATEST single objects (one PUT each, so a reader sees a whole record).
`RunStore.of(cfg)` hands `run.storage_options` to stages.fs.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from schemas.config import AlolConfig
from schemas.manifest import StageOutput
from stages import fs
from stages.io import IntegrityError, StageReader, atomic_write_text

FINAL_READS_DIR = "final_split_reads"
"""Under run.root: one JSON object per time a run used an evaluation of the locked final split
(evaluate.split: final). One object each, never a shared file rewritten, so runs recording at once lose
no count (on an object store as well, where nothing can be locked)."""


class RunStore:
    """The folders of one run and its `run.json` record of which output each stage uses."""

    def __init__(self, root: str | Path, name: str):
        self.root: fs.Location = fs.location(root)
        self.name = name
        self.dir = fs.join(self.root, name)

    @classmethod
    def of(cls, cfg: AlolConfig) -> RunStore:
        """The run `cfg.run.name` under `cfg.run.root` (with `run.storage_options` for a store URL)."""
        fs.configure(cfg.run.storage_options)
        return cls(cfg.run.root, cfg.run.name)

    def stage_dir(self, stage: str, cache_key: str) -> fs.Location:
        return fs.join(self.dir, stage, cache_key[:16])

    @property
    def state_path(self) -> fs.Location:
        return fs.join(self.dir, "run.json")

    def state(self) -> dict[str, Any]:
        try:
            text = fs.read_text(self.state_path)
        except (FileNotFoundError, IsADirectoryError):
            return {"run": self.name, "stages": {}}
        return json.loads(text)

    def folder(self, path: str | Path) -> fs.Location:
        """A stored output path (relative to the run root; an absolute one, as older run.json files hold, as is)."""
        if fs.is_remote(str(path)):
            return str(path)
        return fs.join(self.root, str(path)) if fs.is_remote(self.root) else self.root / path

    def portable(self, output: StageOutput) -> StageOutput:
        """`output` with its path relative to the run root, as run.json and Prefect's records store it."""
        if fs.is_remote(self.root):
            relative = fs.relative(output.path, self.root) or output.path
            return output.model_copy(update={"path": relative})
        path = Path(output.path)
        relative = path.relative_to(self.root).as_posix() if path.is_absolute() and path.is_relative_to(self.root) else output.path
        return output.model_copy(update={"path": relative})

    def resolve(self, output: StageOutput) -> StageOutput:
        """`output` with an absolute path under this run root."""
        return output.model_copy(update={"path": str(self.folder(output.path))})

    def record(self, output: StageOutput, *, cached: bool, seconds: float) -> None:
        """What this run did with a stage: its output (path relative to the root), whether it was cached,
        the seconds it spent on the stage, split into computing and waiting (on another run's lock, on
        Prefect), and who computed the output (from its manifest), so that a run that waited on another
        run's computation does not claim it."""
        manifest = StageReader(self.folder(output.path), verify=False).manifest
        computing = 0.0 if cached else min(manifest.seconds, seconds)
        producer = manifest.producer.model_dump() if manifest.producer else {}
        state = self.state()
        state["stages"][output.stage] = {
            **self.portable(output).model_dump(),
            "cached": cached,
            "seconds": round(seconds, 3),
            "computing_seconds": round(computing, 3),
            "waiting_seconds": round(max(seconds - computing, 0.0), 3),
            "computed_by": {**producer, "finished": manifest.finished.isoformat(), "seconds": round(manifest.seconds, 3)},
            "recorded": datetime.now(timezone.utc).isoformat(),
        }
        atomic_write_text(self.state_path, json.dumps(state, indent=2))
        atomic_write_text(fs.join(self.root, "LATEST"), self.name)
        if output.stage == "evaluate" and manifest.metrics.get("split") == "final":
            self._count_final_read(output, cached)

    @property
    def final_reads_dir(self) -> fs.Location:
        return fs.join(self.root, FINAL_READS_DIR)

    def final_split_reads(self) -> list[dict[str, Any]]:
        """Every recorded use of an evaluation of the final split under this run root, oldest first."""
        folder = self.final_reads_dir
        if fs.is_remote(folder):
            texts = [fs.read_text(fs.join(folder, name)) for name in fs.listing(folder) if name.endswith(".json")]
        else:
            texts = [path.read_text(encoding="utf-8") for path in folder.glob("*.json")] if folder.is_dir() else []
        return sorted((json.loads(text) for text in texts), key=lambda read: (read["recorded"], read["id"]))

    def _count_final_read(self, output: StageOutput, cached: bool) -> None:
        """The final split is read only when asked; each time it is (computed or cached, by any run under this
        root) is kept, so that a result on it can say how often it was looked at."""
        read_id = uuid.uuid4().hex
        read = {"run": self.name, "evaluate": self.portable(output).path, "cached": cached,
                "recorded": datetime.now(timezone.utc).isoformat(), "id": read_id}
        atomic_write_text(fs.join(self.final_reads_dir, f"{read_id}.json"), json.dumps(read, indent=2))

    def current(self, stage: str) -> StageOutput | None:
        """The output run.json records for `stage`, with an absolute path; None when there is none."""
        entry = self.state()["stages"].get(stage)
        if entry is None:
            return None
        return self.resolve(StageOutput.model_validate({k: entry[k] for k in StageOutput.model_fields}))

    def verify(self) -> dict[str, str | None]:
        """Re-hash every file of every output run.json records: stage -> None when intact, else what is wrong."""
        problems: dict[str, str | None] = {}
        for stage, entry in self.state()["stages"].items():
            try:
                reader = StageReader(self.folder(entry["path"]))
                if reader.content_hash != entry["content_hash"]:
                    raise IntegrityError(
                        f"{reader.location}: content hash {reader.content_hash[:12]} differs from run.json's {entry['content_hash'][:12]}"
                    )
                problems[stage] = None
            except IntegrityError as exc:
                problems[stage] = str(exc)
        return problems

    @staticmethod
    def latest_name(root: str | Path) -> str | None:
        pointer = fs.join(fs.location(root), "LATEST")
        try:
            return fs.read_text(pointer).strip()
        except (FileNotFoundError, IsADirectoryError):
            return None
