"""What every backend's sparse layer offers the DST engine."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

CHUNK_ELEMENTS = 1 << 22  # dense-gradient block size for growth scores: 4M floats (16 MiB)


@dataclass(frozen=True)
class Candidates:
    """The empty positions of a layer (after the drop): how many, and a membership test."""

    size: int  # positions in the layer
    count: int  # empty positions
    contains: Callable[[torch.Tensor], torch.Tensor]  # flat indices -> bool


class SparseLayer(ABC):
    """One sparse layer: its live weights as (values, flat indices), its empty positions, the
    dense gradient when asked for, and an in-place rewiring that keeps optimizer state right."""

    name: str
    module: nn.Module
    capture: bool
    truly_sparse: bool = False  # True when no tensor of the layer's full shape exists

    @property
    @abstractmethod
    def shape(self) -> tuple[int, ...]: ...

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    @abstractmethod
    def nnz(self) -> int: ...

    @property
    @abstractmethod
    def parameter(self) -> nn.Parameter:
        """The parameter holding this layer's weights (what the optimizer must update)."""

    @property
    def density(self) -> float:
        return self.nnz / self.size

    @abstractmethod
    def live(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, flat indices) of the live weights, flat indices ascending."""

    @abstractmethod
    def live_grad(self) -> torch.Tensor | None:
        """The gradient of the last backward at the live weights, aligned with `live()`."""

    @abstractmethod
    def neuron_magnitudes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(per output neuron, per input neuron) sums of |w| over the live weights; a conv
        neuron is a channel (summed over kernel positions)."""

    @abstractmethod
    def candidates(self, dropped: torch.Tensor) -> Candidates:
        """The positions empty once the flat indices `dropped` are removed."""

    @abstractmethod
    def dense_grad_chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(flat indices, dense gradient) of the captured mini-batch, in bounded chunks."""

    @abstractmethod
    def clear_signals(self) -> None: ...

    @abstractmethod
    def rewire(self, dropped: torch.Tensor, grown: torch.Tensor, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Remove `dropped`, add `grown` (value 0, fresh optimizer state); both flat indices."""

    @abstractmethod
    def after_step(self) -> None:
        """Restore invariants after an optimizer step."""

    @abstractmethod
    def ever_active_count(self) -> int: ...

    def r_s(self) -> float:
        return self.ever_active_count() / self.size

    @abstractmethod
    def remove(self) -> None:
        """Detach hooks."""

    @abstractmethod
    def finalize(self, dense: bool) -> nn.Module:
        """A plain module with this layer's weights baked in: no hooks, no mask buffers. A truly
        sparse layer stays sparse unless `dense` asks for the equivalent dense module."""
