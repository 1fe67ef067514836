"""What a drop or grow criterion is: a small dataclass that holds its own knobs, names the signals
it needs, and maps tensors to indices. The registries here are where a criterion is found by
name (by presets, `RunConfig`'s `[dst]` section and the generated command-line flags).

A knob is a dataclass field made with `knob(default, help)`: its help text becomes the help of
its command-line flag (`--name-with-dashes`) and its name a key of the `[dst]` config section.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from neuroplast.sparse.layer import Candidates, SparseLayer

ScoreChunks = Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]


def knob(default, help: str):
    """A part's setting: a dataclass field with a default and the help text of its flag."""
    return field(default=default, metadata={"help": help})


@dataclass
class LayerSignals:
    """What the engine gathered for one layer, handed to the drop and grow criteria.

    Every `*_chunks` field yields (flat indices, scores) a bounded block at a time, so the same
    criterion runs on a layer of any size; chunking never changes a criterion's result.
    """

    # (flat indices, dense gradient there) in chunks, for the mini-batch of the update step
    dense_grad_chunks: ScoreChunks | None = None
    # the scores of the signal the grow criterion names in `scores_from`: |momentum| (SNFS),
    # |cosine similarity| of neuron activations (CTRE), importance(src) x importance(dst) (WAST, DAST)
    score_chunks: ScoreChunks | None = None
    live_grad: torch.Tensor | None = None  # gradient of the last mini-batch at the live weights (MEST)
    src_importance: torch.Tensor | None = None  # per live weight: importance of its input neuron (WAST drop)
    dropped: torch.Tensor | None = None  # flat indices just dropped (CTRE-sim)
    progress: float = 0.0  # how far through the schedule's updates this one is, in [0, 1]
    # for the drop: the live weights' flat indices, the layer's weight shape, and the flat
    # indices the previous update grew (DAST2's protection of new connections)
    flat: torch.Tensor | None = None
    shape: tuple[int, ...] | None = None
    last_grown: torch.Tensor | None = None
    # for the growth: flat indices -> exact gradient of the last training batch there, computed
    # for those positions only (DAST2's candidates; gathered with the "activity" signal)
    grad_at: Callable[[torch.Tensor], torch.Tensor] | None = None


class Part:
    """What drop and grow criteria share.

    `needs` maps the signals the engine gathers for this part to their settings: "dense_grad"
    (the dense gradient of an update step), "live_grad" (the last gradient at live weights),
    "momentum" ({"beta"}), "activations" ({"samples"}), "importance" ({"lam", "decay"}),
    "activity" ({"beta"}); an empty
    dict of settings takes the signal's defaults (or another part's settings for it).
    A part with state over training (e.g. a switch after a plateau) keeps it in fields made with
    `field(init=False)` and reports it through `state_dict` / `load_state_dict`; the engine works
    on its own copy of the parts.
    """

    name: ClassVar[str]

    @property
    def needs(self) -> dict[str, dict]:
        return {}

    def observe_epoch(self, metric: float) -> None:
        """How training went this epoch (higher is better; training accuracy, never a test score)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""


class DropCriterion(Part):
    """Which live connections go: `select(values, fraction, generator, signals)` returns positions
    in `values` (a layer's live weights, in the order of their flat indices)."""

    def select(
        self, values: torch.Tensor, fraction: float, generator: torch.Generator, signals: LayerSignals
    ) -> torch.Tensor:
        """The positions in `values` to drop, about `fraction` of them; ties broken with `generator`."""
        raise NotImplementedError


class GrowCriterion(Part):
    """Which empty positions come in: `select(signals, candidates, n, generator)` returns flat
    indices. `candidates` answers "is this flat position empty?" without listing the empty
    positions, so the same criterion runs on a masked layer and on a truly sparse one.

    `scores_from` names the signal whose per-position scores the engine hands in as
    `signals.score_chunks`.
    """

    scores_from: ClassVar[str | None] = None

    def select(self, signals: LayerSignals, candidates: Candidates, n: int, generator: torch.Generator) -> torch.Tensor:
        """`n` distinct empty flat positions to grow; ties and random draws come from `generator`."""
        raise NotImplementedError

    def counts(
        self,
        dropped: dict[str, torch.Tensor],
        live: dict[str, torch.Tensor],
        layers: dict[str, SparseLayer],
        gathered: dict,
    ) -> dict[str, int]:
        """How many connections to grow per layer: as many as it dropped. `live` holds each
        layer's live flat indices before the drop, `gathered` the engine's signals by name."""
        return {name: d.numel() for name, d in dropped.items()}

    def reconcile(self, dropped: torch.Tensor, grown: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (dropped, grown) to rewire when growth picked just-dropped positions: by default
        both stand, so such a connection comes back new (value 0, fresh optimizer state)."""
        return dropped, grown

    def record(self, progress: float) -> dict:
        """Fields of this update's `UpdateRecord` the criterion sets (e.g. DAST's temperature)."""
        return {}


DROP_CRITERIA: dict[str, type[DropCriterion]] = {}
GROW_CRITERIA: dict[str, type[GrowCriterion]] = {}


def _register_in(registry: dict, name: str) -> Callable[[type], type]:
    def register(cls: type) -> type:
        cls.name = name
        registry[name] = cls
        return cls

    return register


def register_drop(name: str) -> Callable[[type[DropCriterion]], type[DropCriterion]]:
    """Class decorator: make a drop criterion known by `name` (presets, config, flags)."""
    return _register_in(DROP_CRITERIA, name)


def register_grow(name: str) -> Callable[[type[GrowCriterion]], type[GrowCriterion]]:
    """Class decorator: make a grow criterion known by `name` (presets, config, flags)."""
    return _register_in(GROW_CRITERIA, name)


def drop_count(fraction: float, n: int, rounding: str = "floor") -> int:
    """How many of `n` live weights a drop `fraction` removes: floor (most methods) or ceil (SNFS)."""
    return min(n, math.ceil(fraction * n) if rounding == "ceil" else math.floor(fraction * n))
