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

The engine only orchestrates: schedule -> signals -> drop -> grow -> rewire -> record. What
is dropped and grown, and how many per layer, is the parts' business (`dst/criteria.py`); the
engine zeroes dropped weights, initialises grown ones and resets the optimizer state at every
changed position. Signals beyond the weights are gathered only when a part names them in its
`needs`: the dense gradient of an update step (RigL), a dense gradient momentum (SNFS), neuron
activations (CTRE), neuron importance (WAST, DAST), activation and error magnitudes with the last
batch's exact gradient at chosen positions (DAST2); see `dst/signals.py`. Every update records,
per layer, ITOP's R_s and the survival of the previous update's regrown connections (the share
of them this update did not drop).
"""

from __future__ import annotations

import copy
from dataclasses import Field, asdict, dataclass, field, fields, replace

import torch

from neuroplast.dst.parts import DROP_CRITERIA, GROW_CRITERIA, DropCriterion, GrowCriterion, LayerSignals
from neuroplast.dst.schedules import UpdateSchedule
from neuroplast.dst.signals import SIGNALS
from neuroplast.sparse.topology import Topology


@dataclass(frozen=True)
class Algorithm:
    """A dynamic sparse training algorithm: a schedule (when, and what fraction), a drop
    criterion (which live connections go) and a grow criterion (which empty positions come in),
    each a part with its own knobs. `drop` and `grow` are None for a topology that never changes
    (static, dense).

    Build one from parts, e.g. RigL::

        Algorithm("rigl", UpdateSchedule(update_every=100, end_fraction=0.75, drop_anneal="cosine"),
                  MagnitudeDrop(), GradientGrow(regrown_is_kept=True))

    or take a preset and change knobs by name: `preset("rigl", update_every=20)`.
    """

    name: str
    schedule: UpdateSchedule = field(default_factory=UpdateSchedule)
    drop: DropCriterion | None = None
    grow: GrowCriterion | None = None

    def __post_init__(self):
        if (self.drop is None) != (self.grow is None):
            raise ValueError(f"algorithm {self.name!r} needs both a drop and a grow criterion, or neither")

    @property
    def rewires(self) -> bool:
        return self.drop is not None

    @property
    def needs(self) -> dict[str, dict]:
        """The signals the drop and grow criteria need, with their settings merged."""
        needs: dict[str, dict] = {}
        for part in (self.drop, self.grow):
            for signal, settings in (part.needs if part is not None else {}).items():
                merged = needs.setdefault(signal, {})
                clash = [k for k in settings if k in merged and merged[k] != settings[k]]
                if clash:
                    raise ValueError(f"{self.name}: the drop and grow criteria set {signal} {clash[0]} differently")
                merged.update(settings)
        return needs

    def with_knobs(self, **knobs) -> Algorithm:
        """This algorithm with knobs changed by name; None keeps a knob, and a knob none of its
        parts has is ignored (a setting for another method), but an unknown name is an error."""
        known = knob_fields()
        unknown = sorted(set(knobs) - set(known))
        if unknown:
            raise ValueError(f"unknown algorithm setting {unknown[0]!r}; choose from: {', '.join(known)}")
        knobs = {k: v for k, v in knobs.items() if v is not None}

        def changed(part):
            own = {f.name for f in fields(part) if f.init} & set(knobs)
            return replace(part, **{k: knobs[k] for k in own}) if own else part

        return replace(
            self,
            schedule=changed(self.schedule),
            drop=changed(self.drop) if self.drop is not None else None,
            grow=changed(self.grow) if self.grow is not None else None,
        )


def knob_fields() -> dict[str, Field]:
    """Every knob of the schedule and of the registered criteria, by name (first definition wins:
    a knob two criteria share, e.g. `rounding`, has one name and one meaning)."""
    known: dict[str, Field] = {}
    for part in (UpdateSchedule, *DROP_CRITERIA.values(), *GROW_CRITERIA.values()):
        for f in fields(part):
            if f.init and "help" in f.metadata:
                known.setdefault(f.name, f)
    return known


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
    """Runs an `Algorithm` on a `Topology`: call `step()` after every optimizer step (and
    `observe_epoch(training_accuracy)` after every epoch for parts that watch progress).

    `signals`: signals the caller gathers itself, by name, in place of the engine's (e.g. an
    importance computed from an autoencoder's reconstruction error, which no hook can see); a
    signal the parts need and the caller does not give is built by the engine."""

    def __init__(
        self,
        topology: Topology,
        algorithm: Algorithm,
        total_steps: int,
        steps_per_epoch: int,
        seed: int = 0,
        signals: dict | None = None,
    ):
        self.topology = topology
        self.algorithm = algorithm
        self.schedule = algorithm.schedule.at(total_steps, steps_per_epoch)
        # the engine's own copies: a part may keep state over training (e.g. CTRE-seq's switch)
        self.drop = copy.deepcopy(algorithm.drop)
        self.grow = copy.deepcopy(algorithm.grow)
        self.generator = torch.Generator().manual_seed(seed)
        self.step_count = 0
        self.history: list[UpdateRecord] = []
        self.last_grown: dict[str, torch.Tensor] = {}
        self.needs = algorithm.needs
        given = signals or {}
        self.signals = {
            name: given[name] if name in given else make(topology.layers, **self.needs[name])
            for name, make in SIGNALS.items()
            if name in self.needs
        }
        self._arm()

    def _arm(self) -> None:
        """Ask the layers to keep the dense gradient of the next backward when it will be used:
        before an update step that grows by gradient, and every step for a gradient momentum."""
        next_update = self.schedule.is_update_step(self.step_count + 1)
        every_step = any(getattr(signal, "dense_grad_every_step", False) for signal in self.signals.values())
        self.topology.capture_dense_grad = every_step or ("dense_grad" in self.needs and next_update)

    def step(self) -> bool:
        """Call once after each `optimizer.step()`. Returns True if the topology changed."""
        if self.algorithm.rewires and not self.topology.optimizers:
            raise RuntimeError(
                "no optimizer is attached to the topology: call topology.attach(optimizer) before training, "
                "so pruned weights stay zero and rewiring keeps the optimizer state right"
            )
        self.step_count += 1
        for signal in self.signals.values():
            signal.update()
        updated = self.algorithm.rewires and self.schedule.is_update_step(self.step_count)
        if updated:
            self.update()
        elif self.topology.capture_dense_grad:  # kept for a signal of every step, not for an update
            self.topology.clear_signals()
        self._arm()
        return updated

    def observe_epoch(self, metric: float) -> None:
        """Tell the parts how training went this epoch (higher is better; the trainer passes the
        training accuracy, never a test score)."""
        for part in (self.drop, self.grow):
            if part is not None:
                part.observe_epoch(metric)

    @torch.no_grad()
    def update(self) -> UpdateRecord:
        """Drop and regrow every sparse layer now (the schedule decides how much)."""
        fraction = self.schedule.fraction_at(self.step_count)
        progress = self.schedule.progress(self.step_count)
        record = UpdateRecord(step=self.step_count, fraction=fraction, **self.grow.record(progress))
        layers = self.topology.layers
        importance = self.signals.get("importance")
        activity = self.signals.get("activity")
        # a layer kept dense (e.g. by ERK) has nowhere to grow: it is left alone
        updating = [name for name, layer in layers.items() if layer.nnz < layer.size]
        dropped: dict[str, torch.Tensor] = {}
        live: dict[str, torch.Tensor] = {}
        for name in updating:
            layer = layers[name]
            values, flat = layer.live()
            live[name] = flat
            signals = LayerSignals(
                progress=progress, flat=flat, shape=tuple(layer.shape), last_grown=self.last_grown.get(name)
            )
            if "live_grad" in self.needs:
                signals.live_grad = layer.live_grad()
            if importance is not None:
                signals.src_importance = importance.per_weight_src(name, flat)
            dropped[name] = flat[self.drop.select(values, fraction, self.generator, signals)]
        counts = self.grow.counts(dropped, live, layers, self.signals)
        scores = self.signals.get(self.grow.scores_from) if self.grow.scores_from else None
        for name, layer in layers.items():
            if name not in dropped:
                record.layers.append(LayerUpdate(name, layer.nnz, 0, 0, layer.r_s()))
                continue
            gone = dropped[name]
            signals = LayerSignals(dense_grad_chunks=layer.dense_grad_chunks, dropped=gone, progress=progress)
            if scores is not None:
                signals.score_chunks = scores.score_chunks(name)
            if activity is not None:
                signals.grad_at = activity.grad_at(name)
            grown = self.grow.select(signals, layer.candidates(gone), counts[name], self.generator).to(gone.device)
            gone, grown = self.grow.reconcile(gone, grown)
            survival = None
            previous = self.last_grown.get(name)
            if previous is not None and previous.numel():
                survival = 1.0 - float(torch.isin(previous.to(gone.device), gone).float().mean())
            layer.rewire(gone, grown, self.topology.optimizers)
            for signal in self.signals.values():
                signal.reset(name, torch.cat([gone, grown]))
            self.last_grown[name] = grown.cpu()
            record.layers.append(LayerUpdate(name, layer.nnz, gone.numel(), grown.numel(), layer.r_s(), survival))
        self.topology.clear_signals()
        self.history.append(record)
        return record

    def remove(self) -> None:
        """Detach the signal hooks."""
        for signal in self.signals.values():
            signal.remove()

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-able state, plus "generator" and "tensors" (name -> tensor) to store as tensors."""
        tensors = {f"grown.{k}": v for k, v in self.last_grown.items()}
        for prefix, signal in self.signals.items():
            tensors.update({f"{prefix}.{k}": v.contiguous() for k, v in signal.state().items()})
        return {
            "step_count": self.step_count,
            "generator": self.generator.get_state(),
            "history": [asdict(r) for r in self.history],
            "drop": self.drop.state_dict() if self.drop is not None else {},
            "grow": self.grow.state_dict() if self.grow is not None else {},
            "tensors": tensors,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned (its tensors included), to resume training exactly."""
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
        if self.drop is not None and state.get("drop"):
            self.drop.load_state_dict(state["drop"])
        grow_state = state.get("grow", state.get("plateau"))  # "plateau": CTRE-seq's state before parts
        if self.grow is not None and grow_state:
            self.grow.load_state_dict(grow_state)
        tensors = state.get("tensors", {})
        self.last_grown = {k[6:]: v for k, v in tensors.items() if k.startswith("grown.")}
        for prefix, signal in self.signals.items():
            signal.load({k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")})
        self._arm()
