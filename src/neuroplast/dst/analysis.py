"""Where a sparse network's first layer connects: the share of its live connections that read
the informative inputs of a task whose informative features are known (`synthetic`,
`fashion-mnist-noise`: `Dataset.extras["informative"]`), against the share a uniformly random
topology would give."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn


def informative_share(counts: torch.Tensor, informative: torch.Tensor) -> float:
    """The share of live connections on the `informative` features: counts[informative].sum() /
    counts.sum(), from `counts` = live connections per input feature (0 when none is live)."""
    counts = counts.reshape(-1).double()
    informative = torch.as_tensor(informative, dtype=torch.long).reshape(-1)
    if informative.numel() and (int(informative.min()) < 0 or int(informative.max()) >= counts.numel()):
        raise ValueError(f"informative features must be in 0..{counts.numel() - 1}, got {informative.tolist()[:5]}...")
    total = float(counts.sum())
    return float(counts[informative.unique()].sum()) / total if total > 0 else 0.0


def random_share(features: int, informative: torch.Tensor) -> float:
    """The informative share a uniformly random topology has on average: informative / features."""
    return torch.as_tensor(informative).unique().numel() / features


def first_layer_share(
    source: nn.Module | Mapping[str, torch.Tensor], features: int, informative: torch.Tensor
) -> float | None:
    """`informative_share` of the first sparse layer that reads `features` inputs of a sparse
    model (or its saved tensors, `connections_per_input`'s `source`); None if there is none."""
    from neuroplast.sparse import connections_per_input

    counts = connections_per_input(source, features)
    first = next(iter(counts.values()), None)
    return None if first is None else informative_share(first, informative)


def training_flops(
    records: list[dict], method: str, samples: int, batch_size: int, knobs: dict | None = None
) -> list[float]:
    """Cumulative training FLOPs after each epoch of a run, from its metrics records (each with
    `layers`: live `nnz` and `density` per layer at the epoch's end, and `updates`: the topology
    updates with the connections `grown` per layer), counted as the RigL paper does (Evci et al.
    2020, appendix H): a multiply-add is 2 FLOPs; a sample's forward pass costs f = 2 x live
    weights, its backward pass 2f (input and weight gradients, both sparse), so a step costs 3f
    per sample (dense: 3 x 2 x all weights). On top, what the method's growth needs: the dense
    weight gradient at every step (SNFS's momentum) or at each update's batch (RigL), the exact
    gradients of the candidates at each update's batch (DAST2), or the neuron-pair activation
    similarities over its sample buffer at each update (CTRE). Signals that cost O(neurons)
    (WAST's and DAST's neuron importance) are left out. Live counts are those at each epoch's end."""
    from neuroplast.dst.criteria import GradientGrow, MomentumGrow, SimilarityGrow, SupervisedAttentionGrow
    from neuroplast.dst.presets import preset

    grow = None if method == "dense" else preset(method, **(knobs or {})).grow
    total, cumulative = 0.0, []
    for record in records:
        layers = record["layers"]
        sizes = _layer_sizes(layers)
        live = sum(layer["nnz"] for layer in layers)
        size = sum(sizes.values())
        sparse_size = sum(sizes[layer["name"]] for layer in layers if 0 < layer["density"] < 1)
        forward, dense_forward = 2.0 * live, 2.0 * size
        total += samples * (3.0 * (dense_forward if method == "dense" else forward))
        if isinstance(grow, MomentumGrow):  # the dense weight gradient instead of the sparse one, every step
            total += samples * (dense_forward - forward)
        for update in record.get("updates", []):
            if isinstance(grow, GradientGrow):
                total += batch_size * (dense_forward - forward)
            elif isinstance(grow, SupervisedAttentionGrow):
                candidates = sum(
                    min(math.ceil(grow.candidate_multiple * layer["grown"]), sizes[layer["name"]] - layer["live"])
                    for layer in update["layers"]
                    if layer["grown"]
                )
                total += batch_size * 2.0 * candidates
            elif isinstance(grow, SimilarityGrow):
                total += 2.0 * grow.activation_samples * sparse_size
        cumulative.append(total)
    return cumulative


def dense_epoch_flops(records: list[dict], samples: int) -> float:
    """Training FLOPs of one epoch of the dense model with the layers of `records` (3 x 2 x all
    weights per sample, as `training_flops` counts dense training)."""
    return samples * 6.0 * sum(_layer_sizes(records[0]["layers"]).values())


def _layer_sizes(layers: list[dict]) -> dict[str, int]:
    """Each recorded layer's number of positions (live count / density; empty layers left out)."""
    return {layer["name"]: round(layer["nnz"] / layer["density"]) for layer in layers if layer["density"] > 0}
