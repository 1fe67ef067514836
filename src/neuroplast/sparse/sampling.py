"""Where a sparse layer's live weights start: `k` distinct positions of a layer, drawn uniformly.

Both backends and `sparsify` draw through `sample_positions`, so a seed gives the same
topology on every backend.
"""

from __future__ import annotations

import math

import torch

ENUMERATE_UP_TO = 2**24  # positions; above this, sample without listing every position


def sample_positions(size: int, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """`k` distinct flat positions of `size`, uniformly, sorted; the same on every backend."""
    if size <= ENUMERATE_UP_TO:
        return torch.randperm(size, generator=generator)[:k].sort().values
    chosen = torch.empty(0, dtype=torch.long)
    while chosen.numel() < k:
        need = k - chosen.numel()
        drawn = torch.randint(size, (math.ceil(need * size / (size - chosen.numel()) * 1.1) + 16,), generator=generator)
        drawn = drawn[~torch.isin(drawn, chosen)].unique()  # unique sorts: a uniform subset all the same
        drawn = drawn[torch.randperm(drawn.numel(), generator=generator)[:need]]
        chosen = torch.cat([chosen, drawn])
    return chosen.sort().values
