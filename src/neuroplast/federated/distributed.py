"""The semi-decentralized engine on torch.distributed (launched by torchrun).

P processes host n / P contiguous devices each (P must divide n, and a process's devices must lie
in one component, or it must hold whole components). Groups are created once, at start-up, by
every rank in the same order:

- D2D stays inside a component: each component's ranks form a subgroup. A process gathers the
  rows it needs and computes its rows of W X. Two exchanges: `all_gather` (list form) of whole
  blocks in the component, for small models, or `p2p`: ordered blocking send/recv of just the
  rows a neighbour's weights touch, for large ones (pairs taken in one global order, lower rank
  sends first, so no two ranks wait on each other).
- D2S is one `all_reduce(SUM)` on the world group of w_i x_i with w_i = 1[i in S] / K: every rank
  draws S from the shared seed, so there is no per-round group and no server process.
- Metrics: each rank scores its own devices; sums travel in `all_reduce`; rank 0 writes.

Every collective runs under the process group's timeout, so a dead peer ends the job instead of
hanging it; torchrun then restarts all workers (`--max-restarts`) and they resume from the last
checkpoint.
"""

from __future__ import annotations

import os
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from neuroplast.federated.comm import MESSAGE_KINDS, Message
from neuroplast.federated.topology import Mixing
from neuroplast.train.config import ConfigError

EXCHANGES = ("auto", "all_gather", "p2p")
ALL_GATHER_MAX_VALUES = 1 << 20  # auto: all_gather while a block holds at most this many values


def check_layout(devices: int, components: int, world: int) -> int:
    """Devices per process; raise a one-line error when P does not fit n and the components."""
    if devices % world:
        valid = [p for p in range(1, devices + 1) if devices % p == 0 and _aligned(devices, components, p)]
        raise ConfigError(
            f"{world} processes do not divide {devices} devices; choose a number of processes from: "
            + ", ".join(map(str, valid))
        )
    if not _aligned(devices, components, world):
        valid = [p for p in range(1, devices + 1) if devices % p == 0 and _aligned(devices, components, p)]
        raise ConfigError(
            f"{world} processes would split a component of {devices // components} devices unevenly; "
            "choose a number of processes from: " + ", ".join(map(str, valid))
        )
    return devices // world


def _aligned(devices: int, components: int, world: int) -> bool:
    per, m = devices // world, devices // components
    return per % m == 0 or m % per == 0


class TorchComm:
    """This process's devices and its collectives (see the module docstring)."""

    def __init__(self, devices: int, components: int, exchange: str = "auto"):
        if exchange not in EXCHANGES:
            raise ConfigError(f"unknown exchange {exchange!r}; choose from: {', '.join(EXCHANGES)}")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.devices = devices
        self.per = check_layout(devices, components, self.world)
        m = devices // components
        self.sent = 0
        if self.per < m:  # a component spans several ranks: one subgroup per component
            ranks_per = m // self.per
            members = [list(range(c * ranks_per, (c + 1) * ranks_per)) for c in range(components)]
            self.group, _ = dist.new_subgroups_by_enumeration(members)
            self.component_ranks = members[self.rank // ranks_per]
        else:
            self.group, self.component_ranks = None, [self.rank]
        self.exchange = exchange  # "auto" is settled by the first mix, from the model's size
        # payload bytes of the algorithm's messages: [d2d, d2s] handed to send, then [d2d, d2s]
        # whose sender and receiver share this process (handed over in memory)
        self.message_bytes = [0, 0, 0, 0]

    def owner(self, device: int) -> int:
        return device // self.per

    def deliver(self, plan: list[Message], payloads: dict) -> dict:
        """Hand every message of `plan` (the same ordered list on every process) from its sender's
        process to its receiver's: blocking send/recv taken in plan order, so the earliest pending
        message always has both ends ready and no two processes wait on each other."""
        received = {}
        # payloads are built on the CPU; NCCL moves only CUDA tensors
        wire = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        for m in plan:
            kind = MESSAGE_KINDS.index(m.kind)
            if m.source == m.target:
                if m.source == self.rank:
                    received[m.key] = payloads[m.key]
                    self.message_bytes[2 + kind] += payloads[m.key].nbytes
            elif m.source == self.rank:
                tensor = payloads[m.key].contiguous()
                dist.send(tensor if wire is None else tensor.to(wire), dst=m.target)
                self.sent += tensor.nbytes
                self.message_bytes[kind] += tensor.nbytes
            elif m.target == self.rank:
                buffer = torch.empty(m.size, dtype=m.dtype, device=wire)
                dist.recv(buffer, src=m.source)
                received[m.key] = buffer.cpu()
        return received

    def rows(self, devices: int) -> tuple[int, int]:
        return self.rank * self.per, (self.rank + 1) * self.per

    @property
    def bytes_sent(self) -> int:
        """Payload bytes this rank has handed to collectives (each recipient counted once)."""
        return self.sent

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        dist.all_reduce(tensor)
        self.sent += tensor.nbytes
        return tensor

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        dist.broadcast(tensor, src=0)
        if self.rank == 0:
            self.sent += tensor.nbytes * (self.world - 1)
        return tensor

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor | None:
        blocks = [torch.empty_like(x) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(x.contiguous(), blocks, dst=0)
        if self.rank != 0:
            self.sent += x.nbytes
        return torch.cat(blocks) if blocks is not None else None

    def _block(self, rank: int) -> slice:
        return slice(rank * self.per, (rank + 1) * self.per)

    def mix(self, mixing: Mixing, round_: int, x: torch.Tensor) -> torch.Tensor:
        w = mixing.matrix(round_)
        mine = self._block(self.rank)
        own = torch.as_tensor(w[mine, mine], dtype=x.dtype, device=x.device) @ x
        if self.group is None:
            return own
        if self.exchange == "auto":
            self.exchange = "all_gather" if x.numel() <= ALL_GATHER_MAX_VALUES else "p2p"
        if self.exchange == "all_gather":
            blocks = [torch.empty_like(x) for _ in self.component_ranks]
            dist.all_gather(blocks, x.contiguous(), group=self.group)
            self.sent += x.nbytes * (len(self.component_ranks) - 1)
            first = self.component_ranks[0]
            cols = slice(first * self.per, (self.component_ranks[-1] + 1) * self.per)
            return torch.as_tensor(w[mine, cols], dtype=x.dtype, device=x.device) @ torch.cat(blocks)
        return own + self._mix_p2p(w, x)

    def _mix_p2p(self, w: np.ndarray, x: torch.Tensor) -> torch.Tensor:
        """Σ over component peers q of W[mine, q's needed rows] @ (those rows), sent point to point."""
        mine = self._block(self.rank)
        total = torch.zeros_like(x)
        for a in self.component_ranks:
            for b in self.component_ranks:
                if a >= b or self.rank not in (a, b):
                    continue
                peer = b if self.rank == a else a
                theirs = self._block(peer)
                # columns (rows of X) each side needs from the other: non-zero weights only
                need = np.flatnonzero(np.abs(w[mine, theirs]).sum(0))
                give = np.flatnonzero(np.abs(w[theirs, mine]).sum(0))
                received = torch.empty(len(need), x.shape[1], dtype=x.dtype, device=x.device)
                send = x[torch.as_tensor(give, dtype=torch.long, device=x.device)].contiguous()
                for action in ("send", "recv") if self.rank == a else ("recv", "send"):
                    if action == "send" and len(give):
                        dist.send(send, dst=peer)
                        self.sent += send.nbytes
                    elif action == "recv" and len(need):
                        dist.recv(received, src=peer)
                if len(need):
                    weights = torch.as_tensor(w[mine, theirs][:, need], dtype=x.dtype, device=x.device)
                    total += weights @ received
        return total


def init(timeout_s: float, device: str) -> str:
    """Join the process group torchrun set up; return the backend (gloo on CPU, nccl on CUDA)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ConfigError(
            "--engine distributed runs under torchrun, e.g. "
            "torchrun --standalone --nproc-per-node 2 -m neuroplast.federated --config FILE --out DIR --engine distributed"
        )
    backend = "nccl" if device in ("cuda", "auto") and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(seconds=timeout_s)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
    # torchrun keeps its store across restarts: without a prefix per attempt, restarted workers
    # read the dead workers' addresses and time out connecting to them
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"neuroplast/attempt{attempt}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return backend
