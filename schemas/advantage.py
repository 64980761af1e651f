"""Advantage stage: A = R - V, the positive filter and the sampling weights."""

from __future__ import annotations

from pydantic import Field

from schemas.base import Section


class AdvantageConfig(Section):
    """Settings of the DuckDB advantage computation."""

    threads: int = Field(2, gt=0, description="DuckDB threads.")
    memory_limit: str = Field("2GB", description="DuckDB memory limit; larger inputs spill to disk.")
