"""The DST engine: an algorithm (schedule + drop criterion + grow criterion) applied to a
`Topology` during training.

Use it in a plain PyTorch loop::

    topology = sparsify(model, density=0.05)
    topology.attach(optimizer)
    engine = DSTEngine(topology, preset("rigl"), total_steps=epochs * len(loader),
                       steps_per_epoch=len(loader))
    for x, y in loader:
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        engine.step()   # counts the step; rewires the topology when the schedule says so

On an update step the engine drops, grows, zeroes dropped weights, initialises grown ones and
resets the optimizer state at every changed position. Growth may pick a just-dropped position:
for RigL (`regrown_is_kept`) it then counts as kept, value and optimizer state unchanged, as in
RigL's reference code; for SET it is a new connection (value 0, fresh state).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from neuroplast.dst.criteria import DROP_CRITERIA, GROW_CRITERIA, GROW_NEEDS, LayerSignals
from neuroplast.dst.schedules import Schedule
from neuroplast.sparse.topology import Topology


@dataclass(frozen=True)
class Algorithm:
    """A named combination of schedule, drop criterion and grow criterion.

    update_every: "epoch" or a number of optimizer steps.
    end_fraction: no update at or after this fraction of all training steps (RigL's T_end).
    fraction: drop fraction (SET's zeta, RigL's alpha); anneal: "constant" or "cosine".
    drop/grow: keys of DROP_CRITERIA / GROW_CRITERIA; None for a topology that never changes.
    """

    name: str
    drop: str | None = None
    grow: str | None = None
    update_every: str | int = "epoch"
    end_fraction: float = 1.0
    fraction: float = 0.3
    anneal: str = "constant"
    regrown_is_kept: bool = False  # RigL: a just-dropped position regrown is kept unchanged

    @property
    def rewires(self) -> bool:
        return self.drop is not None

    def schedule(self, total_steps: int, steps_per_epoch: int) -> Schedule:
        every = steps_per_epoch if self.update_every == "epoch" else int(self.update_every)
        end = math.floor(self.end_fraction * total_steps) if self.end_fraction < 1 else total_steps
        return Schedule(every=every, end=end, fraction=self.fraction, anneal=self.anneal)


@dataclass
class LayerUpdate:
    name: str
    live: int
    dropped: int
    grown: int
    r_s: float


@dataclass
class UpdateRecord:
    step: int
    fraction: float
    layers: list[LayerUpdate] = field(default_factory=list)


class DSTEngine:
    def __init__(
        self,
        topology: Topology,
        algorithm: Algorithm,
        total_steps: int,
        steps_per_epoch: int,
        seed: int = 0,
    ):
        if algorithm.rewires:
            if algorithm.drop not in DROP_CRITERIA:
                raise ValueError(f"unknown drop criterion {algorithm.drop!r}; choose from: {', '.join(DROP_CRITERIA)}")
            if algorithm.grow not in GROW_CRITERIA:
                raise ValueError(f"unknown grow criterion {algorithm.grow!r}; choose from: {', '.join(GROW_CRITERIA)}")
        self.topology = topology
        self.algorithm = algorithm
        self.schedule = algorithm.schedule(total_steps, steps_per_epoch)
        self.generator = torch.Generator().manual_seed(seed)
        self.step_count = 0
        self.history: list[UpdateRecord] = []
        self._arm()

    def _arm(self) -> None:
        """Ask the layers to keep the dense gradient of the next backward if an update that
        needs it follows that backward."""
        needs_grad = self.algorithm.rewires and "dense_grad" in GROW_NEEDS[self.algorithm.grow]
        self.topology.capture_dense_grad = needs_grad and self.schedule.is_update_step(self.step_count + 1)

    def step(self) -> bool:
        """Call once after each `optimizer.step()`. Returns True if the topology changed."""
        if self.algorithm.rewires and not self.topology.optimizers:
            raise RuntimeError(
                "no optimizer is attached to the topology: call topology.attach(optimizer) before training, "
                "so pruned weights stay zero and rewiring keeps the optimizer state right"
            )
        self.step_count += 1
        updated = self.algorithm.rewires and self.schedule.is_update_step(self.step_count)
        if updated:
            self.update()
        self._arm()
        return updated

    @torch.no_grad()
    def update(self) -> UpdateRecord:
        """Drop and regrow every sparse layer now (the schedule decides how much)."""
        drop = DROP_CRITERIA[self.algorithm.drop]
        grow = GROW_CRITERIA[self.algorithm.grow]
        fraction = self.schedule.fraction_at(self.step_count)
        record = UpdateRecord(step=self.step_count, fraction=fraction)
        for name, layer in self.topology.layers.items():
            dropped = grown = torch.empty(0, dtype=torch.long)
            if layer.nnz < layer.size:  # a layer kept dense (e.g. by ERK) has nowhere to grow
                values, flat = layer.live()
                dropped = flat[drop(values, fraction, self.generator)]
                candidates = layer.candidates(dropped)
                signals = LayerSignals(dense_grad_chunks=layer.dense_grad_chunks)
                grown = grow(signals, candidates, dropped.numel(), self.generator).to(dropped.device)
                if self.algorithm.regrown_is_kept:
                    regrown = torch.isin(grown, dropped)
                    dropped = dropped[~torch.isin(dropped, grown)]
                    grown = grown[~regrown]
                layer.rewire(dropped, grown, self.topology.optimizers)
            record.layers.append(LayerUpdate(name, layer.nnz, dropped.numel(), grown.numel(), layer.r_s()))
        self.topology.clear_signals()
        self.history.append(record)
        return record

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step_count": self.step_count,
            "generator": self.generator.get_state(),
            "history": [asdict(r) for r in self.history],
        }

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.generator.set_state(state["generator"])
        self.history = [
            UpdateRecord(r["step"], r["fraction"], [LayerUpdate(**l) for l in r["layers"]]) for r in state["history"]
        ]
        self._arm()
