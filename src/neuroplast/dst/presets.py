"""Named algorithms: each a combination of schedule, drop and grow parts (specs: dst.md)."""

from __future__ import annotations

from dataclasses import replace

from neuroplast.dst.engine import Algorithm

_DAST = Algorithm(
    "dast",
    drop="attention",
    grow="sampled-attention",
    update_every=100,
    end_fraction=0.75,
    fraction=0.3,
    anneal="cosine",
    importance_decay=0.99,  # tau, random share and decay chosen on a validation split: scripts/tune_dast.py
    tau_start=1.0,
    tau_end=0.1,
    random_start=0.5,
    random_end=0.0,
)

PRESETS: dict[str, Algorithm] = {
    # No sparsity at all: the trainer does not sparsify the model.
    "dense": Algorithm("dense"),
    # A random sparse topology that never changes.
    "static": Algorithm("static"),
    # SET (Mocanu et al. 2018): after every epoch but the last, drop the zeta fraction of each
    # sign closest to zero, regrow as many at random.
    "set": Algorithm("set", drop="signed-magnitude", grow="random", update_every="epoch", fraction=0.3),
    # RigL (Evci et al. 2020): every 100 steps until 75% of training, drop the smallest |w| with
    # a cosine-decaying fraction alpha=0.3, regrow where the dense |gradient| is largest.
    "rigl": Algorithm(
        "rigl",
        drop="magnitude",
        grow="gradient",
        update_every=100,
        end_fraction=0.75,
        fraction=0.3,
        anneal="cosine",
        regrown_is_kept=True,
    ),
    # SNFS (Dettmers & Zettlemoyer 2019): at every epoch end prune ceil(p nnz) smallest |w| per
    # layer, p cosine-decayed 0.5 -> 0.005 over training; share the regrowth across layers by
    # their mean |momentum|; grow where the dense gradient momentum is largest.
    "snfs": Algorithm(
        "snfs",
        drop="magnitude",
        grow="momentum",
        update_every="epoch",
        fraction=0.5,
        anneal="cosine",
        fraction_end=0.005,
        rounding="ceil",
        redistribute=True,
        momentum_beta=0.9,
    ),
    # MEST with elastic mutation (Yuan et al. 2021): every epoch drop the smallest
    # |w| + lambda |grad| (lambda 0: MEST's code default), regrow at random; the mutated share
    # of live weights is 20%, halved at 56.25% of training, none after 75%.
    "mest": Algorithm(
        "mest",
        drop="magnitude-gradient",
        grow="random",
        update_every="epoch",
        fraction=0.2,
        anneal="step",
        milestones=((0.5625, 0.5),),
        end_fraction=0.75,
    ),
    # CTRE-sim (Atashgahi et al. 2022): every epoch drop the zeta=0.2 smallest |w| (+ tiny noise),
    # grow between the neurons with the most similar activations (|cosine|); a just-dropped
    # connection chosen again is replaced by a random one.
    "ctre": Algorithm("ctre", drop="noisy-magnitude", grow="similarity-sim", update_every="epoch", fraction=0.2),
    # CTRE-seq: grow by activation similarity until the training accuracy has not improved for
    # 40 epochs, then at random.
    "ctre-seq": Algorithm(
        "ctre-seq", drop="noisy-magnitude", grow="similarity", update_every="epoch", fraction=0.2, switch_patience=40
    ),
    # WAST (Sokar et al. 2022), supervised: neuron importance summed every batch (input
    # gradients and |w| strength, lambda 0.4); after every batch drop, per sign, the 30% smallest
    # |w| x importance(input neuron), grow where importance(src) x importance(dst) is largest.
    "wast": Algorithm("wast", drop="attention", grow="attention", update_every=1, fraction=0.3, importance_lambda=0.4),
    # DAST, randomized attention: WAST's attention made stochastic. Importance with decay;
    # growth sampled with p ~ score^(1/tau) plus a share of uniformly random growth; tau and the
    # random share annealed from exploring to exploiting (cosine, until 75% of training).
    "dast": _DAST,
    # Ablations of DAST, one part removed each.
    "dast-no-sampling": replace(_DAST, name="dast-no-sampling", tau_start=0.0, tau_end=0.0),
    "dast-no-random": replace(_DAST, name="dast-no-random", random_start=0.0, random_end=0.0),
    "dast-no-decay": replace(_DAST, name="dast-no-decay", importance_decay=1.0),
    "dast-no-anneal": replace(_DAST, name="dast-no-anneal", tau_end=_DAST.tau_start, random_end=_DAST.random_start),
}
METHODS = tuple(PRESETS)


def preset(name: str, **overrides) -> Algorithm:
    """The named algorithm, with any field overridden (e.g. `preset("set", fraction=0.2)`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown method {name!r}; choose from: {', '.join(METHODS)}")
    unknown = sorted(set(overrides) - set(Algorithm.knobs()))
    if unknown:
        raise ValueError(f"unknown algorithm setting {unknown[0]!r}; choose from: {', '.join(Algorithm.knobs())}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return replace(PRESETS[name], **overrides)
