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

Signals beyond the weights are gathered only for the algorithms that need them: the dense
gradient of an update step (RigL), a dense gradient momentum (SNFS), neuron activations (CTRE),
neuron importance (WAST, DAST); see `dst/signals.py`. Every update records, per layer, ITOP's
R_s and the survival of the previous update's regrown connections (the share of them this
update did not drop).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch

from neuroplast.dst.criteria import DROP_CRITERIA, DROP_NEEDS, GROW_CRITERIA, GROW_NEEDS, LayerSignals
from neuroplast.dst.schedules import ANNEALS, Schedule, cosine
from neuroplast.dst.signals import ActivationBuffer, DenseMomentum, NeuronImportance
from neuroplast.sparse.topology import Topology


@dataclass(frozen=True)
class Algorithm:
    """A named combination of schedule, drop criterion and grow criterion, with their knobs.

    update_every: "epoch" or a number of optimizer steps.
    end_fraction: no update at or after this fraction of all training steps (RigL's T_end).
    fraction: drop fraction (SET's zeta, RigL's alpha); anneal: "constant", "cosine" (down to
        fraction_end) or "step" (times each (fraction of training, multiplier) milestone).
    drop/grow: keys of DROP_CRITERIA / GROW_CRITERIA; None for a topology that never changes.
    """

    name: str
    drop: str | None = None
    grow: str | None = None
    update_every: str | int = "epoch"
    end_fraction: float = 1.0
    fraction: float = 0.3
    anneal: str = "constant"
    fraction_end: float = 0.0
    milestones: tuple[tuple[float, float], ...] = ()
    rounding: str = "floor"  # drop count: floor (most methods) or ceil (SNFS)
    regrown_is_kept: bool = False  # RigL: a just-dropped position regrown is kept unchanged
    redistribute: bool = False  # SNFS: growth shared across layers by mean |momentum|
    momentum_beta: float = 0.9  # SNFS's dense gradient momentum
    drop_lambda: float = 0.0  # MEST: drop score |w| + drop_lambda |grad|
    drop_noise: float = 1e-5  # CTRE: std of the noise added to |w| before dropping
    activation_samples: int = 1024  # CTRE: recent samples for the activation similarity
    switch_patience: int | None = None  # CTRE-seq: random growth after this many epochs without progress
    importance_lambda: float = 0.4  # WAST/DAST: weight of the gradient term vs the |w| term
    importance_decay: float = 1.0  # WAST: 1 (a sum); DAST: < 1 (forgets old batches)
    tau_start: float = 0.0  # DAST: sampling temperature, annealed start -> end (0: top-n)
    tau_end: float = 0.0
    random_start: float = 0.0  # DAST: share of uniformly random growth, annealed start -> end
    random_end: float = 0.0

    def __post_init__(self):
        if self.anneal not in ANNEALS:
            raise ValueError(f"unknown anneal {self.anneal!r}; choose from: {', '.join(ANNEALS)}")
        if self.rounding not in ("floor", "ceil"):
            raise ValueError(f"unknown rounding {self.rounding!r}; choose from: floor, ceil")
        for name in ("fraction", "fraction_end", "end_fraction", "random_start", "random_end", "importance_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} {getattr(self, name)!r} must be in [0, 1]")
        for name in ("tau_start", "tau_end", "drop_lambda", "drop_noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} {getattr(self, name)!r} must be >= 0")
        if not 0.0 < self.importance_decay <= 1.0:
            raise ValueError(f"importance_decay {self.importance_decay!r} must be in (0, 1]")
        if not 0.0 <= self.momentum_beta < 1.0:
            raise ValueError(f"momentum_beta {self.momentum_beta!r} must be in [0, 1)")
        if self.update_every != "epoch" and not (isinstance(self.update_every, int) and self.update_every >= 1):
            raise ValueError(f"update_every {self.update_every!r} must be 'epoch' or a positive number of steps")
        if self.switch_patience is not None and self.switch_patience < 1:
            raise ValueError(f"switch_patience {self.switch_patience!r} must be a positive number of epochs")

    @property
    def rewires(self) -> bool:
        return self.drop is not None

    @property
    def needs(self) -> set[str]:
        if not self.rewires:
            return set()
        needs = GROW_NEEDS.get(self.grow, set()) | DROP_NEEDS.get(self.drop, set())
        return needs | ({"momentum"} if self.redistribute else set())

    def schedule(self, total_steps: int, steps_per_epoch: int) -> Schedule:
        every = steps_per_epoch if self.update_every == "epoch" else int(self.update_every)
        end = math.floor(self.end_fraction * total_steps) if self.end_fraction < 1 else total_steps
        return Schedule(
            every=every,
            end=end,
            fraction=self.fraction,
            anneal=self.anneal,
            fraction_end=self.fraction_end,
            milestones=self.milestones,
            total=total_steps,
        )

    @classmethod
    def knobs(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "name"]


@dataclass
class LayerUpdate:
    name: str
    live: int
    dropped: int
    grown: int
    r_s: float
    survival: float | None = None  # share of the previous update's regrown connections not dropped now


@dataclass
class UpdateRecord:
    step: int
    fraction: float
    layers: list[LayerUpdate] = field(default_factory=list)
    tau: float | None = None
    random_share: float | None = None


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
        self.last_grown: dict[str, torch.Tensor] = {}
        self.plateau = {"best": None, "since": 0, "switched": False}
        needs = algorithm.needs
        layers = topology.layers
        self.importance = (
            NeuronImportance(layers, algorithm.importance_lambda, algorithm.importance_decay)
            if "importance" in needs
            else None
        )
        self.activations = ActivationBuffer(layers, algorithm.activation_samples) if "activations" in needs else None
        self.momentum = None
        if "momentum" in needs:
            truly_sparse = [name for name, layer in layers.items() if layer.truly_sparse]
            if truly_sparse:
                raise ValueError(
                    f"{algorithm.name} keeps a dense gradient momentum at every position, which a truly sparse "
                    f"layer ({truly_sparse[0]}) does not have; use backend 'masked'"
                )
            self.momentum = DenseMomentum(layers, algorithm.momentum_beta)
        self._arm()

    def _arm(self) -> None:
        """Ask the layers to keep the dense gradient of the next backward when it will be used:
        before an update step that grows by gradient, and every step for a gradient momentum."""
        needs = self.algorithm.needs
        next_update = self.schedule.is_update_step(self.step_count + 1)
        self.topology.capture_dense_grad = "momentum" in needs or ("dense_grad" in needs and next_update)

    def step(self) -> bool:
        """Call once after each `optimizer.step()`. Returns True if the topology changed."""
        if self.algorithm.rewires and not self.topology.optimizers:
            raise RuntimeError(
                "no optimizer is attached to the topology: call topology.attach(optimizer) before training, "
                "so pruned weights stay zero and rewiring keeps the optimizer state right"
            )
        self.step_count += 1
        if self.momentum is not None:
            self.momentum.update()
        if self.importance is not None:
            self.importance.update()
        updated = self.algorithm.rewires and self.schedule.is_update_step(self.step_count)
        if updated:
            self.update()
        elif self.momentum is not None:
            self.topology.clear_signals()
        self._arm()
        return updated

    def observe_epoch(self, metric: float) -> None:
        """Tell the engine how training went this epoch (higher is better; the trainer passes the
        training accuracy, never a test score). CTRE-seq switches to random growth once this has
        not improved for `switch_patience` epochs."""
        patience = self.algorithm.switch_patience
        if patience is None or self.plateau["switched"]:
            return
        if self.plateau["best"] is None or metric > self.plateau["best"]:
            self.plateau["best"], self.plateau["since"] = float(metric), 0
        else:
            self.plateau["since"] += 1
        if self.plateau["since"] >= patience:
            self.plateau["switched"] = True

    @property
    def grow_criterion(self) -> str:
        return "random" if self.plateau["switched"] else self.algorithm.grow

    def knobs_at(self, t: int) -> dict:
        a = self.algorithm
        progress = self.schedule.progress(t)
        return {
            "lam": a.drop_lambda,
            "drop_noise": a.drop_noise,
            "rounding": a.rounding,
            "tau": cosine(a.tau_start, a.tau_end, progress),
            "epsilon": cosine(a.random_start, a.random_end, progress),
        }

    def _grow_counts(self, dropped: dict[str, torch.Tensor], live: dict[str, torch.Tensor]) -> dict[str, int]:
        """As many as dropped per layer; with redistribution (SNFS) the total is shared across
        layers in proportion to their mean |momentum| over the `live` weights (flat indices,
        before the drop), capped at each layer's empty positions, the rest re-shared until every
        connection is placed."""
        counts = {name: d.numel() for name, d in dropped.items()}
        if not self.algorithm.redistribute or self.momentum is None:
            return counts
        total = sum(counts.values())
        layers = self.topology.layers
        weight, free = {}, {}
        for name in dropped:
            weight[name] = self.momentum.mean_abs_live(name, live[name])
            free[name] = layers[name].size - layers[name].nnz + dropped[name].numel()
        alloc = dict.fromkeys(dropped, 0)
        open_layers = [name for name in dropped if free[name] > 0]
        while sum(alloc.values()) < total and open_layers:
            remaining = total - sum(alloc.values())
            mass = sum(weight[n] for n in open_layers)
            share = {n: (weight[n] / mass if mass > 0 else 1 / len(open_layers)) * remaining for n in open_layers}
            floors = {n: math.floor(v) for n, v in share.items()}
            leftover = remaining - sum(floors.values())
            for n in sorted(open_layers, key=lambda n: share[n] - floors[n], reverse=True)[:leftover]:
                floors[n] += 1
            for n in open_layers:
                alloc[n] += min(floors[n], free[n] - alloc[n])
            open_layers = [n for n in open_layers if alloc[n] < free[n]]
        return alloc

    @torch.no_grad()
    def update(self) -> UpdateRecord:
        """Drop and regrow every sparse layer now (the schedule decides how much)."""
        drop = DROP_CRITERIA[self.algorithm.drop]
        grow = GROW_CRITERIA[self.grow_criterion]
        fraction = self.schedule.fraction_at(self.step_count)
        knobs = self.knobs_at(self.step_count)
        record = UpdateRecord(step=self.step_count, fraction=fraction)
        if self.algorithm.grow == "sampled-attention":
            record.tau, record.random_share = knobs["tau"], knobs["epsilon"]
        layers = self.topology.layers
        # a layer kept dense (e.g. by ERK) has nowhere to grow: it is left alone
        updating = [name for name, layer in layers.items() if layer.nnz < layer.size]
        dropped: dict[str, torch.Tensor] = {}
        live: dict[str, torch.Tensor] = {}
        for name in updating:
            layer = layers[name]
            values, flat = layer.live()
            live[name] = flat
            signals = LayerSignals(params=knobs)
            if "live_grad" in DROP_NEEDS[self.algorithm.drop]:
                signals.live_grad = layer.live_grad()
            if self.importance is not None:
                signals.src_importance = self.importance.per_weight_src(name, flat)
            dropped[name] = flat[drop(values, fraction, self.generator, signals)]
        counts = self._grow_counts(dropped, live)
        for name, layer in layers.items():
            if name not in dropped:
                record.layers.append(LayerUpdate(name, layer.nnz, 0, 0, layer.r_s()))
                continue
            gone = dropped[name]
            signals = LayerSignals(dense_grad_chunks=layer.dense_grad_chunks, dropped=gone, params=knobs)
            signals.score_chunks = self._score_chunks(name)
            grown = grow(signals, layer.candidates(gone), counts[name], self.generator).to(gone.device)
            if self.algorithm.regrown_is_kept:
                regrown = torch.isin(grown, gone)
                gone = gone[~torch.isin(gone, grown)]
                grown = grown[~regrown]
            survival = None
            previous = self.last_grown.get(name)
            if previous is not None and previous.numel():
                survival = 1.0 - float(torch.isin(previous.to(gone.device), gone).float().mean())
            layer.rewire(gone, grown, self.topology.optimizers)
            if self.momentum is not None:
                self.momentum.reset(name, torch.cat([gone, grown]))
            self.last_grown[name] = grown.cpu()
            record.layers.append(LayerUpdate(name, layer.nnz, gone.numel(), grown.numel(), layer.r_s(), survival))
        self.topology.clear_signals()
        self.history.append(record)
        return record

    def _score_chunks(self, name: str):
        if self.importance is not None:
            return self.importance.score_chunks(name)
        if self.activations is not None:
            return self.activations.score_chunks(name)
        if self.momentum is not None:
            return self.momentum.score_chunks(name)
        return None

    def remove(self) -> None:
        """Detach the signal hooks."""
        for signals in (self.importance, self.activations):
            if signals is not None:
                signals.remove()

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-able state, plus "generator" and "tensors" (name -> tensor) to store as tensors."""
        tensors = {f"grown.{k}": v for k, v in self.last_grown.items()}
        for prefix, signals in (
            ("importance", self.importance),
            ("activations", self.activations),
            ("momentum", self.momentum),
        ):
            if signals is not None:
                tensors.update({f"{prefix}.{k}": v.contiguous() for k, v in signals.state().items()})
        return {
            "step_count": self.step_count,
            "generator": self.generator.get_state(),
            "history": [asdict(r) for r in self.history],
            "plateau": dict(self.plateau),
            "tensors": tensors,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.generator.set_state(state["generator"])
        self.history = [
            UpdateRecord(
                r["step"],
                r["fraction"],
                [LayerUpdate(**l) for l in r["layers"]],
                r.get("tau"),
                r.get("random_share"),
            )
            for r in state["history"]
        ]
        self.plateau = dict(state.get("plateau", self.plateau))
        tensors = state.get("tensors", {})
        self.last_grown = {k[6:]: v for k, v in tensors.items() if k.startswith("grown.")}
        for prefix, signals in (
            ("importance", self.importance),
            ("activations", self.activations),
            ("momentum", self.momentum),
        ):
            if signals is not None:
                signals.load({k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")})
        self._arm()
