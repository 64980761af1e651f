"""Shared pieces of the schemas: the strict base class of config sections, fingerprints, described table columns."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, ValidationError


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


DESCRIPTION_KEY = b"description"
"""The Arrow field-metadata key holding a column's description (schemas.tables, `alol sql --describe`)."""


def column(name: str, type: pa.DataType, description: str) -> pa.Field:
    """A table column with its description in the field metadata (it travels into the Parquet files too)."""
    return pa.field(name, type, metadata={DESCRIPTION_KEY: description.encode("utf-8")})


def column_description(field: pa.Field) -> str | None:
    """The description `column` gave a field, or None."""
    value = (field.metadata or {}).get(DESCRIPTION_KEY)
    return value.decode("utf-8") if value is not None else None


def typed_options(owner: str, data: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """`data` with its `options` (a plain dict in YAML, or a model) validated by `model`; the options' errors
    are reported under `options.` of `owner` (the model whose `kind` chose `model`)."""
    options = data.get("options") or {}
    if isinstance(options, BaseModel):
        options = options.model_dump()
    try:
        typed = model.model_validate(options)
    except ValidationError as exc:
        problems = [{**e, "loc": ("options", *e["loc"])} for e in exc.errors(include_url=False)]
        raise ValidationError.from_exception_data(owner, problems) from None
    return {**data, "options": typed}
