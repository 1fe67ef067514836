"""Where a sparse network's first layer connects: the share of its live connections that read
the informative inputs of a task whose informative features are known (`synthetic`,
`fashion-mnist-noise`: `Dataset.extras["informative"]`), against the share a uniformly random
topology would give."""

from __future__ import annotations

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
