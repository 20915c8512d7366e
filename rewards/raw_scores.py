"""Raw reward scores: every component's per-sample result before any normaliser touched it.

RewardSet.araw(...) returns one (any subset of a batch, in any order, concurrently: it reads no state);
RawScores.concat + take put the pieces back in prompt order, and RewardSet.combine(raw) is the one step
that updates the running normalisers and failure counts, so the result does not depend on which piece
was scored first.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class RawScores:
    n: int                                                   # samples
    scores: dict[str, list[float | None]]                    # per component, per sample; None = out of scope
    failed: dict[str, set[int]] = field(default_factory=dict)      # sample indices given the fallback
    timed_out: dict[str, set[int]] = field(default_factory=dict)   # the failures that timed out

    def take(self, order: Sequence[int]) -> RawScores:
        """The samples `order` (indices into this), in that order."""
        where = {i: j for j, i in enumerate(order)}
        return RawScores(len(order), {k: [v[i] for i in order] for k, v in self.scores.items()},
                         {k: {where[i] for i in s if i in where} for k, s in self.failed.items()},
                         {k: {where[i] for i in s if i in where} for k, s in self.timed_out.items()})

    @staticmethod
    def concat(parts: Sequence[RawScores]) -> RawScores:
        """The parts one after the other (sample indices shifted)."""
        if not parts:
            raise ValueError("RawScores.concat of no parts")
        labels = list(parts[0].scores)
        if any(list(p.scores) != labels for p in parts):
            raise ValueError("RawScores.concat: the parts come from different reward sets")
        out = RawScores(0, {k: [] for k in labels}, {k: set() for k in labels}, {k: set() for k in labels})
        for p in parts:
            for k in labels:
                out.scores[k] += p.scores[k]
                out.failed[k] |= {out.n + i for i in p.failed.get(k, ())}
                out.timed_out[k] |= {out.n + i for i in p.timed_out.get(k, ())}
            out.n += p.n
        return out
