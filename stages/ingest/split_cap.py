"""The per-split cap (`data.max_rows_per_split`): a capped split keeps its groups in id order while they fit.

A Group is the unit the cap keeps or cuts: the candidates of one source record (two for a preference pair,
which is never cut in half), with the split, ids and meta decided for them. Groups are ordered by
`order_key` (the pair_id, else the row id), so the kept rows do not depend on the order of the source.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from stages.ingest.formats import Candidate, Problem
from stages.ingest.sources import SourceRecord


@dataclass
class Group:
    """The candidates of one source record (two for a preference pair), with what is decided about them."""

    record: SourceRecord
    candidates: list[Candidate]
    split: str | None = None
    meta: str = "{}"
    ids: list[bytes] = field(default_factory=list)
    pair_id: bytes | None = None

    @property
    def valid(self) -> bool:
        return all(c.problem is None for c in self.candidates)

    @property
    def order_key(self) -> int:
        """Position in 'id order' for the per-split cap: a pair is kept or cut as a whole, by its pair_id."""
        return int.from_bytes(self.pair_id or self.ids[0], "big")

    def reject_all(self, problem: Problem) -> None:
        for candidate in self.candidates:
            candidate.problem = candidate.problem or problem


class SplitCap:
    """Keeps the groups that form the longest prefix, in key order, whose rows add up to at most `limit`.

    Streaming with memory O(limit): a max-heap of kept groups; whenever the kept rows exceed the limit
    the largest key is cut, and every key at or above the smallest key ever cut is cut on arrival.
    Whatever the arrival order, the kept set is the same.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.heap: list[tuple[int, int, Group]] = []
        self.rows = 0
        self.cutoff: int | None = None
        self._count = itertools.count()

    def offer(self, group: Group) -> list[Group]:
        """Add a group; return the groups cut by this offer (possibly the new one)."""
        key = group.order_key
        if self.cutoff is not None and key >= self.cutoff:
            return [group]
        heapq.heappush(self.heap, (-key, next(self._count), group))
        self.rows += len(group.candidates)
        cut = []
        while self.rows > self.limit:
            negative_key, _, largest = heapq.heappop(self.heap)
            self.rows -= len(largest.candidates)
            self.cutoff = -negative_key if self.cutoff is None else min(self.cutoff, -negative_key)
            cut.append(largest)
        return cut

    def kept(self) -> list[Group]:
        return [group for _, _, group in sorted(self.heap, key=lambda entry: -entry[0])]
