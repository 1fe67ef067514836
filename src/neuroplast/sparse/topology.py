"""Masks on the weights of a model: which connections are live.

`sparsify(model, ...)` picks the `nn.Linear` / `nn.Conv2d` layers to make sparse, gives each a
density from a distribution, samples a mask with exactly that many live weights, and returns a
`Topology`. Masks are registered buffers (`weight_mask`, plus `weight_ever_active` for ITOP's
R_s), so `model.state_dict()` carries them, as with `torch.nn.utils.prune`.

The masked backend keeps three invariants:
- gradients of pruned weights are zeroed before they reach the optimizer (a tensor hook), so
  they never feed momentum or Adam moments;
- after every optimizer step the pruned weights are set to exactly zero (a step post-hook),
  whatever the optimizer does (weight decay, Adam's epsilon);
- when the topology changes, the optimizer state of every changed position is reset.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from neuroplast.sparse.distributions import layer_counts, layer_densities

SPARSE_LAYER_TYPES = (nn.Linear, nn.Conv2d)
BACKENDS = ("masked",)


@dataclass
class LayerStats:
    name: str
    nnz: int
    size: int

    @property
    def density(self) -> float:
        return self.nnz / self.size


class Topology:
    """The sparse layers of a model and their masks (the masked backend)."""

    def __init__(self, layers: dict[str, nn.Module]):
        self.layers = layers
        self.capture_dense_grad = False  # set by the DST engine before a backward it needs
        self.dense_grads: dict[str, torch.Tensor] = {}
        self._optimizers: list[torch.optim.Optimizer] = []
        self._handles = [layer.weight.register_hook(self._grad_hook(name)) for name, layer in layers.items()]

    # -- masks -------------------------------------------------------------------------------
    def mask(self, name: str) -> torch.Tensor:
        return self.layers[name].weight_mask

    def weight(self, name: str) -> nn.Parameter:
        return self.layers[name].weight

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Set every pruned weight to exactly zero."""
        for layer in self.layers.values():
            layer.weight.mul_(layer.weight_mask)

    def _grad_hook(self, name: str):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            if self.capture_dense_grad:
                self.dense_grads[name] = grad.detach().clone()
            return grad * self.layers[name].weight_mask

        return hook

    # -- optimizer ----------------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Keep pruned weights at zero after each `optimizer.step()`; let topology updates reset
        this optimizer's state at changed positions."""
        self._optimizers.append(optimizer)
        optimizer.register_step_post_hook(lambda *_: self.apply_masks())

    @torch.no_grad()
    def reset_optimizer_state(self, name: str, flat_index: torch.Tensor) -> None:
        """Zero momentum / Adam moments (any per-weight state tensor) at `flat_index`."""
        param = self.weight(name)
        for optimizer in self._optimizers:
            for value in optimizer.state.get(param, {}).values():
                if torch.is_tensor(value) and value.shape == param.shape:
                    value.view(-1)[flat_index] = 0

    # -- statistics ---------------------------------------------------------------------------
    def stats(self) -> list[LayerStats]:
        return [LayerStats(name, int(l.weight_mask.sum()), l.weight_mask.numel()) for name, l in self.layers.items()]

    def density(self) -> float:
        """Global live fraction over the sparse layers."""
        stats = self.stats()
        return sum(s.nnz for s in stats) / sum(s.size for s in stats)

    def r_s(self) -> float:
        """ITOP's R_s: the fraction of sparse-layer positions that have ever been live."""
        ever = sum(int(l.weight_ever_active.sum()) for l in self.layers.values())
        return ever / sum(l.weight_mask.numel() for l in self.layers.values())

    def layer_r_s(self, name: str) -> float:
        layer = self.layers[name]
        return int(layer.weight_ever_active.sum()) / layer.weight_ever_active.numel()

    def remove(self) -> None:
        """Detach the gradient hooks (the masks stay as buffers)."""
        for handle in self._handles:
            handle.remove()


def select_layers(
    model: nn.Module,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    dense_first: bool = False,
    dense_last: bool = False,
) -> dict[str, nn.Module]:
    """The Linear/Conv2d layers to sparsify, by fnmatch patterns on module names."""
    # A model that is itself one layer has the empty name; call it "model" in reports.
    candidates = [(name or "model", m) for name, m in model.named_modules() if isinstance(m, SPARSE_LAYER_TYPES)]
    if not candidates:
        raise ValueError("the model has no nn.Linear or nn.Conv2d layer to sparsify")
    first, last = candidates[0][0], candidates[-1][0]
    chosen = {}
    for name, module in candidates:
        if not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        if (dense_first and name == first) or (dense_last and name == last):
            continue
        chosen[name] = module
    if not chosen:
        raise ValueError(f"no layer left to sparsify (layers: {[n for n, _ in candidates]})")
    return chosen


@torch.no_grad()
def sparsify(
    model: nn.Module,
    density: float,
    distribution: str = "erk",
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    dense_first: bool = False,
    dense_last: bool = False,
    epsilon: float | None = None,
    dense_layers: Iterable[str] = (),
    backend: str = "masked",
    rescale_init: bool = True,
    generator: torch.Generator | None = None,
) -> Topology:
    """Make `model` sparse in place and return its `Topology`.

    Each chosen layer gets exactly k_l = round(d_l * N_l) live weights, drawn uniformly without
    replacement (seeded by `generator`); the others are set to zero.

    rescale_init: multiply each output unit's live weights by sqrt(fan_in / live fan_in), so a
        sparse layer starts with the activation variance of its dense initialisation (the
        sparse-aware init of Evci et al., "Gradient Flow in Sparse Neural Networks", AAAI 2022).
        Without it, signals shrink by sqrt(density) per layer and deep sparse nets stall.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from: {', '.join(BACKENDS)}")
    layers = select_layers(model, include, exclude, dense_first, dense_last)
    shapes = {name: tuple(m.weight.shape) for name, m in layers.items()}
    densities = layer_densities(shapes, density, distribution, dense_layers, epsilon)
    counts = layer_counts(shapes, densities, exact_total=epsilon is None)
    for name, module in layers.items():
        weight = module.weight
        size = weight.numel()
        mask = torch.zeros(size, dtype=torch.bool, device=weight.device)
        live = torch.randperm(size, generator=generator)[: counts[name]].to(weight.device)
        mask[live] = True
        mask = mask.view_as(weight)
        module.register_buffer("weight_mask", mask)
        module.register_buffer("weight_ever_active", mask.clone())
        weight.mul_(mask)
        if rescale_init:
            fan_in = mask[0].numel()
            live_fan_in = mask.flatten(1).sum(1).clamp_min(1)
            scale = (fan_in / live_fan_in).sqrt().to(weight.dtype)
            weight.mul_(scale.view(-1, *([1] * (weight.dim() - 1))))
    return Topology(layers)
