"""How many live connections each input feature of a sparse layer has, read from a model made
sparse or from its saved state, on either backend: the storage formats stay inside `sparse/`."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from neuroplast.sparse.csr import CSRLinear


def connections_per_input(
    source: nn.Module | Mapping[str, torch.Tensor], in_features: int | None = None
) -> dict[str, torch.Tensor]:
    """Live connections per input feature of every sparse layer, by layer name, in the order of
    `source`: a model made sparse (masked or csr backend), or its `state_dict()` / saved tensors.
    A count is the number of live weights that read the feature: a masked layer's mask summed
    over every dimension but the input one (a convolution counts per input channel), a csr
    layer's live weights per column.

    in_features: keep only the layers that read this many features. A saved csr layer does not
        record its width, so one is returned only when `in_features` is given and its pattern
        fits a layer that wide (all columns below it, and every live position among the
        positions ever live when those are saved).
    """
    if isinstance(source, nn.Module):
        counts = {
            name or "model": _module_counts(module)
            for name, module in source.named_modules()
            if isinstance(module, CSRLinear) or hasattr(module, "weight_mask")
        }
    else:
        counts = _state_counts(source, in_features)
    if in_features is None:
        return counts
    return {name: c for name, c in counts.items() if c.numel() == in_features}


def _module_counts(module: nn.Module) -> torch.Tensor:
    if isinstance(module, CSRLinear):
        return torch.bincount(module.col, minlength=module.in_features)
    return _mask_counts(module.weight_mask)


def _mask_counts(mask: torch.Tensor) -> torch.Tensor:
    """Per input feature (dimension 1 of a (out, in, ...) mask), the live weights that read it."""
    return mask.to(torch.long).transpose(0, 1).flatten(1).sum(1)


def _state_counts(state: Mapping[str, torch.Tensor], in_features: int | None) -> dict[str, torch.Tensor]:
    counts = {}
    for key in state:
        prefix, _, leaf = key.rpartition(".")
        name = prefix or "model"
        if leaf == "weight_mask":
            counts[name] = _mask_counts(state[key])
        elif leaf == "col" and in_features is not None and _csr_fits(state, prefix, in_features):
            counts[name] = torch.bincount(state[key].to(torch.long), minlength=in_features)
    return counts


def _csr_fits(state: Mapping[str, torch.Tensor], prefix: str, in_features: int) -> bool:
    """Whether the saved csr layer at `prefix` can be `in_features` wide: its columns are below
    it, and its live positions (row * in_features + col) are among those ever live (saved
    with the layer), which a wrong width breaks."""
    key = (prefix + "." if prefix else "") + "{}"
    crow, col, ever = (state.get(key.format(leaf)) for leaf in ("crow", "col", "ever_active"))
    if crow is None or col.numel() == 0 or int(col.max()) >= in_features:
        return False
    if ever is None:
        return True
    rows = torch.repeat_interleave(torch.arange(crow.numel() - 1), crow.diff())
    return bool(torch.isin(rows * in_features + col, ever).all())


__all__ = ["connections_per_input"]
