"""Which connections of a model are live: `sparsify(model)` and the `Topology` it returns.

`sparsify` picks the `nn.Linear` / `nn.Conv2d` layers to make sparse, gives each a density from
a distribution, samples exactly that many live weights, and hands every layer to a backend:
`masked` (`sparse/masked.py`, any layer) or `csr` (`sparse/csr.py`, truly sparse Linear).
The `Topology` is the backend-independent view the DST engine works through.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from neuroplast.sparse.csr import CSRLayer, CSRLinear, to_csr
from neuroplast.sparse.distributions import layer_counts, layer_densities
from neuroplast.sparse.layer import SparseLayer
from neuroplast.sparse.masked import MaskedLayer
from neuroplast.sparse.sampling import sample_positions

SPARSE_LAYER_TYPES = (nn.Linear, nn.Conv2d)
BACKENDS = ("masked", "csr")
FINALIZED_CSR = ("sparse", "dense")  # what `Topology.finalize` makes of a csr layer


@dataclass
class LayerStats:
    """The live weights of one sparse layer: how many, out of how many positions."""

    name: str
    nnz: int
    size: int

    @property
    def density(self) -> float:
        return self.nnz / self.size


class Topology:
    """The sparse layers of `model` (name -> `SparseLayer`)."""

    def __init__(self, layers: dict[str, SparseLayer], model: nn.Module):
        self.layers = layers
        self.model = model
        self.optimizers: list[torch.optim.Optimizer] = []
        self._step_hooks: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def capture_dense_grad(self) -> bool:
        return any(layer.capture for layer in self.layers.values())

    @capture_dense_grad.setter
    def capture_dense_grad(self, value: bool) -> None:
        """Ask every layer to keep the dense gradient of the next backward (RigL's update step)."""
        for layer in self.layers.values():
            layer.capture = value

    def clear_signals(self) -> None:
        """Drop the signals the layers captured for the last update (e.g. RigL's dense gradient)."""
        for layer in self.layers.values():
            layer.clear_signals()

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Restore the backend's invariants after each `optimizer.step()` (pruned weights exactly
        zero), and let rewiring keep this optimizer's state right."""
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, layer in self.layers.items() if id(layer.parameter) not in held]
        if missing:
            raise ValueError(
                f"the optimizer does not hold the weights of {', '.join(missing)}: create it after sparsify(), "
                "from model.parameters()"
            )
        self.optimizers.append(optimizer)
        self._step_hooks.append(optimizer.register_step_post_hook(lambda *_: self.after_step()))

    def after_step(self) -> None:
        """Restore every layer's invariants after an optimizer step (pruned weights exactly zero)."""
        for layer in self.layers.values():
            layer.after_step()

    @classmethod
    def of_csr_layers(cls, model: nn.Module) -> Topology:
        """The topology of a model built directly from `CSRLinear` layers."""
        layers = {name: CSRLayer(name, m) for name, m in model.named_modules() if isinstance(m, CSRLinear)}
        if not layers:
            raise ValueError("the model has no CSRLinear layer")
        return cls(layers, model)

    def stats(self) -> list[LayerStats]:
        """Live weights and positions of every sparse layer, in the model's order."""
        return [LayerStats(name, layer.nnz, layer.size) for name, layer in self.layers.items()]

    def density(self) -> float:
        """Global live fraction over the sparse layers."""
        stats = self.stats()
        return sum(s.nnz for s in stats) / sum(s.size for s in stats)

    def r_s(self) -> float:
        """ITOP's R_s: the fraction of sparse-layer positions that have ever been live."""
        return sum(l.ever_active_count() for l in self.layers.values()) / sum(l.size for l in self.layers.values())

    def remove(self) -> None:
        """Detach the backends' hooks (masks stay as buffers)."""
        for layer in self.layers.values():
            layer.remove()

    def finalize(self, csr: str = "sparse") -> nn.Module:
        """Bake the sparse weights into a plain model and return it (torch.ao.pruning's
        `squash_mask`): masked layers keep their module, pruned weights zero, without hooks or
        mask buffers, so `state_dict()` is a plain model's; csr layers stay truly sparse
        `CSRLinear`s for inference (`csr="sparse"`) or become `nn.Linear`s (`csr="dense"`).
        The model is changed in place; the topology lets go of it and of its optimizers."""
        if csr not in FINALIZED_CSR:
            raise ValueError(f"unknown csr {csr!r}; choose from: {', '.join(FINALIZED_CSR)}")
        for name, layer in self.layers.items():
            module = layer.finalize(dense=csr == "dense")
            if module is not layer.module:
                self.model.set_submodule(name, module)
        for hook in self._step_hooks:
            hook.remove()
        self.layers, self.optimizers, self._step_hooks = {}, [], []
        return self.model


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

    backend: "masked" keeps each layer and masks its weight; "csr" replaces each `nn.Linear` by
        a truly sparse `CSRLinear` (same live weights, same results; Conv2d is not supported).

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
    sparse_layers: dict[str, SparseLayer] = {}
    for name, module in layers.items():
        weight = module.weight
        flat = sample_positions(weight.numel(), counts[name], generator).to(weight.device)
        if rescale_init:
            rows = weight.shape[0]
            fan_in = weight.numel() // rows
            live_fan_in = torch.bincount(flat // fan_in, minlength=rows).clamp_min(1)
            scale = (fan_in / live_fan_in).sqrt().to(weight.dtype)
            weight.mul_(scale.view(-1, *([1] * (weight.dim() - 1))))
        if backend == "csr":
            sparse_layers[name] = to_csr(model, name, module, flat)
        else:
            mask = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
            mask[flat] = True
            mask = mask.view_as(weight)
            weight.mul_(mask)
            sparse_layers[name] = MaskedLayer(name, module, mask)
    return Topology(sparse_layers, model)
