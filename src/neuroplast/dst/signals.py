"""Neuron-level signals for the DST criteria, gathered during training by module hooks.

- `NeuronImportance` (WAST, DAST): per sparse layer, the importance of its input neurons and of
  its output neurons, updated after every optimizer step::

      I <- decay * I + lam * e / mean(e) + (1 - lam) * s / mean(s)

  e = mean over the batch of |(a - E[a]) * dL/da| for the neuron's activation a, E[a] its mean
  over the batch (centred gradient x input: the first-order change of the loss if the neuron is
  replaced by its mean). An input that never varies, e.g. an empty border pixel, gets e = 0
  whatever constant standardisation made of it (about -0.81 for Fashion-MNIST standardised per
  channel); plain gradient x input |a * dL/da| would count such a constant as a second bias.
  s = sum of |w| over the neuron's live weights (WAST's strength term). Each term is divided by
  its mean over the layer's neurons so that lam weighs quantities of the same scale (a gradient
  and a weight sum differ by orders of magnitude). decay = 1 is WAST's ever-growing sum;
  decay < 1 forgets old batches.
- `NeuronActivity` (DAST2): supervised attention in raw units, per sparse Linear layer: a moving
  average of the centred activation magnitude |a - E[a]| of every input neuron (I_src) and of
  the back-propagated error magnitude |dL/dz| of every output neuron (I_dst), whose product
  bounds the gradient of a connection between them; and the last batch's activations and errors,
  from which the exact gradient at a few chosen positions is computed without a dense gradient.
- `ActivationBuffer` (CTRE): the most recent inputs and outputs of each sparse Linear layer,
  for the cosine similarity of neuron activations.
- `DenseMomentum` (SNFS): an exponential moving average of the dense gradient at every position.

A neuron of a Conv2d layer is a channel (statistics averaged over batch and space; E[a] is the
batch mean at every position); a weight connects input channel i to output channel o at every
kernel position.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from neuroplast.sparse.layer import CHUNK_ELEMENTS, SparseLayer  # scores come a block this size at a time


def _per_neuron(tensor: torch.Tensor, conv: bool) -> torch.Tensor:
    """Mean |tensor| per neuron: channel dim 1 for conv activations, the last dim otherwise."""
    t = tensor.detach().abs()
    if conv:
        return t.transpose(0, 1).reshape(t.shape[1], -1).mean(1)
    return t.reshape(-1, t.shape[-1]).mean(0)


def centred(activation: torch.Tensor) -> torch.Tensor:
    """a - E[a]: each neuron's activation minus its mean over the batch (over the batch at every
    position for a conv layer or a token sequence). Zero for an input that never varies."""
    return activation - activation.mean(0, keepdim=True)


def _normalised(term: torch.Tensor) -> torch.Tensor:
    mean = term.mean()
    return term / mean if float(mean) > 0 else torch.zeros_like(term)


def weight_neurons(flat: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(output neuron, input neuron) of each flat position of a weight of `shape`."""
    row_size = math.prod(shape[1:])
    kernel = math.prod(shape[2:])
    return flat // row_size, (flat % row_size) // kernel


def outer_chunks(
    dst: torch.Tensor, src: torch.Tensor, shape: tuple[int, ...]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(flat, dst[o] * src[i]) over all positions of a weight of `shape`, a block of rows at a time."""
    row_size, kernel = math.prod(shape[1:]), math.prod(shape[2:])
    rows = max(1, CHUNK_ELEMENTS // row_size)
    per_position = src.repeat_interleave(kernel)[None, :]  # the same for every row
    for start in range(0, shape[0], rows):
        stop = min(start + rows, shape[0])
        block = dst[start:stop, None] * per_position
        yield torch.arange(start * row_size, stop * row_size, device=block.device), block.reshape(-1)


class _Hooks:
    """Forward hooks on the sparse layers' modules, active while training with grad enabled."""

    def __init__(self, layers: dict[str, SparseLayer]):
        self.layers = layers
        self.handles = []

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    @staticmethod
    def active(module: nn.Module) -> bool:
        return module.training and torch.is_grad_enabled()

    def update(self) -> None:
        """Fold in the batch just trained on (call after the optimizer step)."""

    def reset(self, name: str, flat: torch.Tensor) -> None:
        """Connections at `flat` of layer `name` were just rewired: neuron signals keep going."""


class _NeuronScores(_Hooks):
    """Hooks that keep one score per input neuron (`src`) and per output neuron (`dst`) of every
    layer; a checkpoint holds both."""

    src: dict[str, torch.Tensor]
    dst: dict[str, torch.Tensor]

    def _input_needs_grad(self, module, args):
        """The first layer's input (the data) needs a gradient for its neurons' attribution."""
        if self.active(module) and args and torch.is_tensor(args[0]) and not args[0].requires_grad:
            return (args[0].detach().requires_grad_(True), *args[1:])
        return None

    def state(self) -> dict[str, torch.Tensor]:
        return {**{f"src.{k}": v for k, v in self.src.items()}, **{f"dst.{k}": v for k, v in self.dst.items()}}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, value in tensors.items():
            kind, _, name = key.partition(".")
            getattr(self, kind)[name] = value.to(getattr(self, kind)[name].device)


class NeuronImportance(_NeuronScores):
    """Importance of every sparse layer's input and output neurons (see the module docstring)."""

    def __init__(self, layers: dict[str, SparseLayer], lam: float = 0.4, decay: float = 1.0):
        super().__init__(layers)
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"importance lam {lam!r} must be in [0, 1]")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"importance decay {decay!r} must be in (0, 1]")
        self.lam, self.decay = lam, decay
        self.src: dict[str, torch.Tensor] = {}
        self.dst: dict[str, torch.Tensor] = {}
        self._grad_in: dict[str, torch.Tensor] = {}
        self._grad_out: dict[str, torch.Tensor] = {}
        for name, layer in layers.items():
            out_n, in_n = layer.shape[0], layer.shape[1]
            device = layer.parameter.device
            self.src[name] = torch.zeros(in_n, device=device)
            self.dst[name] = torch.zeros(out_n, device=device)
            conv = isinstance(layer.module, nn.Conv2d)
            self.handles.append(layer.module.register_forward_pre_hook(self._input_needs_grad))
            self.handles.append(layer.module.register_forward_hook(self._make_hook(name, conv)))

    def _make_hook(self, name: str, conv: bool):
        def accumulate(store: dict[str, torch.Tensor], activation: torch.Tensor):
            def hook(grad: torch.Tensor) -> None:
                value = _per_neuron(centred(activation) * grad, conv)
                store[name] = store[name] + value if name in store else value

            return hook

        def forward_hook(module, args, output):
            if not self.active(module):
                return
            if torch.is_tensor(args[0]) and args[0].requires_grad:
                args[0].register_hook(accumulate(self._grad_in, args[0].detach()))
            if output.requires_grad:
                output.register_hook(accumulate(self._grad_out, output.detach()))

        return forward_hook

    @torch.no_grad()
    def update(self) -> None:
        """Fold in the batch just trained on (call after the optimizer step)."""
        for name, layer in self.layers.items():
            s_out, s_in = layer.neuron_magnitudes()
            for importance, grads, strength in ((self.src, self._grad_in, s_in), (self.dst, self._grad_out, s_out)):
                grad = grads.get(name)
                term = (1 - self.lam) * _normalised(strength)
                if grad is not None:
                    term = term + self.lam * _normalised(grad.to(term.device))
                importance[name] = self.decay * importance[name] + term
        self._grad_in, self._grad_out = {}, {}

    def per_weight_src(self, name: str, flat: torch.Tensor) -> torch.Tensor:
        """Importance of each live weight's input neuron (WAST's drop score factor)."""
        _, src = weight_neurons(flat, self.layers[name].shape)
        return self.src[name][src.to(self.src[name].device)]

    def score_chunks(self, name: str):
        shape = self.layers[name].shape
        return lambda: outer_chunks(self.dst[name], self.src[name], shape)


def _linear_only(layers: dict[str, SparseLayer], signal: str) -> None:
    """Refuse layers that are not Linear for a signal defined on neurons of Linear layers."""
    bad = [name for name, layer in layers.items() if len(layer.shape) != 2]
    if bad:
        raise ValueError(
            f"{signal} is defined for Linear layers only; {', '.join(bad)} is not "
            "(exclude it, e.g. with dense_first, or choose another method)"
        )


class NeuronActivity(_NeuronScores):
    """Supervised attention of every sparse Linear layer (see the module docstring): moving
    averages `src` (|a - E[a]| per input neuron) and `dst` (|dL/dz| per output neuron), and the
    last batch's inputs and output errors for `grad_at`."""

    def __init__(self, layers: dict[str, SparseLayer], beta: float = 0.9, attribution: bool = False):
        super().__init__(layers)
        _linear_only(layers, "supervised attention")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"activity beta {beta!r} must be in [0, 1)")
        self.beta = beta
        # attribution: `src` averages the centred attribution |(a - E[a]) * dL/da| per input
        # neuron instead of the activity |a - E[a]| (zero for an input the loss ignores)
        self.attribution = attribution
        self.input_grads: dict[str, torch.Tensor] = {}  # the last batch's dL/da, (samples, in)
        self.src: dict[str, torch.Tensor] = {}
        self.dst: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, torch.Tensor] = {}  # the last batch's inputs, (samples, in)
        self.errors: dict[str, torch.Tensor] = {}  # the last batch's dL/dz, (samples, out)
        self._fresh: set[str] = set()  # layers whose batch arrived since the last update()
        for name, layer in layers.items():
            device = layer.parameter.device
            self.src[name] = torch.zeros(layer.shape[1], device=device)
            self.dst[name] = torch.zeros(layer.shape[0], device=device)
            if attribution:
                self.handles.append(layer.module.register_forward_pre_hook(self._input_needs_grad))
            self.handles.append(layer.module.register_forward_hook(self._make_hook(name)))

    def _make_hook(self, name: str):
        def keep_error(grad: torch.Tensor) -> None:
            self.errors[name] = grad.detach().reshape(-1, grad.shape[-1])
            self._fresh.add(name)

        def keep_input_grad(grad: torch.Tensor) -> None:
            self.input_grads[name] = grad.detach().reshape(-1, grad.shape[-1])

        def forward_hook(module, args, output):
            if not self.active(module) or not output.requires_grad:
                return
            self.inputs[name] = args[0].detach().reshape(-1, args[0].shape[-1])
            output.register_hook(keep_error)
            if self.attribution and args[0].requires_grad:
                args[0].register_hook(keep_input_grad)

        return forward_hook

    @torch.no_grad()
    def update(self) -> None:
        """Fold in the batch just trained on (call after the optimizer step)."""
        for name in self._fresh:
            x, error = self.inputs[name].float(), self.errors[name].float()
            src = centred(x)
            if self.attribution:
                grad = self.input_grads.pop(name, None)
                src = src * grad.float() if grad is not None else torch.zeros_like(src)
            for average, batch in ((self.src, src.abs().mean(0)), (self.dst, error.abs().mean(0))):
                average[name] = self.beta * average[name] + (1 - self.beta) * batch.to(average[name].device)
        self._fresh = set()

    def score_chunks(self, name: str):
        """I_dst[o] * I_src[i] at every position, a block of rows at a time."""
        shape = self.layers[name].shape
        return lambda: outer_chunks(self.dst[name], self.src[name], shape)

    def mean_live_score(self, name: str, flat: torch.Tensor) -> float:
        """Mean of I_dst[o] * I_src[i] over the positions `flat` (a layer's share of growth)."""
        if not flat.numel():
            return 0.0
        out, inp = weight_neurons(flat.to(self.src[name].device), self.layers[name].shape)
        return float((self.dst[name][out] * self.src[name][inp]).mean())

    def grad_at(self, name: str):
        """A function: flat positions -> the exact gradient of the last training batch's loss
        there, sum over samples of dL/dz[o] * a[i], computed for those positions only."""
        if name not in self.errors:
            raise RuntimeError(f"layer {name}: no training batch was recorded before this update")
        x, error = self.inputs[name], self.errors[name]
        shape = self.layers[name].shape
        per_block = max(1, CHUNK_ELEMENTS // max(1, x.shape[0]))

        def gradient(flat: torch.Tensor) -> torch.Tensor:
            out, inp = weight_neurons(flat.to(x.device), shape)
            parts = [
                (error[:, out[i : i + per_block]].float() * x[:, inp[i : i + per_block]].float()).sum(0)
                for i in range(0, flat.numel(), per_block)
            ]
            return torch.cat(parts) if parts else torch.zeros(0, device=x.device)

        return gradient


class ActivationBuffer(_Hooks):
    """The last `samples` input and output rows of every sparse Linear layer (CTRE)."""

    def __init__(self, layers: dict[str, SparseLayer], samples: int = 1024):
        super().__init__(layers)
        _linear_only(layers, "activation similarity")
        if samples < 2:
            raise ValueError(f"activation samples {samples!r} must be >= 2")
        self.samples = samples
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._next: dict[str, dict[str, int]] = {"inputs": {}, "outputs": {}}  # next row, once a ring is full
        for name, layer in layers.items():
            self.handles.append(layer.module.register_forward_hook(self._make_hook(name)))

    def _make_hook(self, name: str):
        def keep(kind: str, rows: torch.Tensor) -> None:
            """Write into a ring of `samples` rows, oldest first once full (no re-allocation)."""
            store, position = getattr(self, kind), self._next[kind]
            rows = rows.detach().reshape(-1, rows.shape[-1])[-self.samples :]
            ring = store.get(name)
            if ring is None or ring.shape[0] < self.samples:  # still filling
                store[name] = rows.clone() if ring is None else torch.cat([ring, rows])[-self.samples :]
                position[name] = 0
                return
            start = position.get(name, 0)
            first = min(rows.shape[0], self.samples - start)
            ring[start : start + first] = rows[:first]
            ring[: rows.shape[0] - first] = rows[first:]
            position[name] = (start + rows.shape[0]) % self.samples

        def forward_hook(module, args, output):
            if self.active(module):
                keep("inputs", args[0])
                keep("outputs", output)

        return forward_hook

    def recent(self, kind: str, name: str) -> torch.Tensor:
        """The buffered rows ("inputs" or "outputs") of layer `name`, oldest first."""
        ring = getattr(self, kind)[name]
        start = self._next[kind].get(name, 0)
        return torch.cat([ring[start:], ring[:start]]) if start else ring

    def score_chunks(self, name: str):
        """|cosine similarity| between the activations of every input neuron i and output neuron
        o over the buffered samples, a block of output neurons at a time."""
        if name not in self.inputs:
            raise RuntimeError(f"layer {name}: no activations were recorded before this update")
        x = self.inputs[name]
        y = self.outputs[name]
        x = x / x.norm(dim=0, keepdim=True).clamp_min(1e-12)
        y = y / y.norm(dim=0, keepdim=True).clamp_min(1e-12)
        n_in = x.shape[1]
        rows = max(1, CHUNK_ELEMENTS // n_in)

        def chunks():
            for start in range(0, y.shape[1], rows):
                stop = min(start + rows, y.shape[1])
                block = (y[:, start:stop].t() @ x).abs()
                yield torch.arange(start * n_in, stop * n_in, device=block.device), block.reshape(-1)

        return chunks

    def state(self) -> dict[str, torch.Tensor]:
        """The buffers, oldest row first (so a reload continues the same ring)."""
        return {
            **{f"inputs.{k}": self.recent("inputs", k) for k in self.inputs},
            **{f"outputs.{k}": self.recent("outputs", k) for k in self.outputs},
        }

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, value in tensors.items():
            kind, _, name = key.partition(".")
            getattr(self, kind)[name] = value.clone()
            self._next[kind][name] = 0


class DenseMomentum:
    """SNFS: m <- beta m + (1 - beta) g of the dense gradient at every position, every step.
    Needs the dense gradient of every step, so it runs on the masked backend."""

    dense_grad_every_step = True

    def __init__(self, layers: dict[str, SparseLayer], beta: float = 0.9):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"momentum beta {beta!r} must be in [0, 1)")
        truly_sparse = [name for name, layer in layers.items() if layer.truly_sparse]
        if truly_sparse:
            raise ValueError(
                f"a dense gradient momentum (snfs) is kept at every position, which a truly sparse layer "
                f"({truly_sparse[0]}) does not have; use backend 'masked'"
            )
        self.layers, self.beta = layers, beta
        self.momentum = {
            name: torch.zeros(layer.shape, device=layer.parameter.device) for name, layer in layers.items()
        }

    @torch.no_grad()
    def update(self) -> None:
        for name, layer in self.layers.items():
            for flat, grad in layer.dense_grad_chunks():
                m = self.momentum[name].view(-1)
                m[flat] = self.beta * m[flat] + (1 - self.beta) * grad.to(m.device)

    def remove(self) -> None:
        """No hooks to detach: the momentum reads the gradients the layers keep."""

    def reset(self, name: str, flat: torch.Tensor) -> None:
        """New and dropped connections start from zero momentum."""
        self.momentum[name].view(-1)[flat.to(self.momentum[name].device)] = 0

    def mean_abs_live(self, name: str, flat: torch.Tensor) -> float:
        return (
            float(self.momentum[name].view(-1)[flat.to(self.momentum[name].device)].abs().mean())
            if flat.numel()
            else 0.0
        )

    def score_chunks(self, name: str):
        m = self.momentum[name].view(-1)
        return lambda: iter([(torch.arange(m.numel(), device=m.device), m.abs())])

    def state(self) -> dict[str, torch.Tensor]:
        return dict(self.momentum)

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, value in tensors.items():
            self.momentum[name] = value.to(self.momentum[name].device)


# The signals the engine gathers for the parts that name them in `needs`, with their settings
# as keyword arguments; "dense_grad" and "live_grad" are read from the layers directly.
SIGNALS = {
    "importance": NeuronImportance,
    "activity": NeuronActivity,
    "activations": ActivationBuffer,
    "momentum": DenseMomentum,
}
