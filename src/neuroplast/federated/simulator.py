"""The semi-decentralized algorithm on stacked device models.

All device models live as the rows of one matrix X (devices x parameters). A round is

    local step:  X[i] <- X[i] - lr * (g_i(X[i]) + wd * X[i])    for every device, one vmap'd call
    D2D:         X <- W X                                      (one product; W block-diagonal)
    D2S (every H rounds): the server samples K of n uniformly without replacement, averages them
                 into x_S and sends it back to the K (s2s) or to all n (s2a, fedavg)

Nothing random is carried from round to round: the mini-batches of round t, the server's sample
and a dynamic graph are drawn from generators seeded by (seed, t). A process that holds any
block of rows (the distributed engine) draws the same numbers, and a resumed run needs only X.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from neuroplast.data import Dataset
from neuroplast.federated.comm import LocalComm
from neuroplast.federated.config import FederatedConfig
from neuroplast.federated.partition import Partition, two_level_dirichlet
from neuroplast.federated.topology import Mixing
from neuroplast.models import build_model

BYTES_PER_VALUE = 4  # float32 parameters on the wire
EVAL_SAMPLES_PER_CHUNK = 4096  # device-model x image forwards per vmap'd call


def build_federated_model(config: FederatedConfig, data: Dataset) -> nn.Module:
    torch.manual_seed(config.seed)  # every device, every rank: the same initial model
    model = build_model(
        config.model, data.image_shape, data.num_classes, hidden=config.hidden, cnn_hidden=config.cnn_hidden
    )
    if any(True for _ in model.buffers()):
        raise ValueError(f"model {config.model!r} has buffers (e.g. batch norm); stacked devices support none")
    return model


def split_for(config: FederatedConfig, data: Dataset) -> Partition:
    """The configured two-level Dirichlet split of `data`'s training set."""
    return two_level_dirichlet(
        data.y_train.numpy(),
        config.devices,
        config.components,
        config.alpha_inter,
        config.alpha_intra,
        config.min_size,
        config.seed,
        config.local_test_fraction,
    )


def round_generator(seed: int, round_: int, stream: int) -> torch.Generator:
    """A generator for one purpose (stream) in one round, the same in every process."""
    return torch.Generator().manual_seed((seed * 1_000_003 + round_) * 7 + stream)


def server_sample(seed: int, round_: int, devices: int, sampled: int) -> torch.Tensor:
    """The K devices the server samples after `round_`: uniform, without replacement."""
    return torch.randperm(devices, generator=round_generator(seed, round_, 0))[:sampled]


@dataclass
class Metrics:
    avg_test_accuracy: float  # the average model x̄ on the global test set
    device_test_accuracy: float  # mean over devices of their own model on the global test set
    local_test_accuracy: float  # mean over devices of their own model on their own local test set
    train_loss: float  # mean over devices of the round's mini-batch loss
    consensus_intra: float  # (1/n) Σ ||x_i - x̄_k(i)||²
    consensus_inter: float  # (1/n) Σ ||x̄_k(i) - x̄||²


class Federation:
    """n device models as rows of X, and the rounds that train and mix them.

    `comm` decides which rows this process holds and how reductions and D2D cross processes
    (see `comm.py`); by default one process holds every device.
    """

    def __init__(self, config: FederatedConfig, data: Dataset, comm=None, device: torch.device | str = "cpu"):
        self.config = config.validate()
        self.comm = comm or LocalComm()
        self.device = torch.device(device)
        self.data = data
        n = config.devices
        self.lo, self.hi = self.comm.rows(n)
        self.model = build_federated_model(config, data).to(self.device)
        self.names = [name for name, _ in self.model.named_parameters()]
        self.shapes = [p.shape for p in self.model.parameters()]
        self.sizes = [p.numel() for p in self.model.parameters()]
        x0 = nn.utils.parameters_to_vector(self.model.parameters()).detach()
        self.x = x0.repeat(self.hi - self.lo, 1).contiguous()
        self.parameters = x0.numel()
        # vmap batches matrix products well; convolutions with a weight per device become grouped
        # convolutions, which on CPU run slower than one device at a time (measured: 2.3x, CNN)
        has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in self.model.modules())
        self.vectorized = self.device.type == "cuda" or not has_conv
        self.x_train = data.x_train.reshape(len(data.x_train), -1).contiguous()  # rows for index_select
        self._batch_rows: torch.Tensor | None = None

        self.partition: Partition = split_for(config, data)
        # every device's training indices, concatenated; device i owns starts[i] : starts[i] + counts[i]
        counts = torch.tensor([len(p) for p in self.partition.train])
        self.train_counts = counts
        self.train_starts = torch.cumsum(counts, 0) - counts
        self.train_index = torch.from_numpy(np.concatenate(self.partition.train)).long()
        self.component_size = n // config.components
        self.component = torch.arange(n) // self.component_size
        self.mixing = Mixing(config.topology, n, config.components, config.seed, config.edge_probability, config.degree)
        g = torch.Generator().manual_seed(config.seed)
        eval_count = config.device_eval_samples or len(data.y_test)
        self.device_eval_index = torch.randperm(len(data.y_test), generator=g)[: min(eval_count, len(data.y_test))]
        self.bytes_d2d = 0
        self.bytes_d2s = 0
        self.last_loss = torch.zeros(self.hi - self.lo)

    # -- parameters as dicts of stacked tensors -----------------------------------------------
    def unflatten(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows (k x d) -> {name: k x *shape} views for functional_call."""
        out, offset = {}, 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes):
            out[name] = rows[:, offset : offset + size].unflatten(1, shape)
            offset += size
        return out

    def _loss(self, params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(self.model, params, (x,)), y)

    # -- one round --------------------------------------------------------------------------
    def batch_indices(self, round_: int, step: int) -> torch.Tensor:
        """(n, B) training-set indices of every device's mini-batch (uniform, with replacement)."""
        g = round_generator(self.config.seed, round_, 1 + step)
        u = torch.rand(self.config.devices, self.config.batch_size, generator=g, dtype=torch.float64)
        local = (u * self.train_counts[:, None]).long().clamp_max(self.train_counts[:, None] - 1)
        return self.train_index[self.train_starts[:, None] + local]

    def local_step(self, round_: int, step: int) -> None:
        self.x.sub_(self.gradients(round_, step), alpha=self.config.lr)

    def gradients(self, round_: int, step: int) -> torch.Tensor:
        """Every local device's mini-batch gradient (rows x d), weight decay included; the
        round's losses are kept for the metrics."""
        c = self.config
        index = self.batch_indices(round_, step)[self.lo : self.hi]
        flat = index.flatten()
        if self._batch_rows is None or len(self._batch_rows) != len(flat):
            self._batch_rows = torch.empty(len(flat), self.x_train.shape[1], dtype=self.x_train.dtype)
        # into a buffer kept across rounds: a fresh 40 MB tensor per round costs more in page faults
        # than the gather itself (measured 4.4 vs 22.6 ms, 100 devices x 128 images)
        torch.index_select(self.x_train, 0, flat, out=self._batch_rows)
        xb = self._batch_rows.view(*index.shape, *self.data.x_train.shape[1:]).to(self.device)
        yb = self.data.y_train[index].to(self.device)
        if self.vectorized:
            grads, losses = vmap(grad_and_value(self._loss))(self.unflatten(self.x), xb, yb)
            g = torch.cat([grads[name].flatten(1) for name in self.names], dim=1)
        else:  # one device at a time, reading and writing rows of X
            g = torch.empty_like(self.x)
            losses = torch.empty(len(self.x))
            step_one = grad_and_value(self._loss)
            for i in range(len(self.x)):
                grads, losses[i] = step_one(
                    {k: v[0] for k, v in self.unflatten(self.x[i : i + 1]).items()}, xb[i], yb[i]
                )
                g[i] = torch.cat([grads[name].flatten() for name in self.names])
        if c.weight_decay:
            g.add_(self.x, alpha=c.weight_decay)
        self.last_loss = losses.detach().cpu()
        return g

    def d2d(self, round_: int) -> None:
        if self.config.uses_d2d:
            self.x = self.comm.mix(self.mixing, round_, self.x)
            self.bytes_d2d += self.mixing.messages(round_) * self.parameters * BYTES_PER_VALUE

    def is_server_round(self, round_: int) -> bool:
        return self.config.uses_server and (round_ + 1) % self.config.period == 0

    def d2s(self, round_: int) -> None:
        c = self.config
        sample = server_sample(c.seed, round_, c.devices, c.sampled)
        weights = torch.zeros(c.devices, dtype=self.x.dtype, device=self.device)
        weights[sample.to(self.device)] = 1.0 / c.sampled
        local = weights[self.lo : self.hi]
        x_s = self.comm.all_reduce(local @ self.x)
        if c.server_sends_to_all:
            self.x[:] = x_s
        else:
            self.x[local > 0] = x_s
        received = c.devices if c.server_sends_to_all else c.sampled
        self.bytes_d2s += (c.sampled + received) * self.parameters * BYTES_PER_VALUE

    def round(self, round_: int) -> None:
        """Round t (0-based): local steps, D2D, and the server after rounds H-1, 2H-1, ..."""
        for step in range(self.config.local_steps):
            self.local_step(round_, step)
        self.d2d(round_)
        if self.is_server_round(round_):
            self.d2s(round_)

    # -- state a checkpoint holds ----------------------------------------------------------------
    def byte_counters(self) -> dict[str, int]:
        """Bytes on the wire so far, by kind (a checkpoint keeps them; every metrics line shows them)."""
        return {"bytes_d2d": self.bytes_d2d, "bytes_d2s": self.bytes_d2s}

    def set_byte_counters(self, counters: dict[str, int]) -> None:
        for key, value in counters.items():
            setattr(self, key, int(value))

    def row_state(self) -> dict[str, torch.Tensor]:
        """This process's rows of every per-device tensor a checkpoint holds."""
        return {"x": self.x}

    def load_row_state(self, rows: dict[str, torch.Tensor]) -> None:
        """Take this process's rows of the checkpoint's per-device tensors (all n rows given)."""
        self.x = rows["x"][self.lo : self.hi].to(self.x).clone()

    # -- metrics ------------------------------------------------------------------------------
    def two_level_spread(self, rows: torch.Tensor) -> tuple[float, float]:
        """(intra, inter) of vectors held as rows, one per device:
        intra = (1/n) Σ_i ||v_i - v̄_k(i)||², inter = (1/n) Σ_i ||v̄_k(i) - v̄||² (their sum is the
        total spread (1/n) Σ_i ||v_i - v̄||²)."""
        n, comps = self.config.devices, self.config.components
        local_component = self.component[self.lo : self.hi].to(rows.device)
        sums = torch.zeros(comps, rows.shape[1], dtype=torch.float64, device=rows.device)
        sums.index_add_(0, local_component, rows.double())
        means = self.comm.all_reduce(sums) / self.component_size
        overall = means.mean(0)
        intra = self.comm.all_reduce(((rows.double() - means[local_component]) ** 2).sum().reshape(1))
        inter = ((means - overall) ** 2).sum() * self.component_size
        return float(intra.item()) / n, float(inter.item()) / n

    def average_model(self) -> torch.Tensor:
        return self.comm.all_reduce(self.x.sum(0)) / self.config.devices

    @torch.no_grad()
    def _accuracy_of(self, vector: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
        params = {k: v[0] for k, v in self.unflatten(vector[None]).items()}
        correct = 0
        for s in range(0, len(y), EVAL_SAMPLES_PER_CHUNK):
            logits = functional_call(self.model, params, (x[s : s + EVAL_SAMPLES_PER_CHUNK].to(self.device),))
            correct += (logits.argmax(1).cpu() == y[s : s + EVAL_SAMPLES_PER_CHUNK]).sum().item()
        return correct / max(1, len(y))

    def _rows_forward(self, shared_input: bool):
        """forward(params, x) for a chunk of device models: vmap'd, or device by device for conv
        models on CPU (as in the local step; grouped convolutions are slower there)."""
        if self.vectorized:
            return vmap(lambda p, x: functional_call(self.model, p, (x,)), in_dims=(0, None if shared_input else 0))

        def forward(params: dict, x: torch.Tensor) -> torch.Tensor:
            rows = len(next(iter(params.values())))
            return torch.stack(
                [
                    functional_call(self.model, {k: v[i] for k, v in params.items()}, (x if shared_input else x[i],))
                    for i in range(rows)
                ]
            )

        return forward

    @torch.no_grad()
    def _shared_accuracies(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Accuracy of each local device model on the same images."""
        forward = self._rows_forward(shared_input=True)
        per_chunk = max(1, EVAL_SAMPLES_PER_CHUNK // len(y))
        x = x.to(self.device)
        return torch.cat(
            [
                (forward(self.unflatten(self.x[s : s + per_chunk]), x).argmax(-1).cpu() == y).double().mean(1)
                for s in range(0, len(self.x), per_chunk)
            ]
        )

    @torch.no_grad()
    def _own_accuracies(self, indices: list[np.ndarray]) -> torch.Tensor:
        """Accuracy of each local device model on its own training-set indices (padded per chunk)."""
        forward = self._rows_forward(shared_input=False)
        acc = torch.full((len(indices),), math.nan, dtype=torch.float64)
        per_chunk = max(1, EVAL_SAMPLES_PER_CHUNK // max(1, max(len(i) for i in indices)))
        for s in range(0, len(indices), per_chunk):
            chunk = [torch.from_numpy(i).long() for i in indices[s : s + per_chunk]]
            width = max(len(i) for i in chunk)
            if width == 0:
                continue
            padded = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.bool)
            for j, idx in enumerate(chunk):
                padded[j, : len(idx)] = idx
                mask[j, : len(idx)] = True
            x = self.x_train.index_select(0, padded.flatten()).view(*padded.shape, *self.data.x_train.shape[1:])
            logits = forward(self.unflatten(self.x[s : s + len(chunk)]), x.to(self.device))
            correct = ((logits.argmax(-1).cpu() == self.data.y_train[padded]) & mask).sum(1).double()
            counts = mask.sum(1)
            acc[s : s + len(chunk)] = torch.where(counts > 0, correct / counts.clamp_min(1), math.nan)
        return acc

    def evaluate(self) -> Metrics:
        n = self.config.devices
        x_bar = self.average_model()
        avg = self._accuracy_of(x_bar, self.data.x_test, self.data.y_test) if self.comm.rank == 0 else 0.0
        on_global = self._shared_accuracies(
            self.data.x_test[self.device_eval_index], self.data.y_test[self.device_eval_index]
        )
        on_local = self._own_accuracies(self.partition.local_test[self.lo : self.hi])
        has_local = ~on_local.isnan()
        sums = torch.stack(
            [on_global.sum(), on_local[has_local].sum(), has_local.sum().double(), self.last_loss.double().sum()]
        )
        sums = self.comm.all_reduce(sums.to(self.device)).cpu()
        intra, inter = self.two_level_spread(self.x)
        return Metrics(
            avg_test_accuracy=avg,
            device_test_accuracy=float(sums[0]) / n,
            local_test_accuracy=float(sums[1] / sums[2]) if sums[2] > 0 else math.nan,
            train_loss=float(sums[3]) / n,
            consensus_intra=intra,
            consensus_inter=inter,
        )

    # -- diagnostics at the initial model ----------------------------------------------------
    def heterogeneity(self) -> dict:
        """ζ̂²_inter = (1/C) Σ_k ||∇f_k - ∇f||² and ζ̂²_intra = (1/n) Σ_i ||∇f_i - ∇f_k(i)||² at the
        current (initial) model, from each device's full local training loss, plus the
        per-component label histograms."""
        grads = []
        for i in range(self.lo, self.hi):
            idx = torch.from_numpy(self.partition.train[i]).long()
            params = {
                k: v[0].detach().requires_grad_(True) for k, v in self.unflatten(self.x[i - self.lo][None]).items()
            }
            total = None
            for s in range(0, len(idx), EVAL_SAMPLES_PER_CHUNK):
                part = idx[s : s + EVAL_SAMPLES_PER_CHUNK]
                loss = self._loss(
                    params, self.data.x_train[part].to(self.device), self.data.y_train[part].to(self.device)
                )
                g = torch.autograd.grad(loss * len(part) / len(idx), list(params.values()))
                flat = torch.cat([t.flatten() for t in g])
                total = flat if total is None else total + flat
            grads.append(total)
        intra, inter = self.two_level_spread(torch.stack(grads))
        # inter above is (1/n) Σ_i ||∇f_k(i) - ∇f||², which equals (1/C) Σ_k ||∇f_k - ∇f||² (equal components)
        hist = self.partition.component_histograms(self.data.y_train.numpy(), self.data.num_classes)
        sizes = [len(p) for p in self.partition.train]
        return {
            "zeta2_intra": intra,
            "zeta2_inter": inter,
            "component_label_histograms": hist.tolist(),
            "device_train_sizes": sizes,
            "device_local_test_sizes": [len(p) for p in self.partition.local_test],
            "partition_draws": self.partition.tries,
            "spectral_gaps": self.mixing.spectral_gaps(0) if self.config.uses_d2d else None,
            "parameters": self.parameters,
        }
