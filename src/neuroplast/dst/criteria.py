"""The drop and grow criteria of the presets: each a small dataclass with its own knobs (see
`dst/parts.py`), over a function of tensors (scores in, indices out). Backend-independent.

Ties are broken at random from the seeded generator, never by the implementation-defined
order of `topk`/`argsort` on equal values: by a random permutation when all scores are in hand
(drop), by per-position hash keys when scores arrive in chunks (gradient growth).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from neuroplast.dst.parts import (
    DropCriterion,
    GrowCriterion,
    LayerSignals,
    ScoreChunks,
    drop_count,
    knob,
    register_drop,
    register_grow,
)
from neuroplast.dst.schedules import cosine
from neuroplast.dst.signals import weight_neurons
from neuroplast.sparse.layer import Candidates


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


# -- drop: functions of tensors ----------------------------------------------------------------
def drop_by_magnitude(
    values: torch.Tensor, fraction: float, generator: torch.Generator, rounding: str = "floor"
) -> torch.Tensor:
    """RigL, SNFS: the floor (SNFS: ceil) of fraction * nnz live weights with the smallest |w|."""
    return select_extreme(values.abs(), drop_count(fraction, values.numel(), rounding), generator, largest=False)


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


def drop_by_magnitude_and_gradient(
    values: torch.Tensor,
    fraction: float,
    generator: torch.Generator,
    live_grad: torch.Tensor | None,
    lam: float,
    rounding: str = "floor",
) -> torch.Tensor:
    """MEST: the floor(fraction * nnz) live weights with the smallest |w| + lam |grad w|
    (gradient of the last mini-batch; lam = 0 is magnitude only, MEST's code default)."""
    score = values.abs()
    if lam and live_grad is not None:
        score = score + lam * live_grad.abs().to(score.device)
    return select_extreme(score, drop_count(fraction, values.numel(), rounding), generator, largest=False)


def drop_by_noisy_magnitude(
    values: torch.Tensor, fraction: float, generator: torch.Generator, noise: float, rounding: str = "floor"
) -> torch.Tensor:
    """CTRE: the floor(fraction * nnz) smallest |w| + N(0, noise^2)."""
    score = values.abs() + noise * torch.randn(values.numel(), generator=generator).to(values.device)
    return select_extreme(score, drop_count(fraction, values.numel(), rounding), generator, largest=False)


def drop_by_attention(
    values: torch.Tensor, fraction: float, generator: torch.Generator, src_importance: torch.Tensor
) -> torch.Tensor:
    """WAST: SET's sign split on z = w * importance(input neuron of w): per sign, the `fraction`
    of live weights with the smallest |w| * importance (importance > 0)."""
    return drop_by_signed_magnitude(values * src_importance.to(values.device), fraction, generator)


def drop_stochastic_normalised(
    values: torch.Tensor,
    fraction: float,
    generator: torch.Generator,
    flat: torch.Tensor,
    shape: tuple[int, ...],
    tau: float,
    normalised: bool = True,
    protected: torch.Tensor | None = None,
) -> torch.Tensor:
    """DAST2: floor(fraction * nnz) live weights drawn without replacement with probability
    proportional to u^(-1/tau), u = |w| / mean |w| of the live weights into the same output
    neuron (plain |w| without `normalised`), so every neuron loses its relatively weakest
    weights rather than the layer its smallest ones. tau = 0 is the deterministic smallest u.
    Positions of `protected` (a bool per live weight, e.g. grown at the previous update) are
    never drawn; the count is capped at the unprotected weights."""
    count = drop_count(fraction, values.numel())
    score = values.abs().double()
    if normalised and values.numel():
        out, _ = weight_neurons(flat.to(values.device), shape)
        total = torch.zeros(shape[0], dtype=torch.float64, device=values.device).index_add_(0, out, score)
        live = torch.zeros(shape[0], dtype=torch.float64, device=values.device).index_add_(
            0, out, torch.ones_like(score)
        )
        score = score / (total / live.clamp_min(1))[out].clamp_min(1e-30)
    if tau > 0:  # Gumbel-top-k on -log(u) / tau: a draw with p ~ u^(-1/tau)
        uniform = torch.rand(values.numel(), generator=generator, dtype=torch.float64).clamp_min(1e-300)
        gumbel = -torch.log(-torch.log(uniform)).to(values.device)
        score = torch.log(score.clamp_min(1e-300)) / tau - gumbel  # smallest keys are drawn
    if protected is not None and bool(protected.any()):
        score = torch.where(protected.to(values.device), torch.full_like(score, math.inf), score)
        count = min(count, int((~protected).sum()))
    return select_extreme(score, count, generator, largest=False)


# -- grow: functions of tensors ----------------------------------------------------------------
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


def abs_chunks(chunks: ScoreChunks) -> ScoreChunks:
    return lambda: ((flat, values.abs()) for flat, values in chunks())


def grow_by_score_sim(
    score_chunks: ScoreChunks, candidates: Candidates, n: int, generator: torch.Generator, dropped: torch.Tensor | None
) -> torch.Tensor:
    """CTRE-sim: grow by score, but every just-dropped connection the score picks again is
    replaced by a uniformly random empty one (never a just-dropped one)."""
    grown = top_scores(score_chunks, candidates, n, generator)
    if dropped is None or not grown.numel():
        return grown
    again = torch.isin(grown, dropped.to(grown.device))
    kept = grown[~again]
    if bool(again.any()):
        pool = excluding(candidates, torch.cat([grown, dropped.to(grown.device)]))
        kept = torch.cat([kept, select_random(pool, int(again.sum()), generator).to(kept.device)])
    return kept


def grow_sampled(
    score_chunks: ScoreChunks,
    candidates: Candidates,
    n: int,
    generator: torch.Generator,
    tau: float,
    random_share: float,
) -> torch.Tensor:
    """Randomized attention (DAST): a `random_share` of the n connections uniformly at random
    (CTRE's exploration), the rest sampled with probability proportional to score^(1/tau)
    (WAST's attention, made stochastic). random_share = 1 is SET's random growth; tau -> 0 with
    random_share = 0 is WAST's deterministic top-n."""
    n_random = min(n, round(random_share * n))
    chosen = select_random(candidates, n_random, generator) if n_random else torch.empty(0, dtype=torch.long)
    if n_random == n:
        return chosen
    rest = excluding(candidates, chosen) if n_random else candidates
    sampled = sampled_scores(score_chunks, rest, n - n_random, generator, tau)
    return torch.cat([chosen.to(sampled.device), sampled])


def grow_from_candidates(
    score_chunks: ScoreChunks,
    candidates: Candidates,
    n: int,
    generator: torch.Generator,
    grad_at,
    multiple: float,
    tau: float,
    random_share: float,
) -> torch.Tensor:
    """DAST2's growth: a candidate set of ceil(multiple * n) empty positions, a `random_share`
    of it uniform and the rest sampled with p ~ score^(1/tau) (`grow_sampled`), then the n
    candidates with the largest |exact gradient| (`grad_at`, computed for the candidates only).
    multiple = 1 grows the sampled candidates themselves; a uniform candidate set
    (random_share = 1) is GSE's; tau -> 0 with no random share takes the candidates with the
    largest scores."""
    m = min(candidates.count, max(n, math.ceil(multiple * n)))
    pool = grow_sampled(score_chunks, candidates, m, generator, tau, random_share)
    if pool.numel() <= n:
        return pool
    salt = int(torch.randint(2**62, (1,), generator=generator))
    gradient = grad_at(pool).abs().to(pool.device)
    return pool[select_top_keyed(gradient, pool, salt, n)]


def grown_by_share(dropped: dict[str, torch.Tensor], weight: dict[str, float], free: dict[str, int]) -> dict[str, int]:
    """The dropped connections of all layers shared across them in proportion to `weight`,
    capped at each layer's `free` positions, the rest re-shared until every one is placed."""
    total = sum(d.numel() for d in dropped.values())
    alloc = dict.fromkeys(dropped, 0)
    open_layers = [name for name in dropped if free[name] > 0]
    while sum(alloc.values()) < total and open_layers:
        remaining = total - sum(alloc.values())
        mass = sum(weight[n] for n in open_layers)
        share = {n: (weight[n] / mass if mass > 0 else 1 / len(open_layers)) * remaining for n in open_layers}
        floors = {n: math.floor(v) for n, v in share.items()}
        leftover = remaining - sum(floors.values())
        for n in sorted(open_layers, key=lambda n: share[n] - floors[n], reverse=True)[:leftover]:
            floors[n] += 1
        for n in open_layers:
            alloc[n] += min(floors[n], free[n] - alloc[n])
        open_layers = [n for n in open_layers if alloc[n] < free[n]]
    return alloc


def _scores(signals: LayerSignals, what: str) -> ScoreChunks:
    if signals.score_chunks is None:
        raise RuntimeError(f"{what} growth needs scores the engine did not gather for this update")
    return signals.score_chunks


def _check_rounding(rounding: str) -> None:
    if rounding not in ("floor", "ceil"):
        raise ValueError(f"unknown rounding {rounding!r}; choose from: floor, ceil")


def _check_unit(part, *names: str) -> None:
    for name in names:
        if not 0.0 <= getattr(part, name) <= 1.0:
            raise ValueError(f"{name} {getattr(part, name)!r} must be in [0, 1]")


ROUNDING_HELP = "drop count per layer: floor or ceil (SNFS) of the drop fraction times the live weights"


# -- drop criteria ------------------------------------------------------------------------------
@register_drop("magnitude")
@dataclass
class MagnitudeDrop(DropCriterion):
    """RigL, SNFS: the live weights with the smallest |w|."""

    rounding: str = knob("floor", ROUNDING_HELP)

    def __post_init__(self):
        _check_rounding(self.rounding)

    def select(self, values, fraction, generator, signals):
        return drop_by_magnitude(values, fraction, generator, self.rounding)


@register_drop("signed-magnitude")
@dataclass
class SignedMagnitudeDrop(DropCriterion):
    """SET: per sign, the live weights closest to zero."""

    def select(self, values, fraction, generator, signals):
        return drop_by_signed_magnitude(values, fraction, generator)


@register_drop("magnitude-gradient")
@dataclass
class MagnitudeGradientDrop(DropCriterion):
    """MEST: the live weights with the smallest |w| + drop_lambda |grad w|."""

    drop_lambda: float = knob(0.0, "mest: drop by |w| + lambda |grad| (0: magnitude only)")
    rounding: str = knob("floor", ROUNDING_HELP)

    def __post_init__(self):
        _check_rounding(self.rounding)
        if self.drop_lambda < 0:
            raise ValueError(f"drop_lambda {self.drop_lambda!r} must be >= 0")

    @property
    def needs(self) -> dict[str, dict]:
        return {"live_grad": {}}

    def select(self, values, fraction, generator, signals):
        return drop_by_magnitude_and_gradient(
            values, fraction, generator, signals.live_grad, self.drop_lambda, self.rounding
        )


@register_drop("noisy-magnitude")
@dataclass
class NoisyMagnitudeDrop(DropCriterion):
    """CTRE: the live weights with the smallest |w| plus a little Gaussian noise."""

    drop_noise: float = knob(1e-5, "ctre: std of the noise added to |w| before dropping")
    rounding: str = knob("floor", ROUNDING_HELP)

    def __post_init__(self):
        _check_rounding(self.rounding)
        if self.drop_noise < 0:
            raise ValueError(f"drop_noise {self.drop_noise!r} must be >= 0")

    def select(self, values, fraction, generator, signals):
        return drop_by_noisy_magnitude(values, fraction, generator, self.drop_noise, self.rounding)


@register_drop("attention")
@dataclass
class AttentionDrop(DropCriterion):
    """WAST: per sign, the live weights with the smallest |w| x importance(input neuron)."""

    @property
    def needs(self) -> dict[str, dict]:
        return {"importance": {}}

    def select(self, values, fraction, generator, signals):
        if signals.src_importance is None:
            raise RuntimeError("attention drop needs the importance of every live weight's input neuron")
        return drop_by_attention(values, fraction, generator, signals.src_importance)


@register_drop("stochastic-normalised")
@dataclass
class StochasticNormalisedDrop(DropCriterion):
    """DAST2: live weights drawn with p ~ (|w| / its output neuron's mean |w|)^(-1/drop_tau);
    connections grown at the previous update are kept one more update (`protect_grown`)."""

    drop_tau: float = knob(0.25, "dast2: drop temperature (0 = deterministic smallest normalised |w|)")
    neuron_normalised: bool = knob(True, "dast2: divide |w| by the mean |w| into the same output neuron")
    protect_grown: bool = knob(True, "dast2: connections grown at the previous update cannot be dropped")

    def __post_init__(self):
        if self.drop_tau < 0:
            raise ValueError(f"drop_tau {self.drop_tau!r} must be >= 0")

    def select(self, values, fraction, generator, signals):
        if signals.flat is None or signals.shape is None:
            raise RuntimeError("normalised drop needs the live weights' flat indices and the layer's shape")
        protected = None
        if self.protect_grown and signals.last_grown is not None and signals.last_grown.numel():
            protected = torch.isin(signals.flat, signals.last_grown.to(signals.flat.device))
        return drop_stochastic_normalised(
            values, fraction, generator, signals.flat, signals.shape, self.drop_tau, self.neuron_normalised, protected
        )


# -- grow criteria ------------------------------------------------------------------------------
@register_grow("random")
@dataclass
class RandomGrow(GrowCriterion):
    """SET: uniformly random empty positions."""

    def select(self, signals, candidates, n, generator):
        return select_random(candidates, n, generator)


@register_grow("gradient")
@dataclass
class GradientGrow(GrowCriterion):
    """RigL: the empty positions with the largest |dense gradient| of the update step's mini-batch."""

    regrown_is_kept: bool = knob(
        False, "gradient growth: a just-dropped position grown again is kept unchanged (RigL), not new"
    )

    @property
    def needs(self) -> dict[str, dict]:
        return {"dense_grad": {}}

    def select(self, signals, candidates, n, generator):
        if signals.dense_grad_chunks is None:
            raise RuntimeError("gradient growth needs the dense gradient of the update step; none was captured")
        return top_scores(abs_chunks(signals.dense_grad_chunks), candidates, n, generator)

    def reconcile(self, dropped, grown):
        """With `regrown_is_kept`, as in RigL's reference code, a position both dropped and grown
        stays: its value and optimizer state unchanged."""
        if not self.regrown_is_kept:
            return dropped, grown
        return dropped[~torch.isin(dropped, grown)], grown[~torch.isin(grown, dropped)]


@register_grow("momentum")
@dataclass
class MomentumGrow(GrowCriterion):
    """SNFS: the empty positions with the largest |momentum| of the dense gradient; with
    `redistribute`, the layers' growth is shared by their mean |momentum| over live weights."""

    scores_from = "momentum"
    momentum_beta: float = knob(0.9, "snfs: decay of the dense gradient momentum")
    redistribute: bool = knob(True, "snfs: share growth across layers by their mean |momentum|")

    def __post_init__(self):
        if not 0.0 <= self.momentum_beta < 1.0:
            raise ValueError(f"momentum_beta {self.momentum_beta!r} must be in [0, 1)")

    @property
    def needs(self) -> dict[str, dict]:
        return {"momentum": {"beta": self.momentum_beta}}

    def select(self, signals, candidates, n, generator):
        return top_scores(_scores(signals, "momentum"), candidates, n, generator)

    def counts(self, dropped, live, layers, gathered):
        """As many as dropped per layer, or with `redistribute` the total shared across layers
        in proportion to their mean |momentum| over the live weights before the drop."""
        if not self.redistribute:
            return super().counts(dropped, live, layers, gathered)
        momentum = gathered["momentum"]
        weight = {name: momentum.mean_abs_live(name, live[name]) for name in dropped}
        free = {name: layers[name].size - layers[name].nnz + dropped[name].numel() for name in dropped}
        return grown_by_share(dropped, weight, free)


@register_grow("similarity")
@dataclass
class SimilarityGrow(GrowCriterion):
    """CTRE: between the neurons with the most similar recent activations (|cosine|); with
    `switch_patience` (CTRE-seq), at random once the training accuracy stops improving."""

    scores_from = "activations"
    activation_samples: int = knob(1024, "ctre: recent training samples for activation similarity")
    switch_patience: int | None = knob(
        None, "ctre-seq: epochs without better training accuracy before random growth (default: never)"
    )
    best: float | None = field(default=None, init=False)
    since: int = field(default=0, init=False)
    switched: bool = field(default=False, init=False)

    def __post_init__(self):
        if self.activation_samples < 2:
            raise ValueError(f"activation_samples {self.activation_samples!r} must be >= 2")
        if self.switch_patience is not None and self.switch_patience < 1:
            raise ValueError(f"switch_patience {self.switch_patience!r} must be a positive number of epochs")

    @property
    def needs(self) -> dict[str, dict]:
        return {"activations": {"samples": self.activation_samples}}

    def select(self, signals, candidates, n, generator):
        if self.switched:
            return select_random(candidates, n, generator)
        return top_scores(_scores(signals, "similarity"), candidates, n, generator)

    def observe_epoch(self, metric: float) -> None:
        if self.switch_patience is None or self.switched:
            return
        if self.best is None or metric > self.best:
            self.best, self.since = float(metric), 0
        else:
            self.since += 1
        self.switched = self.since >= self.switch_patience

    def state_dict(self) -> dict:
        return {"best": self.best, "since": self.since, "switched": self.switched}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.since, self.switched = state["best"], state["since"], state["switched"]


@register_grow("similarity-sim")
@dataclass
class SimilaritySimGrow(SimilarityGrow):
    """CTRE-sim: similarity growth, a just-dropped connection picked again replaced at random."""

    def select(self, signals, candidates, n, generator):
        if self.switched:
            return select_random(candidates, n, generator)
        return grow_by_score_sim(_scores(signals, "similarity"), candidates, n, generator, signals.dropped)


@register_grow("attention")
@dataclass
class AttentionGrow(GrowCriterion):
    """WAST: the empty positions with the largest importance(src) x importance(dst)."""

    scores_from = "importance"
    importance_lambda: float = knob(0.4, "wast/dast: weight of the gradient term vs the |w| term of neuron importance")
    importance_decay: float = knob(1.0, "wast/dast: importance decay per batch (1 = WAST's running sum)")

    def __post_init__(self):
        _check_unit(self, "importance_lambda")
        if not 0.0 < self.importance_decay <= 1.0:
            raise ValueError(f"importance_decay {self.importance_decay!r} must be in (0, 1]")

    @property
    def needs(self) -> dict[str, dict]:
        return {"importance": {"lam": self.importance_lambda, "decay": self.importance_decay}}

    def select(self, signals, candidates, n, generator):
        return top_scores(_scores(signals, "attention"), candidates, n, generator)


@register_grow("sampled-attention")
@dataclass
class SampledAttentionGrow(AttentionGrow):
    """DAST, randomized attention: a share of the growth uniformly at random, the rest sampled
    with p ~ importance score^(1/tau); tau and the random share annealed (cosine) over the
    schedule's updates."""

    tau_start: float = knob(0.0, "dast: growth sampling temperature at the start (0 = deterministic top-k)")
    tau_end: float = knob(0.0, "dast: sampling temperature at the end of the updates")
    random_start: float = knob(0.0, "dast: share of uniformly random growth at the start")
    random_end: float = knob(0.0, "dast: share of uniformly random growth at the end of the updates")

    def __post_init__(self):
        super().__post_init__()
        _check_unit(self, "random_start", "random_end")
        for name in ("tau_start", "tau_end"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} {getattr(self, name)!r} must be >= 0")

    def tau(self, progress: float) -> float:
        return cosine(self.tau_start, self.tau_end, progress)

    def random_share(self, progress: float) -> float:
        return cosine(self.random_start, self.random_end, progress)

    def select(self, signals, candidates, n, generator):
        progress = signals.progress
        scores = _scores(signals, "sampled")
        return grow_sampled(scores, candidates, n, generator, self.tau(progress), self.random_share(progress))

    def record(self, progress: float) -> dict:
        return {"tau": self.tau(progress), "random_share": self.random_share(progress)}


@register_grow("supervised-attention")
@dataclass
class SupervisedAttentionGrow(GrowCriterion):
    """DAST2: candidates sampled by supervised attention I_src x I_dst (activation x error
    magnitude, moving averages) plus a random share, then the largest exact gradients among them
    (`grow_from_candidates`); tau and the random share annealed (cosine) over the updates; with
    `redistribute_attention`, the growth is shared across layers by their mean attention score
    over live weights (a bound on their mean |gradient|, as SNFS shares by mean |momentum|)."""

    scores_from = "activity"
    activity_beta: float = knob(0.9, "dast2: decay of the moving averages of activation and error magnitudes")
    candidate_multiple: float = knob(
        10.0, "dast2: candidate set size as a multiple of the connections to grow (1 = grow the sampled ones)"
    )
    tau_start: float = knob(0.0, "dast: growth sampling temperature at the start (0 = deterministic top-k)")
    tau_end: float = knob(0.0, "dast: sampling temperature at the end of the updates")
    random_start: float = knob(0.0, "dast: share of uniformly random growth at the start")
    random_end: float = knob(0.0, "dast: share of uniformly random growth at the end of the updates")
    redistribute_attention: bool = knob(
        False, "dast2: share growth across layers by their mean attention score over live weights"
    )
    attribution_src: bool = knob(
        False, "dast2: I_src is the centred attribution |(a - E[a]) dL/da| per input neuron, not |a - E[a]|"
    )

    def __post_init__(self):
        _check_unit(self, "random_start", "random_end")
        for name in ("tau_start", "tau_end"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} {getattr(self, name)!r} must be >= 0")
        if not 0.0 <= self.activity_beta < 1.0:
            raise ValueError(f"activity_beta {self.activity_beta!r} must be in [0, 1)")
        if self.candidate_multiple < 1.0:
            raise ValueError(f"candidate_multiple {self.candidate_multiple!r} must be >= 1")

    @property
    def needs(self) -> dict[str, dict]:
        return {"activity": {"beta": self.activity_beta, "attribution": self.attribution_src}}

    def tau(self, progress: float) -> float:
        return cosine(self.tau_start, self.tau_end, progress)

    def random_share(self, progress: float) -> float:
        return cosine(self.random_start, self.random_end, progress)

    def select(self, signals, candidates, n, generator):
        if signals.grad_at is None:
            raise RuntimeError("supervised-attention growth needs the last batch's activations and errors")
        progress = signals.progress
        return grow_from_candidates(
            _scores(signals, "supervised-attention"),
            candidates,
            n,
            generator,
            signals.grad_at,
            self.candidate_multiple,
            self.tau(progress),
            self.random_share(progress),
        )

    def counts(self, dropped, live, layers, gathered):
        """As many as dropped per layer, or with `redistribute_attention` the total shared across
        layers in proportion to their mean I_src x I_dst over the live weights before the drop."""
        if not self.redistribute_attention:
            return super().counts(dropped, live, layers, gathered)
        activity = gathered["activity"]
        weight = {name: activity.mean_live_score(name, live[name]) for name in dropped}
        free = {name: layers[name].size - layers[name].nnz + dropped[name].numel() for name in dropped}
        return grown_by_share(dropped, weight, free)

    def record(self, progress: float) -> dict:
        return {"tau": self.tau(progress), "random_share": self.random_share(progress)}
