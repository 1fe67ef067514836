"""How the processes of a semi-decentralized run talk: one process (the simulator) or many.

The round logic in `simulator.Federation` is written once against this small interface. Each
process holds a contiguous block of device rows of the stacked parameters X (n x d):

- `LocalComm`: one process holds all n rows; D2D is one matrix product W @ X and every
  reduction is the identity.
- `TorchComm` (in `distributed.py`): P processes under torch.distributed, n / P rows each.

Sparse devices send messages rather than rows: `deliver` takes a plan, the same ordered list
of `Message`s on every process, and hands each payload from the process that holds its sender
to the one that holds its receiver.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from neuroplast.federated.topology import Mixing

MESSAGE_KINDS = ("d2d", "d2s")


class Message(NamedTuple):
    """One message of the algorithm: `size` values of `dtype` from process `source` to `target`,
    found by `key` in the sender's payloads and in what `deliver` returns to the receiver."""

    kind: str  # "d2d" or "d2s"
    key: object
    source: int
    target: int
    size: int
    dtype: torch.dtype


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

    def owner(self, device: int) -> int:
        """The process that holds `device`."""
        return 0

    def deliver(self, plan: list[Message], payloads: dict) -> dict:
        """The payloads of `plan` this process receives (here: all of them)."""
        return {m.key: payloads[m.key] for m in plan}

    @property
    def bytes_sent(self) -> int:
        """Bytes this process has handed to collectives (none: nothing leaves the process)."""
        return 0
