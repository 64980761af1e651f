"""Shared pieces of the configuration models: the strict base class and section fingerprints."""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict


def canonical_json(value: object) -> str:
    """JSON with sorted keys and no whitespace: the same data always gives the same bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Section(BaseModel):
    """A configuration section: unknown fields are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    def fingerprint(self) -> str:
        """sha256 of the section's canonical JSON; part of every cache key that reads this section."""
        return sha256_text(canonical_json(self.model_dump(mode="json")))


class UserInputError(Exception):
    """An error in what the user gave (data files, settings, model names): the CLI shows its message as one
    line, without a traceback, and exits non-zero. Its message names the file, row and field where it can."""
