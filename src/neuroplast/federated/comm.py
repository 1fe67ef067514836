"""How the processes of a semi-decentralized run talk: one process (the simulator) or many.

The round logic in `simulator.Federation` is written once against this small interface. Each
process holds a contiguous block of device rows of the stacked parameters X (n x d):

- `LocalComm`: one process holds all n rows; D2D is one matrix product W @ X and every
  reduction is the identity.
- `TorchComm` (in `distributed.py`): P processes under torch.distributed, n / P rows each.
"""

from __future__ import annotations

import torch

from neuroplast.federated.topology import Mixing


class LocalComm:
    """Every device in this process."""

    rank = 0
    world = 1

    def rows(self, devices: int) -> tuple[int, int]:
        return 0, devices

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def mix(self, mixing: Mixing, round_: int, x: torch.Tensor) -> torch.Tensor:
        return mixing.apply(round_, x)

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """All n rows on rank 0 (None elsewhere)."""
        return x

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's tensor on every rank (shape and dtype known everywhere)."""
        return tensor

    @property
    def bytes_sent(self) -> int:
        """Bytes this process has handed to collectives (none: nothing leaves the process)."""
        return 0
