"""`alol export`: a run's policy as a portable transformers folder with its model card.

The policy is the train stage's kept checkpoint, or pi_ref when no checkpoint beat it
(stages.catalog.policy_model_path); the folder is written under a temporary sibling name and renamed
into place, so a failed export leaves nothing under the target name.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from schemas.base import UserInputError
from schemas.config import AlolConfig
from schemas.reference import ReferenceConfig
from stages.catalog import policy_is_reference, policy_model_path
from stages.io import StageReader
from stages.model_card import model_card
from stages.models.export import DTYPES, ExportDtype, write_portable_folder
from stages.models.store import readable_by_all

CARD_FILE = "README.md"
NEEDED_STAGES = ("ingest", "score", "reference", "advantage", "train")
"""The stage outputs an export reads (evaluate too when the run has it)."""


class ExportError(UserInputError):
    """The export cannot be written (target in the way, run incomplete)."""


@dataclass(frozen=True)
class Export:
    """What `export_run` wrote: the folder, the model folder it came from, and whether that is pi_ref."""

    folder: Path
    source: Path
    policy_is_reference: bool


def export_run(cfg: AlolConfig, readers: dict[str, StageReader], target: Path, dtype: ExportDtype, run: str) -> Export:
    """Write the run's policy (in `dtype`) and its model card into the new folder `target`.

    `readers` are the run's stage outputs (NEEDED_STAGES, evaluate optional); `cfg` gives run.cache_dir,
    where the base model is found when pi_ref is the base model. Which base model is the run's own
    (the reference stage's manifest), not the current configuration's.
    """
    missing = [s for s in NEEDED_STAGES if s not in readers]
    if missing:
        raise ExportError(f"run {run!r} has no output of {', '.join(missing)}; run the pipeline first (alol run)")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    target = Path(target).expanduser().resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ExportError(f"{target}: already exists and is not an empty folder; give a new folder or remove it")
    run_cfg = cfg.model_copy(
        update={"reference": ReferenceConfig.model_validate(readers["reference"].manifest.config["reference"])}
    )
    is_reference = policy_is_reference(readers["train"])
    source = policy_model_path(run_cfg, readers["train"], readers["reference"])
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.export-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        write_portable_folder(source, tmp, dtype)
        card = model_card(readers, run=run, dtype=dtype, policy_is_reference=is_reference)
        (tmp / CARD_FILE).write_text(card, encoding="utf-8")
        readable_by_all(tmp)
        if target.exists():
            target.rmdir()
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Export(target, source, is_reference)
