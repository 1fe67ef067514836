"""Drop and grow criteria: scores in, indices out. Backend-independent.

drop(values, fraction, generator) -> positions in `values` (a layer's live weights, in the
    order of their flat indices) to remove.
grow(signals, candidates, n, generator) -> flat indices of empty positions to add. `candidates`
    answers "is this flat position empty?" without listing the empty positions, so the same
    criterion runs on a masked layer and on a truly sparse one.

Ties are broken at random from the seeded generator, never by the implementation-defined
order of `topk`/`argsort` on equal values: by a random permutation when all scores are in hand
(drop), by per-position hash keys when scores arrive in chunks (gradient growth).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from neuroplast.sparse.layer import Candidates


@dataclass
class LayerSignals:
    """What the engine gathered for one layer, handed to the grow criterion."""

    # (flat indices, dense gradient there) in chunks, for the mini-batch of the update step
    dense_grad_chunks: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]] | None = None


def select_extreme(scores: torch.Tensor, k: int, generator: torch.Generator, largest: bool) -> torch.Tensor:
    """Positions of the `k` largest (or smallest) scores; ties broken by a random permutation."""
    k = min(k, scores.numel())
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    shuffle = torch.randperm(scores.numel(), generator=generator).to(scores.device)
    order = torch.argsort(scores[shuffle], descending=largest, stable=True)
    return shuffle[order[:k]]


_P = 2**31 - 1  # a prime: keys are computed modulo P, so int64 products never overflow


def tie_keys(flat: torch.Tensor, salt: int) -> torch.Tensor:
    """A pseudo-random 62-bit key per flat position (two multiplicative hashes mod P)."""
    low, high = flat % _P, flat // _P
    a = (low * 1_103_515_245 + high * 12_345 + salt % _P) % _P
    b = (low * 48_271 + high * 69_621 + (salt // _P) % _P) % _P
    a = (a * 16_807 + b) % _P
    return a * 2**31 + b


def select_top_keyed(scores: torch.Tensor, keys: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the `k` largest scores, ties broken by the smaller key."""
    by_key = torch.argsort(keys)
    order = torch.argsort(scores[by_key], descending=True, stable=True)
    return by_key[order[:k]]


def select_random(candidates: Candidates, k: int, generator: torch.Generator) -> torch.Tensor:
    """`k` candidates drawn uniformly without replacement.

    Rejection sampling over flat indices: draw positions uniformly from the whole layer, keep
    candidates not drawn before. It never lists the empty positions (a truly sparse layer cannot
    afford to) and consumes the generator the same way on every backend.
    """
    k = min(k, candidates.count)
    chosen = torch.empty(0, dtype=torch.long)
    while chosen.numel() < k:
        need = k - chosen.numel()
        draws = math.ceil(need * candidates.size / (candidates.count - chosen.numel()) * 1.25) + 16
        drawn = torch.randint(candidates.size, (draws,), generator=generator)
        drawn = drawn[candidates.contains(drawn).cpu()]
        drawn = drawn[first_occurrences(drawn)]
        drawn = drawn[~torch.isin(drawn, chosen)]
        chosen = torch.cat([chosen, drawn[:need]])
    return chosen


def first_occurrences(values: torch.Tensor) -> torch.Tensor:
    """Positions of the first occurrence of each distinct value, in their original order."""
    order = torch.argsort(values, stable=True)
    ranked = values[order]
    first = torch.ones_like(ranked, dtype=torch.bool)
    first[1:] = ranked[1:] != ranked[:-1]
    return order[first].sort().values


# -- drop --------------------------------------------------------------------------------------
def drop_by_magnitude(values: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """RigL: the floor(fraction * nnz) live weights with the smallest |w|."""
    return select_extreme(values.abs(), math.floor(fraction * values.numel()), generator, largest=False)


def drop_by_signed_magnitude(values: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """SET: per sign, the `fraction` of live weights closest to zero: floor(zeta n_pos) smallest
    positives and floor(zeta n_neg) largest (closest-to-zero) negatives. Live exact zeros count
    as positive."""
    positive = (values >= 0).nonzero().squeeze(1)
    negative = (values < 0).nonzero().squeeze(1)
    n_pos = math.floor(fraction * positive.numel())
    n_neg = math.floor(fraction * negative.numel())
    return torch.cat(
        [
            positive[select_extreme(values[positive], n_pos, generator, largest=False)],
            negative[select_extreme(values[negative], n_neg, generator, largest=True)],
        ]
    )


# -- grow --------------------------------------------------------------------------------------
def grow_random(signals: LayerSignals, candidates: Candidates, n: int, generator: torch.Generator) -> torch.Tensor:
    """SET: uniformly random empty positions."""
    return select_random(candidates, n, generator)


def grow_by_gradient(signals: LayerSignals, candidates: Candidates, n: int, generator: torch.Generator) -> torch.Tensor:
    """RigL: the empty positions with the largest |dense gradient| of the current mini-batch.

    The gradient arrives in chunks (a truly sparse layer computes it a block of rows at a time);
    only the best n candidates are kept between chunks, so memory stays bounded.
    """
    if signals.dense_grad_chunks is None:
        raise RuntimeError("gradient growth needs the dense gradient of the update step; none was captured")
    salt = int(torch.randint(2**62, (1,), generator=generator))
    best_flat = best_score = None
    for flat, grad in signals.dense_grad_chunks():
        keep = candidates.contains(flat)
        flat, score = flat[keep], grad[keep].abs()
        if best_flat is not None:
            if best_flat.numel() >= n:  # only scores reaching the current n-th best can enter
                reach = score >= best_score.min()
                flat, score = flat[reach], score[reach]
            flat, score = torch.cat([best_flat, flat]), torch.cat([best_score, score])
        top = select_top_keyed(score, tie_keys(flat, salt), n)
        best_flat, best_score = flat[top], score[top]
    return best_flat if best_flat is not None else torch.empty(0, dtype=torch.long)


DropFn = Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]
GrowFn = Callable[[LayerSignals, Candidates, int, torch.Generator], torch.Tensor]

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
