"""Sparse devices: every device holds a sparse model, trains it with dynamic sparse training
between communication rounds, and only its live weights go on the wire.

Next to the stacked parameters X (devices x d) sits a mask M of the same shape: True where a
weight is live. Positions outside the weights of the layers `sparsify` chose (biases, layers
kept dense by the distribution) are always live. X is exactly zero off the mask, and every rule
below keeps each device's live count per layer exactly what `sparsify` gave it.

Masks (`masks`):

- `per-device` (DisPFL-style): each device rewires its own mask with any DST preset of the engine
  (`dst_method`, every `dst_every` rounds). The engine works on `scratch`, one sparsified copy of
  the model that serves every device in turn: the device's weights and mask go in, the preset's
  signals are gathered, the engine drops and grows, and the weights and mask come back. Every
  signal comes from the device's mini-batch of the round's last local step (the batch
  `batch_indices` draws for it, so the simulator and the torchrun engine gather the same): the
  dense gradient (RigL, SNFS's momentum) and the live gradient (MEST) are that step's gradient,
  weight decay included; the signals hooks gather (CTRE's activations, WAST's and DAST's neuron
  importance, DAST2's activation and error magnitudes and its exact gradient at candidates) come
  from one forward and backward of that batch through `scratch` at the device's weights after the
  step. No signal state carries across devices or rounds: the signals start anew for each device
  (a momentum or moving average holds that one batch), and so do the engine's record of the last
  growth (DAST2's protection of new connections never applies) and its history. Growth shared
  across layers (SNFS's by momentum, DAST2's by attention) is off: each layer grows what it
  dropped. CTRE-seq's switch to random growth watches epochs, which devices do not report, so
  it never switches.

  Mixing never changes a mask: a device averages each of its live weights over the neighbours
  (or the sampled devices) that hold that weight live, with their mixing weights renormalised,

      x_i[k] <- sum_j W_ij m_j[k] x_j[k] / sum_j W_ij m_j[k]      for k live on i,

  which is the plain average W X when the masks agree (the device itself always counts, so the
  denominator is never zero). The server averages the K sampled models the same way (each
  position over the sampled devices holding it) and sends every receiver the values at its own
  live positions; a position no sampled device holds keeps the receiver's value.
- `shared` (FedDST-style): one mask, changed only by the server. Devices train on it and mix by
  W X. At server rounds while the preset's schedule runs, the server drops, per layer, the
  fraction f of live weights (the preset's drop fraction and anneal, counted in rounds) with
  the smallest |x_S|, and grows as many where the sampled devices' gradients are largest: each
  sampled device proposes its r_l largest |gradient| positions outside the mask, the server sums
  the proposals and takes the r_l best. New weights start at zero; every device receives the
  change (indices), the receivers of x_S its values. Only the preset's schedule is used here:
  whatever its criteria, the server drops by magnitude and grows by the proposals.

On the wire (all counted exactly, per message, from the payloads the engine sends): float32
values of the live weights, and for per-device masks the live positions of the sparse layers
as a bitmap or as int32 flat indices, whichever is smaller (a bitmap below 1/32 density costs
more). A shared mask travels only as its changes (int32 indices). Under the torchrun engine
every message is a real point-to-point send of these bytes.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from neuroplast.data import Dataset
from neuroplast.dst import DSTEngine, preset
from neuroplast.dst.signals import SIGNALS
from neuroplast.federated.comm import Message
from neuroplast.federated.config import FederatedConfig
from neuroplast.federated.simulator import BYTES_PER_VALUE, Federation, server_sample
from neuroplast.sparse import sparsify

INDEX_BYTES = 4  # int32 flat indices
SERVER_PROCESS = 0  # the process that plays the server (it also hosts its own devices)
# growth shared across layers (SNFS by momentum, DAST2 by attention) would move live weights between
# layers; on devices every layer keeps the live count `sparsify` gave it, so each grows what it dropped
PER_LAYER_GROWTH = {"redistribute": False, "redistribute_attention": False}
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.long)


@dataclass(frozen=True)
class WireFormat:
    """What one device's sparse model costs on the wire."""

    live: int  # live values: the sparse layers' live weights and every other parameter
    maskable: int  # positions of the sparse layers' weights
    live_maskable: int  # ... of them live
    shared: bool  # a shared mask is known to everyone: no indices travel with a model

    @property
    def index_encoding(self) -> str:
        if self.shared:
            return "none"
        return "bitmap" if math.ceil(self.maskable / 8) <= INDEX_BYTES * self.live_maskable else "int32"

    @property
    def index_bytes(self) -> int:
        """Bytes of one device's live positions (its mask) on the wire."""
        sizes = {"none": 0, "bitmap": math.ceil(self.maskable / 8), "int32": INDEX_BYTES * self.live_maskable}
        return sizes[self.index_encoding]

    @property
    def values_bytes(self) -> int:
        return BYTES_PER_VALUE * self.live

    @property
    def model_bytes(self) -> int:
        """One device's model: its live values and, unless the mask is shared, where they are."""
        return self.values_bytes + self.index_bytes


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """A bool vector as bytes, eight positions a byte, most significant bit first."""
    padded = torch.cat([bits.cpu(), bits.new_zeros((-len(bits)) % 8, device="cpu")]).view(-1, 8).long()
    return (padded * _BIT_WEIGHTS).sum(1).to(torch.uint8)


def unpack_bits(code: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` positions of `pack_bits`' bytes, as bools."""
    return ((code.long()[:, None] >> (7 - torch.arange(8))) & 1).flatten()[:count].bool()


def as_bytes(*tensors: torch.Tensor) -> torch.Tensor:
    """Tensors laid end to end as one byte payload."""
    return torch.cat([t.detach().cpu().contiguous().view(torch.uint8) for t in tensors])


class SparseFederation(Federation):
    """`Federation` with sparse device models (see the module docstring for the rules)."""

    def __init__(self, config: FederatedConfig, data: Dataset, comm=None, device: torch.device | str = "cpu"):
        super().__init__(config, data, comm, device)
        c = self.config
        self.shared = c.masks == "shared"
        # the plain model runs the stacked rows (zero off the mask); its sparsified copy carries the
        # masks `sparsify` draws and is the module the DST engine rewires one device at a time
        self.scratch = copy.deepcopy(self.model)
        generator = torch.Generator().manual_seed(c.seed)
        self.topology = sparsify(self.scratch, c.density, c.sparse_distribution, generator=generator)
        names = {id(p): name for name, p in self.scratch.named_parameters()}
        starts = dict(zip(self.names, itertools.accumulate([0, *self.sizes])))
        self._spans = [(starts[name], p.numel()) for name, p in self.scratch.named_parameters()]
        self.maskable = torch.zeros(self.parameters, dtype=torch.bool, device=self.device)
        mask = torch.ones(self.parameters, dtype=torch.bool, device=self.device)
        self.layer_slices: dict[str, slice] = {}
        for name, layer in self.topology.layers.items():
            start = starts[names[id(layer.parameter)]]
            where = slice(start, start + layer.size)
            self.layer_slices[name] = where
            self.maskable[where] = True
            mask[where] = layer.weight_mask.flatten()
        self.layer_nnz = {name: layer.nnz for name, layer in self.topology.layers.items()}
        x0 = nn.utils.parameters_to_vector(self.scratch.parameters()).detach().to(self.device)
        self.x = x0.repeat(self.hi - self.lo, 1).contiguous()
        self.mask = mask.repeat(self.hi - self.lo, 1)
        self.wire = WireFormat(
            int(mask.sum()), int(self.maskable.sum()), int(mask[self.maskable].sum()), shared=self.shared
        )
        self.algorithm = preset(c.dst_method, update_every=c.dst_every, **PER_LAYER_GROWTH)
        # the schedule counts rounds: a device rewires every dst_every rounds, a shared mask at server rounds
        self.schedule = self.algorithm.schedule.at(total_steps=c.rounds, steps_per_epoch=c.dst_every)
        self.engine = (
            DSTEngine(self.topology, self.algorithm, c.rounds, c.dst_every, c.seed)
            if self.algorithm.rewires and not self.shared
            else None
        )
        self.last_grad = torch.zeros_like(self.x)
        self.dense_bytes_d2d = 0
        self.dense_bytes_d2s = 0

    # -- a round --------------------------------------------------------------------------------
    def local_step(self, round_: int, step: int) -> None:
        self.last_grad = self.gradients(round_, step)  # dense: the growth signal of the next rewiring
        self.x.sub_(self.last_grad * self.mask, alpha=self.config.lr)

    def round(self, round_: int) -> None:
        for step in range(self.config.local_steps):
            self.local_step(round_, step)
        if self.engine is not None and self.schedule.is_update_step(round_ + 1):
            self.rewire_devices(round_)
        self.d2d(round_)
        if self.is_server_round(round_):
            self.d2s(round_)

    @torch.no_grad()
    def rewire_devices(self, round_: int) -> None:
        """Every local device's topology update by the DST engine: its weights, mask and last
        gradient go into the sparsified module, the engine gathers the preset's other signals
        from the device's last mini-batch of the round, drops and grows, and the result comes back."""
        layers = self.topology.layers
        engine = self.engine
        # hook-gathered signals (importance, activity, activations) need a pass through the module;
        # a signal read from the layers' dense gradient (momentum) is fed the local step's gradient
        needs_pass = any(not getattr(s, "dense_grad_every_step", False) for s in engine.signals.values())
        batch = self.batch_indices(round_, self.config.local_steps - 1) if needs_pass else None
        for row in range(len(self.x)):
            if needs_pass:
                self._load_scratch(row)
            for name, layer in layers.items():
                where = self.layer_slices[name]
                layer.weight.view(-1).copy_(self.x[row, where])
                layer.weight_mask.view(-1).copy_(self.mask[row, where])
            if engine.signals:
                self._fresh_signals()  # one module serves every device: no signal state across them
            if needs_pass:
                self._signal_pass(batch[self.lo + row])
            for name, layer in layers.items():
                grad = self.last_grad[row, self.layer_slices[name]].view_as(layer.weight).clone()
                layer.dense_grad, layer.weight.grad = grad, grad.clone()  # RigL's and MEST's signals
            for signal in engine.signals.values():
                signal.update()  # fold in the batch, as after a training step
            engine.step_count = round_ + 1  # the schedule's fraction and progress, in rounds
            engine.generator.manual_seed(self._device_seed(round_, self.lo + row))
            engine.update()
            engine.history.clear()  # one module serves every device: no history across them
            engine.last_grown.clear()
            for name, layer in layers.items():
                where = self.layer_slices[name]
                self.x[row, where] = layer.weight.view(-1)
                self.mask[row, where] = layer.weight_mask.view(-1)
                layer.weight.grad = None

    @torch.no_grad()
    def _load_scratch(self, row: int) -> None:
        """Every parameter of the sparsified module from a local device's row of X."""
        for parameter, (start, size) in zip(self.scratch.parameters(), self._spans):
            parameter.view(-1).copy_(self.x[row, start : start + size])

    def _fresh_signals(self) -> None:
        """The engine's signals started anew (their hooks moved to the new ones)."""
        engine = self.engine
        for signal in engine.signals.values():
            signal.remove()
        engine.signals = {name: SIGNALS[name](self.topology.layers, **engine.needs[name]) for name in engine.signals}

    def _signal_pass(self, index: torch.Tensor) -> None:
        """Forward and backward of one device's mini-batch (training-set indices) through the
        sparsified module, its weights loaded: the engine's hooks see activations and errors."""
        images = self.x_train[index].view(len(index), *self.data.x_train.shape[1:]).to(self.device)
        labels = self.data.y_train[index].to(self.device)
        self.scratch.train()
        with torch.enable_grad():
            F.cross_entropy(self.scratch(images), labels).backward()
        for parameter in self.scratch.parameters():
            parameter.grad = None

    def _device_seed(self, round_: int, device: int) -> int:
        return ((self.config.seed * 1_000_003 + round_) * 1_000_033 + device) % (2**63)

    # -- device to device -----------------------------------------------------------------------
    def d2d(self, round_: int) -> None:
        if not self.config.uses_d2d:
            return
        if self.comm.world == 1:
            models, masks = self.x, self.mask
            mixed = self.mixing.apply(round_, models)
            holders = None if self.shared else self.mixing.apply(round_, masks.to(models.dtype))
        else:
            w = self.mixing.matrix(round_)
            models, masks = self._neighbour_models(w)
            mine = torch.as_tensor(w[self.lo : self.hi], dtype=self.x.dtype, device=self.device)
            mixed = mine @ models
            holders = None if self.shared else mine @ masks.to(models.dtype)
        # a shared mask: W X is zero off the mask already; per-device: renormalised over holders
        self.x = mixed if holders is None else torch.where(self.mask, mixed / holders, 0.0)
        messages = self.mixing.messages(round_)
        self.bytes_d2d += messages * self.wire.model_bytes
        self.dense_bytes_d2d += messages * self.parameters * BYTES_PER_VALUE

    def _neighbour_models(self, w: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """All n rows of X and M as far as this process needs them: its own rows, and each
        neighbour's model decoded from the message that neighbour sent (zero elsewhere)."""
        n = self.config.devices
        edges = sorted((int(j), int(i)) for i, j in zip(*np.nonzero(w)) if i != j)
        plan, payloads, encoded = [], {}, {}
        for j, i in edges:
            source, target = self.comm.owner(j), self.comm.owner(i)
            plan.append(Message("d2d", (j, i), source, target, self.wire.model_bytes, torch.uint8))
            if source == self.comm.rank:
                if j not in encoded:
                    encoded[j] = self.encode_model(j - self.lo)
                payloads[(j, i)] = encoded[j]
        received = self.comm.deliver(plan, payloads)
        models = torch.zeros(n, self.parameters, dtype=self.x.dtype, device=self.device)
        masks = torch.zeros(n, self.parameters, dtype=torch.bool, device=self.device)
        models[self.lo : self.hi], masks[self.lo : self.hi] = self.x, self.mask
        for (j, _), payload in received.items():
            if not self.lo <= j < self.hi:
                models[j], masks[j] = self.decode_model(payload)
        return models, masks

    # -- the wire format --------------------------------------------------------------------------
    def encode_model(self, row: int) -> torch.Tensor:
        """One local device's model as its message: live values, then (per-device masks) where they are."""
        mask = self.mask[row]
        values = self.x[row][mask].float()
        return as_bytes(values, self.encode_mask(row))

    def encode_mask(self, row: int) -> torch.Tensor:
        live = self.mask[row][self.maskable]
        if self.wire.index_encoding == "bitmap":
            return pack_bits(live)
        if self.wire.index_encoding == "int32":
            return live.nonzero().squeeze(1).int()
        return torch.empty(0, dtype=torch.uint8)

    def decode_mask(self, code: torch.Tensor) -> torch.Tensor:
        """A device's full mask (d) from its encoded live positions (or the shared mask)."""
        if self.wire.index_encoding == "none":
            return self.mask[0].clone()
        mask = torch.ones(self.parameters, dtype=torch.bool)
        if self.wire.index_encoding == "bitmap":
            live = unpack_bits(code, self.wire.maskable)
        else:
            live = torch.zeros(self.wire.maskable, dtype=torch.bool)
            live[code.view(torch.int32).long()] = True
        mask[self.maskable.cpu()] = live
        return mask.to(self.device)

    def decode_model(self, payload: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(model row, mask row) from a model message."""
        mask = self.decode_mask(payload[self.wire.values_bytes :])
        model = torch.zeros(self.parameters, dtype=self.x.dtype, device=self.device)
        model[mask] = payload[: self.wire.values_bytes].view(torch.float32).to(model)
        return model, mask

    # -- device to server -------------------------------------------------------------------------
    def server_drop_counts(self, round_: int) -> dict[str, int]:
        """Shared mask: how many live weights per layer the server moves after `round_` (none
        when the schedule is over or the mask is per-device)."""
        if not self.shared or not self.algorithm.rewires or round_ + 1 >= self.schedule.end:
            return {}
        fraction = self.schedule.fraction_at(round_ + 1)
        counts = {
            name: min(math.floor(fraction * nnz), self.topology.layers[name].size - nnz)
            for name, nnz in self.layer_nnz.items()
        }
        return counts if sum(counts.values()) else {}

    def d2s(self, round_: int) -> None:
        c = self.config
        sample = sorted(server_sample(c.seed, round_, c.devices, c.sampled).tolist())
        receivers = list(range(c.devices)) if c.server_sends_to_all else sample
        receiving = set(receivers)
        counts = self.server_drop_counts(round_)
        moved = sum(counts.values())
        owner = self.comm.owner

        def local(device: int) -> bool:
            return self.lo <= device < self.hi

        # uploads: the sampled models (with growth proposals when a shared mask moves), and the
        # masks of receivers the server has not seen (per-device masks, sampled-to-all)
        upload = self.wire.model_bytes + 2 * INDEX_BYTES * moved
        plan = [Message("d2s", ("model", j), owner(j), SERVER_PROCESS, upload, torch.uint8) for j in sample]
        unseen = [i for i in receivers if i not in sample and not self.shared]
        plan += [
            Message("d2s", ("mask", i), owner(i), SERVER_PROCESS, self.wire.index_bytes, torch.uint8) for i in unseen
        ]
        payloads = {}
        for j in sample:
            if local(j):
                payloads[("model", j)] = as_bytes(self.encode_model(j - self.lo), *self._proposals(j - self.lo, counts))
        for i in unseen:
            if local(i):
                payloads[("mask", i)] = as_bytes(self.encode_mask(i - self.lo))
        uploaded = self.comm.deliver(plan, payloads)
        served = self._serve(uploaded, sample, receivers, counts) if self.comm.rank == SERVER_PROCESS else {}
        # downloads: the mask's change to every device (shared), x_S's values to the receivers
        sizes = {
            i: 2 * INDEX_BYTES * moved + (self.wire.values_bytes if i in receiving else 0) for i in range(c.devices)
        }
        down = [Message("d2s", ("down", i), SERVER_PROCESS, owner(i), s, torch.uint8) for i, s in sizes.items() if s]
        for (_, i), payload in self.comm.deliver(down, served).items():
            self._receive(i - self.lo, payload, i in receiving, moved)
        self.bytes_d2s += sum(m.size for m in plan + down)
        self.dense_bytes_d2s += (c.sampled + len(receivers)) * self.parameters * BYTES_PER_VALUE

    def _proposals(self, row: int, counts: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A device's growth proposals for a moving shared mask: per layer, its r_l largest
        |gradient| positions outside the mask (scores float32, then flat indices int32)."""
        scores, where = [], []
        for name, count in counts.items():
            span = self.layer_slices[name]
            grad = self.last_grad[row, span].abs().float().masked_fill(self.mask[row, span], -math.inf)
            top = torch.topk(grad, count)
            scores.append(top.values)
            where.append(top.indices + span.start)
        if not counts:
            return torch.empty(0), torch.empty(0, dtype=torch.int32)
        return torch.cat(scores), torch.cat(where).int()

    @torch.no_grad()
    def _serve(self, uploaded: dict, sample: list[int], receivers: list[int], counts: dict[str, int]) -> dict:
        """The server: average the uploads, move a shared mask, and write every download."""
        moved = sum(counts.values())
        models, masks, proposals = {}, {}, []
        for j in sample:
            payload = uploaded[("model", j)]
            models[j], masks[j] = self.decode_model(payload[: self.wire.model_bytes])
            extra = payload[self.wire.model_bytes :].clone()  # a bitmap may leave it off 4-byte alignment
            proposals.append((extra[: 4 * moved].view(torch.float32), extra[4 * moved :].view(torch.int32).long()))
        total = torch.stack([models[j] for j in sample]).sum(0)
        if self.shared:
            average = total / len(sample)
            mask = masks[sample[0]].clone()
            dropped, grown = self._move_mask(average, mask, counts, proposals)
            mask[dropped], mask[grown] = False, True
            average[dropped] = 0.0
            change = as_bytes(dropped.int(), grown.int())
            return {
                ("down", i): torch.cat([change, as_bytes(average[mask].float())]) if i in receivers else change
                for i in range(self.config.devices)
                if moved or i in receivers
            }
        holders = torch.stack([masks[j] for j in sample]).to(total.dtype).sum(0)
        average = total / holders  # NaN where no sampled device holds a position: the receiver keeps its own
        for i in receivers:
            if i not in masks:
                masks[i] = self.decode_mask(uploaded[("mask", i)])
        return {("down", i): as_bytes(average[masks[i]].float()) for i in receivers}

    def _move_mask(
        self, average: torch.Tensor, mask: torch.Tensor, counts: dict[str, int], proposals: list
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(dropped, grown) flat indices: per layer the r_l smallest |x_S| among the live, and the
        r_l best summed proposal scores outside the mask."""
        dropped, grown = [], []
        score = torch.zeros(self.parameters, dtype=torch.float64)
        for values, where in proposals:
            score.index_add_(0, where, values.double())
        for name, count in counts.items():
            span = self.layer_slices[name]
            live = mask[span].nonzero().squeeze(1)
            drop = live[torch.topk(average[span][live].abs(), count, largest=False).indices]
            candidates = score[span].masked_fill(mask[span].cpu(), -math.inf)
            grow = torch.topk(candidates, count).indices.to(drop.device)
            dropped.append(drop + span.start)
            grown.append(grow + span.start)
        if not counts:
            empty = torch.empty(0, dtype=torch.long, device=self.device)
            return empty, empty
        return torch.cat(dropped), torch.cat(grown)

    def _receive(self, row: int, payload: torch.Tensor, receives_model: bool, moved: int) -> None:
        """A local device takes the server's message."""
        payload = payload.to(self.device)
        if self.shared:
            change = payload[: 2 * INDEX_BYTES * moved].view(torch.int32).long()
            dropped, grown = change[:moved], change[moved:]
            self.mask[row, dropped] = False
            self.mask[row, grown] = True
            if receives_model:
                model = torch.zeros_like(self.x[row])
                model[self.mask[row]] = payload[2 * INDEX_BYTES * moved :].view(torch.float32).to(model)
                self.x[row] = model
            else:
                self.x[row, dropped] = 0.0
            return
        values = payload.view(torch.float32).to(self.x)
        mine = self.x[row][self.mask[row]]
        self.x[row, self.mask[row]] = torch.where(values.isnan(), mine, values)

    # -- state and reporting ----------------------------------------------------------------------
    def byte_counters(self) -> dict[str, int]:
        return {
            **super().byte_counters(),
            "dense_bytes_d2d": self.dense_bytes_d2d,  # what dense models would have sent
            "dense_bytes_d2s": self.dense_bytes_d2s,
        }

    def row_state(self) -> dict[str, torch.Tensor]:
        return {"x": self.x, "mask": self.mask.to(torch.uint8)}

    def load_row_state(self, rows: dict[str, torch.Tensor]) -> None:
        super().load_row_state(rows)
        self.mask = rows["mask"][self.lo : self.hi].to(self.device).bool()

    def live_counts(self) -> torch.Tensor:
        """(local devices x sparse layers) live weights, in the topology's layer order."""
        return torch.stack([self.mask[:, where].sum(1) for where in self.layer_slices.values()], dim=1)

    def describe_sparsity(self) -> dict:
        """The sparse setting and what one model costs on the wire, for the run's summary."""
        return {
            "density": self.config.density,
            "masks": self.config.masks,
            "dst_method": self.config.dst_method,
            "layers": {name: [nnz, self.topology.layers[name].size] for name, nnz in self.layer_nnz.items()},
            "live_values": self.wire.live,
            "index_encoding": self.wire.index_encoding,
            "model_bytes": self.wire.model_bytes,
            "dense_model_bytes": self.parameters * BYTES_PER_VALUE,
        }
