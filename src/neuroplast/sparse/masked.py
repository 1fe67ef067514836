"""The masked backend: a dense weight times a binary mask. Any layer type, GPU friendly.

The mask (`weight_mask`) and the positions ever live (`weight_ever_active`, for ITOP's R_s)
are registered buffers, so `model.state_dict()` carries them, as with `torch.nn.utils.prune`.
Invariants kept here:
- gradients of pruned weights are zeroed before they reach the optimizer (a tensor hook), so
  they never feed momentum or Adam moments;
- after every optimizer step the pruned weights are set to exactly zero, whatever the
  optimizer does (weight decay, Adam's epsilon);
- a rewiring resets the optimizer state of every changed position.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from neuroplast.sparse.layer import Candidates, SparseLayer


class MaskedLayer(SparseLayer):
    def __init__(self, name: str, module: nn.Module, mask: torch.Tensor):
        self.name = name
        self.module = module
        module.register_buffer("weight_mask", mask)
        module.register_buffer("weight_ever_active", mask.clone())
        self.capture = False  # keep the dense gradient of the next backward (set by the engine)
        self.dense_grad: torch.Tensor | None = None
        self._hook = module.weight.register_hook(self._mask_grad)

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

    def live(self) -> tuple[torch.Tensor, torch.Tensor]:
        flat = self.weight_mask.view(-1).nonzero().squeeze(1)
        return self.weight.detach().view(-1)[flat], flat

    def live_grad(self) -> torch.Tensor | None:
        grad = self.weight.grad
        return None if grad is None else grad.detach().view(-1)[self.weight_mask.view(-1).nonzero().squeeze(1)]

    @torch.no_grad()
    def neuron_magnitudes(self) -> tuple[torch.Tensor, torch.Tensor]:
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

    def ever_active_count(self) -> int:
        return int(self.weight_ever_active.sum())

    def remove(self) -> None:
        self._hook.remove()
