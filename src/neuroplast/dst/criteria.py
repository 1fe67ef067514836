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
from dataclasses import dataclass, field

import torch

from neuroplast.sparse.layer import Candidates

ScoreChunks = Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]


@dataclass
class LayerSignals:
    """What the engine gathered for one layer, handed to the drop and grow criteria.

    Every `*_chunks` field yields (flat indices, scores) a bounded block at a time, so the same
    criterion runs on a layer of any size; chunking never changes a criterion's result.
    """

    # (flat indices, dense gradient there) in chunks, for the mini-batch of the update step
    dense_grad_chunks: ScoreChunks | None = None
    # |momentum| of the dense gradient (SNFS), |cosine similarity| of neuron activations (CTRE),
    # importance(src) x importance(dst) (WAST, DAST): the grow criterion's non-negative scores
    score_chunks: ScoreChunks | None = None
    live_grad: torch.Tensor | None = None  # gradient of the last mini-batch at those weights (MEST)
    src_importance: torch.Tensor | None = None  # per weight: importance of its input neuron (WAST drop)
    dropped: torch.Tensor | None = None  # flat indices just dropped (CTRE-sim)
    params: dict = field(default_factory=dict)  # the algorithm's knobs at this update (lam, tau, ...)


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


_M64 = 2**64


def _signed(value: int) -> int:
    value %= _M64
    return value - _M64 if value >= 2**63 else value


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _splitmix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (multiplication wraps modulo 2^64)."""
    z = z + _signed(0x9E3779B97F4A7C15)
    z = (z ^ _shr(z, 30)) * _signed(0xBF58476D1CE4E5B9)
    z = (z ^ _shr(z, 27)) * _signed(0x94D049BB133111EB)
    return z ^ _shr(z, 31)


def hash_uniform(flat: torch.Tensor, salt: int) -> torch.Tensor:
    """An independent-looking uniform number in (0, 1) per flat position (SplitMix64 of the
    position and the salt), float64: the same whichever chunk the position arrives in, so
    chunked sampling equals sampling in one piece."""
    mixed_salt = int(_splitmix64(torch.tensor([_signed(salt)], dtype=torch.long))[0])
    bits = _splitmix64(flat.long() ^ mixed_salt)
    return (_shr(bits, 11).double() + 0.5) / 2.0**53


def select_top_keyed(scores: torch.Tensor, flat: torch.Tensor, salt: int, k: int) -> torch.Tensor:
    """Positions of the `k` largest scores, ties at the k-th value broken by the smaller
    `tie_keys(flat, salt)`. O(n): a top-k for the threshold, keys only for the tied scores."""
    k = min(k, scores.numel())
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    kth = torch.topk(scores, k, sorted=False).values.min()
    above = (scores > kth).nonzero().squeeze(1)
    tied = (scores == kth).nonzero().squeeze(1)
    need = k - above.numel()
    if tied.numel() > need:
        tied = tied[torch.argsort(tie_keys(flat[tied], salt))[:need]]
    return torch.cat([above, tied])


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
def _count(fraction: float, n: int, signals: LayerSignals | None) -> int:
    rounding = signals.params.get("rounding", "floor") if signals is not None else "floor"
    return min(n, math.ceil(fraction * n) if rounding == "ceil" else math.floor(fraction * n))


def drop_by_magnitude(
    values: torch.Tensor, fraction: float, generator: torch.Generator, signals: LayerSignals | None = None
) -> torch.Tensor:
    """RigL, SNFS: the floor (SNFS: ceil) of fraction * nnz live weights with the smallest |w|."""
    return select_extreme(values.abs(), _count(fraction, values.numel(), signals), generator, largest=False)


def drop_by_signed_magnitude(
    values: torch.Tensor, fraction: float, generator: torch.Generator, signals: LayerSignals | None = None
) -> torch.Tensor:
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


def drop_by_magnitude_and_gradient(
    values: torch.Tensor, fraction: float, generator: torch.Generator, signals: LayerSignals | None = None
) -> torch.Tensor:
    """MEST: the floor(fraction * nnz) live weights with the smallest |w| + lam |grad w|
    (gradient of the last mini-batch; lam = 0 is magnitude only, MEST's code default)."""
    lam = signals.params.get("lam", 0.0) if signals is not None else 0.0
    score = values.abs()
    if lam and signals is not None and signals.live_grad is not None:
        score = score + lam * signals.live_grad.abs().to(score.device)
    return select_extreme(score, _count(fraction, values.numel(), signals), generator, largest=False)


def drop_by_noisy_magnitude(
    values: torch.Tensor, fraction: float, generator: torch.Generator, signals: LayerSignals | None = None
) -> torch.Tensor:
    """CTRE: the floor(fraction * nnz) smallest |w| + N(0, noise^2) (noise = 1e-5 by default)."""
    noise = signals.params.get("drop_noise", 1e-5) if signals is not None else 1e-5
    score = values.abs() + noise * torch.randn(values.numel(), generator=generator).to(values.device)
    return select_extreme(score, _count(fraction, values.numel(), signals), generator, largest=False)


def drop_by_attention(
    values: torch.Tensor, fraction: float, generator: torch.Generator, signals: LayerSignals | None = None
) -> torch.Tensor:
    """WAST: SET's sign split on z = w * importance(input neuron of w): per sign, the `fraction`
    of live weights with the smallest |w| * importance (importance > 0)."""
    if signals is None or signals.src_importance is None:
        raise RuntimeError("attention drop needs the importance of every live weight's input neuron")
    return drop_by_signed_magnitude(values * signals.src_importance.to(values.device), fraction, generator)


# -- grow --------------------------------------------------------------------------------------
def grow_random(signals: LayerSignals, candidates: Candidates, n: int, generator: torch.Generator) -> torch.Tensor:
    """SET: uniformly random empty positions."""
    return select_random(candidates, n, generator)


def top_scores(chunks: ScoreChunks, candidates: Candidates, n: int, generator: torch.Generator) -> torch.Tensor:
    """The n empty positions with the largest scores. The scores arrive in chunks (a truly
    sparse layer computes them a block of rows at a time); only the best n candidates are kept
    between chunks, so memory stays bounded. Ties are broken by per-position hash keys."""
    salt = int(torch.randint(2**62, (1,), generator=generator))
    best_flat = best_score = None
    for flat, score in chunks():
        keep = candidates.contains(flat)
        flat, score = flat[keep], score[keep]
        if best_flat is not None:
            if best_flat.numel() >= n:  # only scores reaching the current n-th best can enter
                reach = score >= best_score.min()
                flat, score = flat[reach], score[reach]
            flat, score = torch.cat([best_flat, flat]), torch.cat([best_score, score])
        top = select_top_keyed(score, flat, salt, n)
        best_flat, best_score = flat[top], score[top]
    return best_flat if best_flat is not None else torch.empty(0, dtype=torch.long)


def sampled_scores(
    chunks: ScoreChunks, candidates: Candidates, n: int, generator: torch.Generator, tau: float
) -> torch.Tensor:
    """n empty positions drawn without replacement with probability proportional to
    score^(1/tau) (Gumbel-top-k: key = log(score) / tau + Gumbel noise; the noise is a hash of
    the position, so chunking does not change the draw). tau -> 0 is the deterministic top-n;
    large tau approaches uniform sampling among positions of positive score."""
    if tau <= 0:
        return top_scores(chunks, candidates, n, generator)
    salt = int(torch.randint(2**62, (1,), generator=generator))

    def keyed():
        for flat, score in chunks():
            gumbel = -torch.log(-torch.log(hash_uniform(flat, salt)))
            yield flat, torch.log(score.double().clamp_min(1e-300)) / tau + gumbel.to(score.device)

    return top_scores(keyed, candidates, n, generator)


def _needs(signals: LayerSignals, name: str, what: str) -> ScoreChunks:
    chunks = getattr(signals, name)
    if chunks is None:
        raise RuntimeError(f"{what} growth needs signals the engine did not gather for this update")
    return chunks


def _abs(chunks: ScoreChunks) -> ScoreChunks:
    return lambda: ((flat, values.abs()) for flat, values in chunks())


def grow_by_gradient(signals: LayerSignals, candidates: Candidates, n: int, generator: torch.Generator) -> torch.Tensor:
    """RigL: the empty positions with the largest |dense gradient| of the current mini-batch."""
    if signals.dense_grad_chunks is None:
        raise RuntimeError("gradient growth needs the dense gradient of the update step; none was captured")
    return top_scores(_abs(signals.dense_grad_chunks), candidates, n, generator)


def grow_by_score(signals: LayerSignals, candidates: Candidates, n: int, generator: torch.Generator) -> torch.Tensor:
    """SNFS (|momentum|), CTRE (|cosine similarity|), WAST (importance(src) x importance(dst)):
    the empty positions with the largest score."""
    return top_scores(_needs(signals, "score_chunks", "score"), candidates, n, generator)


def excluding(candidates: Candidates, taken: torch.Tensor) -> Candidates:
    """The candidates without the flat indices `taken`."""
    taken = taken.sort().values
    inside = int(candidates.contains(taken).sum()) if taken.numel() else 0

    def contains(flat: torch.Tensor) -> torch.Tensor:
        result = candidates.contains(flat)
        if taken.numel():
            position = torch.searchsorted(taken.to(flat.device), flat).clamp_max(taken.numel() - 1)
            result = result & (taken.to(flat.device)[position] != flat).to(result.device)
        return result

    return Candidates(candidates.size, candidates.count - inside, contains)


def grow_by_score_sim(
    signals: LayerSignals, candidates: Candidates, n: int, generator: torch.Generator
) -> torch.Tensor:
    """CTRE-sim: grow by score, but every just-dropped connection the score picks again is
    replaced by a uniformly random empty one (never a just-dropped one)."""
    grown = grow_by_score(signals, candidates, n, generator)
    if signals.dropped is None or not grown.numel():
        return grown
    again = torch.isin(grown, signals.dropped.to(grown.device))
    kept = grown[~again]
    if bool(again.any()):
        pool = excluding(candidates, torch.cat([grown, signals.dropped.to(grown.device)]))
        kept = torch.cat([kept, select_random(pool, int(again.sum()), generator).to(kept.device)])
    return kept


def grow_sampled(signals: LayerSignals, candidates: Candidates, n: int, generator: torch.Generator) -> torch.Tensor:
    """Randomized attention (DAST): a share `epsilon` of the n connections uniformly at random
    (CTRE's exploration), the rest sampled with probability proportional to score^(1/tau)
    (WAST's attention, made stochastic). epsilon = 1 is SET's random growth; tau -> 0 with
    epsilon = 0 is WAST's deterministic top-n."""
    epsilon, tau = float(signals.params.get("epsilon", 0.0)), float(signals.params.get("tau", 0.0))
    n_random = min(n, round(epsilon * n))
    chosen = select_random(candidates, n_random, generator) if n_random else torch.empty(0, dtype=torch.long)
    if n_random == n:
        return chosen
    rest = excluding(candidates, chosen) if n_random else candidates
    sampled = sampled_scores(_needs(signals, "score_chunks", "sampled"), rest, n - n_random, generator, tau)
    return torch.cat([chosen.to(sampled.device), sampled])


DropFn = Callable[..., torch.Tensor]  # (values, fraction, generator, signals=None) -> positions in values
GrowFn = Callable[[LayerSignals, Candidates, int, torch.Generator], torch.Tensor]

DROP_CRITERIA: dict[str, DropFn] = {
    "magnitude": drop_by_magnitude,
    "signed-magnitude": drop_by_signed_magnitude,
    "magnitude-gradient": drop_by_magnitude_and_gradient,
    "noisy-magnitude": drop_by_noisy_magnitude,
    "attention": drop_by_attention,
}
GROW_CRITERIA: dict[str, GrowFn] = {
    "random": grow_random,
    "gradient": grow_by_gradient,
    "momentum": grow_by_score,
    "similarity": grow_by_score,
    "similarity-sim": grow_by_score_sim,
    "attention": grow_by_score,
    "sampled-attention": grow_sampled,
}
# Which signals a criterion needs the engine to gather.
GROW_NEEDS: dict[str, set[str]] = {
    "random": set(),
    "gradient": {"dense_grad"},
    "momentum": {"momentum"},
    "similarity": {"activations"},
    "similarity-sim": {"activations"},
    "attention": {"importance"},
    "sampled-attention": {"importance"},
}
DROP_NEEDS: dict[str, set[str]] = {
    "magnitude": set(),
    "signed-magnitude": set(),
    "magnitude-gradient": {"live_grad"},
    "noisy-magnitude": set(),
    "attention": {"importance"},
}
