"""The reference: one ordinary module and optimizer per device, mixed parameter by parameter.

This is how one would write the algorithm without stacking: a Python loop over devices for the
local step (`torch.optim.SGD`), over each device's neighbours for D2D and over the sampled devices
for the server. It shares only the data pipeline (the same mini-batch indices and server sample
per round) with `Federation`, so the simulator is tested against it, and the benchmark measures
the simulator against it.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from neuroplast.data import Dataset
from neuroplast.federated.config import FederatedConfig
from neuroplast.federated.simulator import build_federated_model, round_generator, server_sample, split_for
from neuroplast.federated.topology import Mixing


class PerDeviceLoop:
    def __init__(self, config: FederatedConfig, data: Dataset):
        self.config = config.validate()
        self.data = data
        model = build_federated_model(config, data)
        self.models = [copy.deepcopy(model) for _ in range(config.devices)]
        self.optimizers = [
            torch.optim.SGD(m.parameters(), lr=config.lr, weight_decay=config.weight_decay) for m in self.models
        ]
        self.train = [torch.from_numpy(p).long() for p in split_for(config, data).train]
        self.mixing = Mixing(
            config.topology, config.devices, config.components, config.seed, config.edge_probability, config.degree
        )

    def _batch(self, device: int, uniform: torch.Tensor) -> torch.Tensor:
        count = len(self.train[device])
        return self.train[device][(uniform[device] * count).long().clamp_max(count - 1)]

    def round(self, round_: int) -> None:
        c = self.config
        for step in range(c.local_steps):
            # the same draw as Federation.batch_indices: one (n, B) uniform table per round and step
            g = round_generator(c.seed, round_, 1 + step)
            uniform = torch.rand(c.devices, c.batch_size, generator=g, dtype=torch.float64)
            for i, (model, optimizer) in enumerate(zip(self.models, self.optimizers)):
                idx = self._batch(i, uniform)
                optimizer.zero_grad()
                F.cross_entropy(model(self.data.x_train[idx]), self.data.y_train[idx]).backward()
                optimizer.step()
        with torch.no_grad():
            if c.uses_d2d:
                w = self.mixing.matrix(round_)
                params = [[p.clone() for p in m.parameters()] for m in self.models]
                for i, model in enumerate(self.models):
                    for k, p in enumerate(model.parameters()):
                        p.copy_(sum(float(w[i, j]) * params[j][k] for j in range(c.devices) if w[i, j] != 0))
            if c.uses_server and (round_ + 1) % c.period == 0:
                sample = server_sample(c.seed, round_, c.devices, c.sampled).tolist()
                average = [
                    sum(list(self.models[j].parameters())[k] for j in sample) / c.sampled
                    for k in range(len(list(self.models[0].parameters())))
                ]
                targets = range(c.devices) if c.server_sends_to_all else sample
                for i in targets:
                    for p, a in zip(self.models[i].parameters(), average):
                        p.copy_(a)

    def stacked(self) -> torch.Tensor:
        """The device parameters as rows (n x d), in the simulator's layout."""
        return torch.stack([torch.nn.utils.parameters_to_vector(m.parameters()) for m in self.models]).detach()
