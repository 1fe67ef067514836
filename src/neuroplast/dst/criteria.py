"""Drop and grow criteria: scores in, flat indices out.

Every selection breaks ties by a seeded random permutation (then a stable sort), never by the
implementation-defined order of `topk`/`argsort` on equal values.

drop(weight, mask, fraction, generator) -> indices of live weights to remove
grow(signals, candidates, n, generator) -> indices of empty positions to add
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class LayerSignals:
    """What the engine gathered for one layer, handed to the grow criterion."""

    weight: torch.Tensor
    dense_grad: torch.Tensor | None = None


def select_extreme(
    scores: torch.Tensor, candidates: torch.Tensor, k: int, generator: torch.Generator, largest: bool
) -> torch.Tensor:
    """Flat indices of the `k` candidates with the largest (or smallest) scores."""
    index = candidates.reshape(-1).nonzero().squeeze(1)
    k = min(k, index.numel())
    if k <= 0:
        return index[:0]
    shuffle = torch.randperm(index.numel(), generator=generator).to(index.device)
    index = index[shuffle]
    order = torch.argsort(scores.reshape(-1)[index], descending=largest, stable=True)
    return index[order[:k]]


def first_occurrences(values: torch.Tensor) -> torch.Tensor:
    """Positions of the first occurrence of each distinct value, in their original order."""
    order = torch.argsort(values, stable=True)
    ranked = values[order]
    first = torch.ones_like(ranked, dtype=torch.bool)
    first[1:] = ranked[1:] != ranked[:-1]
    return order[first].sort().values


def select_random(candidates: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """`k` candidates drawn uniformly without replacement.

    Rejection sampling over flat indices: draw positions uniformly from the whole layer, keep
    candidates not drawn before. It never lists the empty positions (a truly sparse layer cannot
    afford to) and consumes the generator the same way on every backend.
    """
    flat = candidates.reshape(-1)
    size, available = flat.numel(), int(flat.sum())
    k = min(k, available)
    chosen = torch.empty(0, dtype=torch.long, device=flat.device)
    while chosen.numel() < k:
        need = k - chosen.numel()
        draws = math.ceil(need * size / (available - chosen.numel()) * 1.25) + 16
        drawn = torch.randint(size, (draws,), generator=generator).to(flat.device)
        drawn = drawn[flat[drawn]]
        drawn = drawn[first_occurrences(drawn)]
        drawn = drawn[~torch.isin(drawn, chosen)]
        chosen = torch.cat([chosen, drawn[:need]])
    return chosen


# -- drop --------------------------------------------------------------------------------------
def drop_by_magnitude(weight: torch.Tensor, mask: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """RigL: the floor(fraction * nnz) live weights with the smallest |w|."""
    n = math.floor(fraction * int(mask.sum()))
    return select_extreme(weight.abs(), mask, n, generator, largest=False)


def drop_by_signed_magnitude(
    weight: torch.Tensor, mask: torch.Tensor, fraction: float, generator: torch.Generator
) -> torch.Tensor:
    """SET: per sign, the `fraction` of live weights closest to zero: floor(zeta n_pos) smallest
    positives and floor(zeta n_neg) largest (closest-to-zero) negatives. Live exact zeros count
    as positive."""
    positive = mask & (weight >= 0)
    negative = mask & (weight < 0)
    n_pos = math.floor(fraction * int(positive.sum()))
    n_neg = math.floor(fraction * int(negative.sum()))
    return torch.cat(
        [
            select_extreme(weight, positive, n_pos, generator, largest=False),
            select_extreme(weight, negative, n_neg, generator, largest=True),
        ]
    )


# -- grow --------------------------------------------------------------------------------------
def grow_random(signals: LayerSignals, candidates: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """SET: uniformly random empty positions."""
    return select_random(candidates, n, generator)


def grow_by_gradient(signals: LayerSignals, candidates: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """RigL: the empty positions with the largest |dense gradient| of the current mini-batch."""
    if signals.dense_grad is None:
        raise RuntimeError("gradient growth needs the dense gradient of the update step; none was captured")
    return select_extreme(signals.dense_grad.abs(), candidates, n, generator, largest=True)


DropFn = Callable[[torch.Tensor, torch.Tensor, float, torch.Generator], torch.Tensor]
GrowFn = Callable[[LayerSignals, torch.Tensor, int, torch.Generator], torch.Tensor]

DROP_CRITERIA: dict[str, DropFn] = {
    "magnitude": drop_by_magnitude,
    "signed-magnitude": drop_by_signed_magnitude,
}
GROW_CRITERIA: dict[str, GrowFn] = {
    "random": grow_random,
    "gradient": grow_by_gradient,
}
# Which signals a grow criterion needs the engine to gather.
GROW_NEEDS: dict[str, set[str]] = {"random": set(), "gradient": {"dense_grad"}}
