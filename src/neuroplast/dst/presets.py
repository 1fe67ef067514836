"""Named algorithms: each a combination of schedule, drop and grow parts."""

from __future__ import annotations

from dataclasses import replace

from neuroplast.dst.engine import Algorithm

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
}
METHODS = tuple(PRESETS)


def preset(name: str, **overrides) -> Algorithm:
    """The named algorithm, with any field overridden (e.g. `preset("set", fraction=0.2)`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown method {name!r}; choose from: {', '.join(METHODS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return replace(PRESETS[name], **overrides)
