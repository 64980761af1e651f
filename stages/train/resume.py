"""Resume state: what a rerun after a crash continues from, so that it reaches the same weights.

Every `checkpoint_every` steps the trainable weights, optimiser, scheduler, sampler, each process's
RNG, the log and the timings so far are saved under <run.cache_dir>/train-resume/<key>/, the key a
hash of the config, the inputs and the training code (`resume_key`). The folder outlives the stage's
discarded partial output; the stage deletes it when it finishes.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from schemas.base import canonical_json, sha256_text
from schemas.config import AlolConfig
from stages import losses, models, sampler
from stages.io import StageReader, atomic_write_text
from stages.train.errors import TrainError
from stages.train.policy import trainable_parameters

RESUME_FOLDER = "train-resume"
TRAIN_PACKAGE = Path(__file__).resolve().parent


@dataclass
class Progress:
    """Everything of a run that is not a tensor: the last finished step, the log, the best checkpoint,
    and the wall-clock figures so far (for TrainMetrics; `log` holds none, it is hashed output)."""

    step: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)
    best_step: int | None = None
    best_reward: float | None = None
    sampler: dict[str, Any] | None = None
    seconds: float = 0.0
    validation_seconds: float = 0.0
    step_tokens_per_s: list[float] = field(default_factory=list)


def training_sources() -> list[Path]:
    """The source files of the training code: this package and the loss, sampler and model modules."""
    files = sorted(TRAIN_PACKAGE.glob("*.py"))
    for module in (losses, sampler, models):
        path = Path(module.__file__).resolve()
        files += sorted(path.parent.rglob("*.py")) if path.name == "__init__.py" else [path]
    return files


def resume_key(cfg: AlolConfig, inputs: dict[str, StageReader]) -> str:
    """Hash of what determines the training: train/reference/score config, seed, inputs, training code."""
    payload = {
        "config": {s: getattr(cfg, s).model_dump(mode="json") for s in ("train", "reference", "score")},
        "seed": cfg.train.seed_or(cfg.run.seed),
        "inputs": {name: reader.content_hash for name, reader in sorted(inputs.items())},
        "code": [sha256_text(path.read_text(encoding="utf-8")) for path in training_sources()],
    }
    return sha256_text(canonical_json(payload))[:24]


class ResumeFolder:
    """<cache>/train-resume/<key>/: `state-<step>/` folders, a `latest` pointer, `best-<step>.safetensors`."""

    def __init__(self, folder: Path, accelerator: Any):
        self.folder = folder
        self.accelerator = accelerator

    def best_path(self, step: int) -> Path:
        return self.folder / f"best-{step:08d}.safetensors"

    def latest(self) -> Path | None:
        pointer = self.folder / "latest"
        if not pointer.is_file():
            return None
        state = self.folder / pointer.read_text(encoding="utf-8").strip()
        return state if (state / "progress.json").is_file() else None

    def save_best(self, model: Any, step: int) -> None:
        """Trainable weights of the best checkpoint so far (main process)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.best_path(step).with_suffix(".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable_parameters(model).items()}, tmp)
        os.replace(tmp, self.best_path(step))

    def save(self, model: Any, optimizer: Any, scheduler: Any, progress: Progress) -> None:
        """Every process writes its RNG state; the main process the rest, then moves `latest` (atomic)."""
        acc = self.accelerator
        state = self.folder / f"state-{progress.step:08d}"
        if acc.is_main_process:
            shutil.rmtree(state, ignore_errors=True)
            state.mkdir(parents=True)
        acc.wait_for_everyone()
        torch.save(_rng_state(), state / f"rng-{acc.process_index}.pt")
        if acc.is_main_process:
            save_file({k: v.detach().cpu().contiguous() for k, v in trainable_parameters(model).items()}, state / "trainable.safetensors")
            torch.save(optimizer.state_dict(), state / "optimizer.pt")
            torch.save(scheduler.state_dict(), state / "scheduler.pt")
            (state / "progress.json").write_text(json.dumps(asdict(progress)), encoding="utf-8")
        acc.wait_for_everyone()
        if acc.is_main_process:
            atomic_write_text(self.folder / "latest", state.name)
            self._remove_stale(keep_state=state.name, keep_best=progress.best_step)
        acc.wait_for_everyone()

    def load(self, model: Any, optimizer: Any, scheduler: Any, progress: Progress) -> bool:
        state = self.latest()
        if state is None:
            return False
        saved = json.loads((state / "progress.json").read_text(encoding="utf-8"))
        load_trainable(model, state / "trainable.safetensors")
        optimizer.load_state_dict(torch.load(state / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(state / "scheduler.pt", weights_only=True))
        rng = state / f"rng-{self.accelerator.process_index}.pt"
        if rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=True))
        for key, value in saved.items():
            setattr(progress, key, value)
        return True

    def _remove_stale(self, keep_state: str, keep_best: int | None) -> None:
        for path in self.folder.glob("state-*"):
            if path.name != keep_state:
                shutil.rmtree(path, ignore_errors=True)
        for path in self.folder.glob("best-*.safetensors"):
            if keep_best is None or path != self.best_path(keep_best):
                path.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def load_trainable(model: Any, path: Path) -> None:
    """Load saved trainable weights; every trainable parameter must be in the file, nothing else."""
    tensors = load_file(path)
    expected = set(trainable_parameters(model))
    if set(tensors) != expected:
        raise TrainError(
            f"{path}: holds {len(tensors)} tensors but the model has {len(expected)} trainable parameters "
            f"(e.g. {sorted(set(tensors) ^ expected)[:3]}); delete {path.parent} to start over"
        )
    model.load_state_dict(tensors, strict=False)


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
