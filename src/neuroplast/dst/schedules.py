"""When the topology changes and by how much."""

from __future__ import annotations

import math
from dataclasses import dataclass

ANNEALS = ("constant", "cosine", "step")


def cosine(start: float, end: float, progress: float) -> float:
    """start at progress 0, end at progress 1, along half a cosine."""
    progress = min(max(progress, 0.0), 1.0)
    return end + (start - end) / 2 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    """Update at steps t = every, 2*every, ... while t < end; drop fraction f(t).

    constant: f(t) = fraction (SET's zeta).
    cosine:   f(t) = fraction_end + (fraction - fraction_end) / 2 * (1 + cos(pi t / end))
              (RigL's alpha with T_end = end and fraction_end 0; SNFS's prune rate 0.5 -> 0.005).
    step:     f(t) = fraction times every multiplier whose milestone (a fraction of all `total`
              steps) t has reached (MEST's elastic mutation: 20% -> 10% of the live weights).
    """

    every: int
    end: int
    fraction: float
    anneal: str = "constant"
    fraction_end: float = 0.0
    milestones: tuple[tuple[float, float], ...] = ()
    total: int = 0

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"update interval must be >= 1 step, got {self.every}")
        if self.anneal not in ANNEALS:
            raise ValueError(f"unknown anneal {self.anneal!r}; choose from: {', '.join(ANNEALS)}")

    def is_update_step(self, t: int) -> bool:
        return t > 0 and t % self.every == 0 and t < self.end

    def progress(self, t: int) -> float:
        """How far through the updating part of training step t is, in [0, 1]."""
        return min(1.0, t / self.end) if self.end > 0 else 1.0

    def fraction_at(self, t: int) -> float:
        if self.anneal == "cosine":
            return cosine(self.fraction, self.fraction_end, self.progress(t))
        if self.anneal == "step":
            f = self.fraction
            for at, multiplier in self.milestones:
                if t >= at * (self.total or self.end):
                    f *= multiplier
            return f
        return self.fraction
