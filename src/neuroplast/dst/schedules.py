"""When the topology changes and by how much."""

from __future__ import annotations

import math
from dataclasses import dataclass

ANNEALS = ("constant", "cosine")


@dataclass(frozen=True)
class Schedule:
    """Update at steps t = every, 2*every, ... while t < end; drop fraction f(t).

    constant: f(t) = fraction (SET's zeta).
    cosine:   f(t) = fraction / 2 * (1 + cos(pi t / end)) (RigL's alpha, T_end = end).
    """

    every: int
    end: int
    fraction: float
    anneal: str = "constant"

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"update interval must be >= 1 step, got {self.every}")
        if self.anneal not in ANNEALS:
            raise ValueError(f"unknown anneal {self.anneal!r}; choose from: {', '.join(ANNEALS)}")

    def is_update_step(self, t: int) -> bool:
        return t > 0 and t % self.every == 0 and t < self.end

    def fraction_at(self, t: int) -> float:
        if self.anneal == "cosine":
            return self.fraction / 2 * (1 + math.cos(math.pi * t / self.end))
        return self.fraction
