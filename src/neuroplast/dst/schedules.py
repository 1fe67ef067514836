"""When the topology changes and by how much: `UpdateSchedule` (the part an algorithm is built
from, with its knobs) and `Schedule` (that part laid over one run's steps)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from neuroplast.dst.parts import knob

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

    growth > 1 front-loads the updates: the k-th interval is every * growth^k steps (rounded),
    so updates come often early in training and rarely later.
    """

    every: int
    end: int
    fraction: float
    anneal: str = "constant"
    fraction_end: float = 0.0
    milestones: tuple[tuple[float, float], ...] = ()
    total: int = 0
    growth: float = 1.0

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"update interval must be >= 1 step, got {self.every}")
        if self.anneal not in ANNEALS:
            raise ValueError(f"unknown anneal {self.anneal!r}; choose from: {', '.join(ANNEALS)}")
        if self.growth < 1.0:
            raise ValueError(f"update interval growth {self.growth!r} must be >= 1")

    @cached_property
    def front_loaded_steps(self) -> frozenset[int]:
        """The update steps when intervals grow (growth > 1): every, then each interval `growth`
        times the previous one (at least one step), while t < end."""
        steps, t, interval = set(), self.every, float(self.every)
        while t < self.end:
            steps.add(t)
            interval *= self.growth
            t += max(1, round(interval))
        return frozenset(steps)

    def is_update_step(self, t: int) -> bool:
        if self.growth != 1.0:
            return t in self.front_loaded_steps
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


@dataclass(frozen=True)
class UpdateSchedule:
    """When an algorithm rewires and what fraction of the live weights it drops each time."""

    update_every: int | str = knob(
        "epoch", "optimizer steps between topology updates (a method may update once per epoch)"
    )
    end_fraction: float = knob(1.0, "stop topology updates after this fraction of training (RigL T_end)")
    drop_fraction: float = knob(0.3, "drop fraction (SET zeta, RigL alpha)")
    drop_anneal: str = knob("constant", "drop fraction over training: constant, cosine or step")
    drop_fraction_end: float = knob(0.0, "with --drop-anneal cosine: the drop fraction at the end of the updates")
    update_growth: float = knob(
        1.0, "front-loaded updates: each interval between updates is this factor times the previous (1 = even)"
    )
    # step anneal: (fraction of training, multiplier) milestones (MEST's elastic mutation)
    milestones: tuple[tuple[float, float], ...] = ()

    def __post_init__(self):
        if self.drop_anneal not in ANNEALS:
            raise ValueError(f"unknown drop_anneal {self.drop_anneal!r}; choose from: {', '.join(ANNEALS)}")
        for name in ("drop_fraction", "drop_fraction_end", "end_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} {getattr(self, name)!r} must be in [0, 1]")
        if self.update_growth < 1.0:
            raise ValueError(f"update_growth {self.update_growth!r} must be >= 1")
        if self.update_every != "epoch" and not (isinstance(self.update_every, int) and self.update_every >= 1):
            raise ValueError(f"update_every {self.update_every!r} must be 'epoch' or a positive number of steps")

    def at(self, total_steps: int, steps_per_epoch: int) -> Schedule:
        """This schedule over a run of `total_steps` optimizer steps, `steps_per_epoch` per epoch."""
        every = steps_per_epoch if self.update_every == "epoch" else int(self.update_every)
        end = math.floor(self.end_fraction * total_steps) if self.end_fraction < 1 else total_steps
        return Schedule(
            every=every,
            end=end,
            fraction=self.drop_fraction,
            anneal=self.drop_anneal,
            fraction_end=self.drop_fraction_end,
            milestones=self.milestones,
            total=total_steps,
            growth=self.update_growth,
        )
