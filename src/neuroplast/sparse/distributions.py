"""How a global density is split across layers: uniform, Erdős–Rényi (ER) and ER-Kernel (ERK).

`layer_densities` returns a density per layer; `layer_counts` turns densities into exact
integer numbers of live weights whose sum hits the global budget exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

DISTRIBUTIONS = ("uniform", "er", "erk")


def _er_score(shape: Sequence[int], include_kernel: bool) -> float:
    """raw_l = sum of dims / product of dims (RigL's `get_sparsities_erdos_renyi`).

    ER uses (n_out, n_in) only; ERK also counts a convolution's kernel dimensions.
    """
    dims = list(shape) if include_kernel else list(shape[:2])
    return sum(dims) / math.prod(dims)


def layer_densities(
    shapes: Mapping[str, Sequence[int]],
    density: float,
    distribution: str = "erk",
    dense_layers: Iterable[str] = (),
    epsilon: float | None = None,
    power: float = 1.0,
) -> dict[str, float]:
    """Density of each layer so that the global density (over all layers in `shapes`) is `density`.

    shapes: weight shapes, e.g. (out, in) for Linear, (out, in, kh, kw) for Conv2d.
    dense_layers: layers forced to density 1 (their weights count towards the budget).
    epsilon: with `er`, SET's budget-free rule d_l = min(1, epsilon (n_in + n_out) / (n_in n_out));
        `density` is then ignored.
    power: ERK's `erk_power_scale`: raw_l ** power.

    `uniform` gives every non-forced layer the same density (the others are not re-solved).
    `er`/`erk` re-solve: a layer whose density would exceed 1 becomes dense and the remaining
    budget is shared among the rest, so the global density is met.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; choose from: {', '.join(DISTRIBUTIONS)}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    dense = set(dense_layers)
    unknown = dense - set(shapes)
    if unknown:
        raise ValueError(f"dense_layers {sorted(unknown)} are not among the layers {list(shapes)}")
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}

    if distribution == "uniform":
        return {name: 1.0 if name in dense else density for name in shapes}

    raw = {name: _er_score(shape, distribution == "erk") ** power for name, shape in shapes.items()}
    if distribution == "er" and epsilon is not None:
        return {name: 1.0 if name in dense else min(1.0, epsilon * raw[name]) for name in shapes}

    total = sum(sizes.values())
    budget = density * total
    while True:
        sparse = [name for name in shapes if name not in dense]
        left = budget - sum(sizes[name] for name in dense)
        if not sparse:
            break
        if left < 0:
            raise ValueError(
                f"the layers kept dense ({sorted(dense)}) alone hold more than the density budget {density}"
            )
        eps = left / sum(raw[name] * sizes[name] for name in sparse)
        top = max(raw[name] for name in sparse)
        if eps * top <= 1.0:
            break
        dense |= {name for name in sparse if raw[name] == top}
    return {name: 1.0 if name in dense else eps * raw[name] for name in shapes}


def layer_counts(
    shapes: Mapping[str, Sequence[int]], densities: Mapping[str, float], exact_total: bool = True
) -> dict[str, int]:
    """Integer live-weight counts k_l ~ d_l N_l. With `exact_total`, rounding is done by the
    largest-remainder method so that sum(k_l) == round(sum(d_l N_l)) exactly."""
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    target = {name: densities[name] * sizes[name] for name in shapes}
    if not exact_total:
        return {name: min(sizes[name], max(1, round(t))) for name, t in target.items()}
    counts = {name: math.floor(t) for name, t in target.items()}
    missing = round(sum(target.values())) - sum(counts.values())
    by_remainder = sorted(shapes, key=lambda n: target[n] - counts[n], reverse=True)
    for name in by_remainder:
        if missing <= 0:
            break
        if counts[name] < sizes[name]:
            counts[name] += 1
            missing -= 1
    # Every layer keeps at least one weight; take any excess back from the largest layers.
    counts = {name: max(1, k) for name, k in counts.items()}
    excess = sum(counts.values()) - round(sum(target.values()))
    for name in sorted(shapes, key=lambda n: counts[n], reverse=True):
        if excess <= 0:
            break
        take = min(excess, counts[name] - 1)
        counts[name] -= take
        excess -= take
    return counts
