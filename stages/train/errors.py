"""The train stage's error: inputs or saved state it cannot use; the message names the file, row or setting."""

from __future__ import annotations


class TrainError(RuntimeError):
    """Inputs or state the train stage cannot use."""
