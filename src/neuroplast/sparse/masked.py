"""The masked backend: a dense weight times a binary mask. Any layer type, GPU friendly.

The mask (`weight_mask`) and the positions ever live (`weight_ever_active`, for ITOP's R_s)
are registered buffers, so `model.state_dict()` carries them, as with `torch.nn.utils.prune`.
Invariants kept here:
- gradients of pruned weights are zeroed before they reach the optimizer (a tensor hook), so
  they never feed momentum or Adam moments;
- after every optimizer step the pruned weights are set to exactly zero, whatever the
  optimizer does (weight decay, Adam's epsilon);
- a weight or mask written any other way (`load_state_dict` of a dense weight, an EMA copy, a
  manual edit) is masked again before the next forward, `state_dict()` or topology update, and
  right after `load_state_dict`: the layer keeps a stamp (storage and version counter of the
  weight and the mask) and masks only when it changed, so training, whose steps are masked
  already, computes exactly what it would without the check. (A write through `weight.data`
  bypasses version counters, as it bypasses autograd; assigning `weight.data` is caught.)
- a rewiring resets the optimizer state of every changed position.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from neuroplast.sparse.layer import Candidates, SparseLayer

MASK_BUFFERS = ("weight_mask", "weight_ever_active")


def _stamp(module: nn.Module) -> tuple[int, int, int, int]:
    """What changes whenever a module's weight or mask is written in place or replaced."""
    weight, mask = module.weight, module.weight_mask
    return weight.data_ptr(), weight._version, mask.data_ptr(), mask._version


@torch.no_grad()
def mask_if_written(module: nn.Module, *_) -> None:
    """Zero the pruned weights of a masked module if its weight or mask was written since they
    last were. Its signature serves as a forward pre-hook, a state_dict pre-hook and a
    load_state_dict post-hook; it reads the module it is given, so a deep copy of the model
    (an EMA) checks its own weights."""
    if getattr(module, "_mask_stamp", None) != _stamp(module):
        module.weight.mul_(module.weight_mask)
        module._mask_stamp = _stamp(module)


class MaskedLayer(SparseLayer):
    """A layer whose weight is multiplied by the binary mask `weight_mask` (any layer type)."""

    def __init__(self, name: str, module: nn.Module, mask: torch.Tensor):
        self.name = name
        self.module = module
        module.register_buffer("weight_mask", mask)
        module.register_buffer("weight_ever_active", mask.clone())
        self.capture = False  # keep the dense gradient of the next backward (set by the engine)
        self.dense_grad: torch.Tensor | None = None
        mask_if_written(module)
        self._hooks = [
            module.weight.register_hook(self._mask_grad),
            module.register_forward_pre_hook(mask_if_written),
            module.register_state_dict_pre_hook(mask_if_written),
            module.register_load_state_dict_post_hook(mask_if_written),
        ]

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    @property
    def parameter(self) -> nn.Parameter:
        return self.module.weight

    @property
    def weight_mask(self) -> torch.Tensor:
        return self.module.weight_mask

    @property
    def weight_ever_active(self) -> torch.Tensor:
        return self.module.weight_ever_active

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    @property
    def nnz(self) -> int:
        return int(self.weight_mask.sum())

    def _mask_grad(self, grad: torch.Tensor) -> torch.Tensor:
        if self.capture:
            self.dense_grad = grad.detach().clone()
        return grad * self.weight_mask

    @torch.no_grad()
    def after_step(self) -> None:
        self.weight.mul_(self.weight_mask)
        self.module._mask_stamp = _stamp(self.module)

    def live(self) -> tuple[torch.Tensor, torch.Tensor]:
        flat = self.weight_mask.view(-1).nonzero().squeeze(1)
        return self.weight.detach().view(-1)[flat], flat

    def live_grad(self) -> torch.Tensor | None:
        grad = self.weight.grad
        return None if grad is None else grad.detach().view(-1)[self.weight_mask.view(-1).nonzero().squeeze(1)]

    @torch.no_grad()
    def neuron_magnitudes(self) -> tuple[torch.Tensor, torch.Tensor]:
        mask_if_written(self.module)
        w = self.weight.detach().abs()  # pruned weights are exactly zero
        return w.flatten(1).sum(1), w.transpose(0, 1).flatten(1).sum(1)

    def candidates(self, dropped: torch.Tensor) -> Candidates:
        live = self.weight_mask.view(-1).clone()
        live[dropped.to(live.device)] = False
        return Candidates(
            size=live.numel(),
            count=live.numel() - int(live.sum()),
            contains=lambda flat: ~live[flat.to(live.device)],
        )

    def dense_grad_chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.dense_grad is None:
            raise RuntimeError(f"layer {self.name}: no dense gradient was captured for this update")
        grad = self.dense_grad.view(-1)
        yield torch.arange(grad.numel(), device=grad.device), grad

    def clear_signals(self) -> None:
        self.dense_grad = None

    @torch.no_grad()
    def rewire(self, dropped: torch.Tensor, grown: torch.Tensor, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        device = self.weight.device
        dropped, grown = dropped.to(device), grown.to(device)
        mask, weight = self.weight_mask.view(-1), self.weight.view(-1)
        mask[dropped] = False
        mask[grown] = True
        weight[dropped] = 0.0
        weight[grown] = 0.0  # new connections start at zero (SET's Keras code, RigL)
        self.weight_ever_active.view(-1)[grown] = True
        changed = torch.cat([dropped, grown])
        for optimizer in optimizers:
            for value in optimizer.state.get(self.weight, {}).values():
                if torch.is_tensor(value) and value.shape == self.weight.shape:
                    value.view(-1)[changed] = 0
        self.module._mask_stamp = _stamp(self.module)

    def ever_active_count(self) -> int:
        return int(self.weight_ever_active.sum())

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @torch.no_grad()
    def finalize(self, dense: bool) -> nn.Module:
        """The layer's own module, its pruned weights zero, without hooks or mask buffers."""
        mask_if_written(self.module)
        self.remove()
        for buffer in MASK_BUFFERS:
            delattr(self.module, buffer)
        del self.module._mask_stamp
        return self.module
