"""Named algorithms: each a composition of a schedule, a drop and a grow criterion (specs: dst.md)."""

from __future__ import annotations

from dataclasses import replace

from neuroplast.dst.criteria import (
    AttentionDrop,
    AttentionGrow,
    GradientGrow,
    MagnitudeDrop,
    MagnitudeGradientDrop,
    MomentumGrow,
    NoisyMagnitudeDrop,
    RandomGrow,
    SampledAttentionGrow,
    SignedMagnitudeDrop,
    SimilarityGrow,
    SimilaritySimGrow,
    StochasticNormalisedDrop,
    SupervisedAttentionGrow,
)
from neuroplast.dst.engine import Algorithm
from neuroplast.dst.schedules import UpdateSchedule

EVERY_EPOCH = UpdateSchedule(update_every="epoch", drop_fraction=0.3)

_DAST = Algorithm(
    "dast",
    UpdateSchedule(update_every=100, end_fraction=0.75, drop_fraction=0.3, drop_anneal="cosine"),
    AttentionDrop(),
    # tau, random share and decay chosen on a validation split: scripts/tune_dast.py
    SampledAttentionGrow(importance_decay=0.99, tau_start=1.0, tau_end=0.1, random_start=0.5, random_end=0.0),
)

_DAST2 = Algorithm(
    "dast2",
    # front-loaded: updates at steps 10, 23, 40, 62, 91, ... (each interval 1.3x the last), the
    # drop fraction cosine-decayed from 0.3 until 75% of training
    UpdateSchedule(update_every=10, update_growth=1.3, end_fraction=0.75, drop_fraction=0.3, drop_anneal="cosine"),
    StochasticNormalisedDrop(drop_tau=0.25, neuron_normalised=True, protect_grown=True),
    SupervisedAttentionGrow(
        activity_beta=0.9,
        candidate_multiple=10.0,
        tau_start=1.0,
        tau_end=0.2,
        random_start=0.2,
        random_end=0.0,
        redistribute_attention=True,
    ),
)

PRESETS: dict[str, Algorithm] = {
    # No sparsity at all: the trainer does not sparsify the model.
    "dense": Algorithm("dense"),
    # A random sparse topology that never changes.
    "static": Algorithm("static"),
    # SET (Mocanu et al. 2018): after every epoch but the last, drop the zeta fraction of each
    # sign closest to zero, regrow as many at random.
    "set": Algorithm("set", EVERY_EPOCH, SignedMagnitudeDrop(), RandomGrow()),
    # RigL (Evci et al. 2020): every 100 steps until 75% of training, drop the smallest |w| with
    # a cosine-decaying fraction alpha=0.3, regrow where the dense |gradient| is largest; a
    # just-dropped position regrown is kept, as in RigL's reference code.
    "rigl": Algorithm(
        "rigl",
        UpdateSchedule(update_every=100, end_fraction=0.75, drop_fraction=0.3, drop_anneal="cosine"),
        MagnitudeDrop(),
        GradientGrow(regrown_is_kept=True),
    ),
    # SNFS (Dettmers & Zettlemoyer 2019): at every epoch end prune ceil(p nnz) smallest |w| per
    # layer, p cosine-decayed 0.5 -> 0.005 over training; share the regrowth across layers by
    # their mean |momentum|; grow where the dense gradient momentum is largest.
    "snfs": Algorithm(
        "snfs",
        UpdateSchedule(update_every="epoch", drop_fraction=0.5, drop_anneal="cosine", drop_fraction_end=0.005),
        MagnitudeDrop(rounding="ceil"),
        MomentumGrow(momentum_beta=0.9, redistribute=True),
    ),
    # MEST with elastic mutation (Yuan et al. 2021): every epoch drop the smallest
    # |w| + lambda |grad| (lambda 0: MEST's code default), regrow at random; the mutated share
    # of live weights is 20%, halved at 56.25% of training, none after 75%.
    "mest": Algorithm(
        "mest",
        UpdateSchedule(
            update_every="epoch", drop_fraction=0.2, drop_anneal="step", milestones=((0.5625, 0.5),), end_fraction=0.75
        ),
        MagnitudeGradientDrop(),
        RandomGrow(),
    ),
    # CTRE-sim (Atashgahi et al. 2022): every epoch drop the zeta=0.2 smallest |w| (+ tiny noise),
    # grow between the neurons with the most similar activations (|cosine|); a just-dropped
    # connection chosen again is replaced by a random one.
    "ctre": Algorithm(
        "ctre", UpdateSchedule(update_every="epoch", drop_fraction=0.2), NoisyMagnitudeDrop(), SimilaritySimGrow()
    ),
    # CTRE-seq: grow by activation similarity until the training accuracy has not improved for
    # 40 epochs, then at random.
    "ctre-seq": Algorithm(
        "ctre-seq",
        UpdateSchedule(update_every="epoch", drop_fraction=0.2),
        NoisyMagnitudeDrop(),
        SimilarityGrow(switch_patience=40),
    ),
    # WAST (Sokar et al. 2022), supervised: neuron importance summed every batch (input
    # gradients and |w| strength, lambda 0.4); after every batch drop, per sign, the 30% smallest
    # |w| x importance(input neuron), grow where importance(src) x importance(dst) is largest.
    "wast": Algorithm(
        "wast", UpdateSchedule(update_every=1, drop_fraction=0.3), AttentionDrop(), AttentionGrow(importance_lambda=0.4)
    ),
    # DAST, randomized attention: WAST's attention made stochastic. Importance with decay;
    # growth sampled with p ~ score^(1/tau) plus a share of uniformly random growth; tau and the
    # random share annealed from exploring to exploiting (cosine, until 75% of training).
    "dast": _DAST,
    # Ablations of DAST, one part removed each.
    "dast-no-sampling": replace(_DAST.with_knobs(tau_start=0.0, tau_end=0.0), name="dast-no-sampling"),
    "dast-no-random": replace(_DAST.with_knobs(random_start=0.0, random_end=0.0), name="dast-no-random"),
    "dast-no-decay": replace(_DAST.with_knobs(importance_decay=1.0), name="dast-no-decay"),
    "dast-no-anneal": replace(
        _DAST.with_knobs(tau_end=_DAST.grow.tau_start, random_end=_DAST.grow.random_start), name="dast-no-anneal"
    ),
    # DAST2: supervised attention (activation x error magnitude) samples a candidate set with a
    # random share, the exact gradient picks among the candidates; growth shared across layers by
    # attention; front-loaded updates; a stochastic neuron-normalised drop that spares the
    # connections grown at the previous update.
    "dast2": _DAST2,
    # Ablations of DAST2, one part removed each.
    "dast2-no-redistribute": replace(_DAST2.with_knobs(redistribute_attention=False), name="dast2-no-redistribute"),
    # uniformly random candidates (GSE's): no attention in the sampler
    "dast2-no-attention": replace(_DAST2.with_knobs(random_start=1.0, random_end=1.0), name="dast2-no-attention"),
    # no exact gradient: grow the sampled candidates themselves
    "dast2-no-gradient": replace(_DAST2.with_knobs(candidate_multiple=1.0), name="dast2-no-gradient"),
    # DAST's evenly spaced schedule: every 100 steps
    "dast2-no-frontload": replace(_DAST2.with_knobs(update_every=100, update_growth=1.0), name="dast2-no-frontload"),
    "dast2-no-stochastic-drop": replace(_DAST2.with_knobs(drop_tau=0.0), name="dast2-no-stochastic-drop"),
    "dast2-no-normalise": replace(_DAST2.with_knobs(neuron_normalised=False), name="dast2-no-normalise"),
    "dast2-no-protect": replace(_DAST2.with_knobs(protect_grown=False), name="dast2-no-protect"),
    # A candidate, not an ablation: I_src is the centred attribution |(a - E[a]) dL/da| (WAST's and
    # DAST's input signal) instead of the activity |a - E[a]|, which is blind to noise features
    "dast2-attribution": replace(_DAST2.with_knobs(attribution_src=True), name="dast2-attribution"),
}
METHODS = tuple(PRESETS)


def preset(name: str, **knobs) -> Algorithm:
    """The named algorithm, with any knob of its parts changed by name, e.g.
    `preset("set", drop_fraction=0.2)` (None keeps the preset's value)."""
    if name not in PRESETS:
        raise ValueError(f"unknown method {name!r}; choose from: {', '.join(PRESETS)}")
    return PRESETS[name].with_knobs(**knobs)


def register_preset(algorithm: Algorithm) -> Algorithm:
    """Make `algorithm` a method by its name (for `preset`, `RunConfig.method` and `--method`)."""
    PRESETS[algorithm.name] = algorithm
    return algorithm
