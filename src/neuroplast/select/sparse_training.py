"""Feature selection by sparse training: a sparse network is trained for a few epochs on
neuroplast's sparse layers and DST engine, and its topology ranks the inputs.

- `quickselection` (Atashgahi et al., Machine Learning 2022): a sparse denoising autoencoder
  d-1000-d trained with SET (ER epsilon 13, zeta 0.2); an input's score is its neuron strength,
  the sum of |w| over its live connections.
- `wast` (Sokar et al., NeurIPS 2022): a sparse denoising autoencoder d-200-d at density 0.2
  rewired after every mini-batch by its input importance
  I(i) += lambda e_i + (1 - lambda) s(i) (e: reconstruction error, s: strength); the score is I.
- `dast`: the randomized-attention method (neuroplast's DAST preset) in its selection form: a
  sparse MLP classifier trained with DAST; the score is the importance its first layer's input
  neurons end with (gradient x input and strength, `dst/signals.py`).
- `neurofs` (Atashgahi et al., TMLR 2023, the method's idea): a sparse MLP classifier whose input
  neurons are removed gradually, the weakest first, down to k; hidden layers rewired with SET's
  drop and gradient growth.

Every method standardised input in, one score per feature out (higher = more important).
Specs: dst.md sections 2.7-2.9.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from neuroplast.dst import (
    Algorithm,
    AttentionDrop,
    AttentionGrow,
    DSTEngine,
    GradientGrow,
    SignedMagnitudeDrop,
    UpdateSchedule,
    preset,
)
from neuroplast.dst.criteria import drop_by_signed_magnitude, select_extreme
from neuroplast.dst.signals import outer_chunks
from neuroplast.models import MLP
from neuroplast.select.methods import SelectionError, register_method
from neuroplast.sparse import sparsify
from neuroplast.sparse.layer import SparseLayer
from neuroplast.sparse.topology import Topology
from neuroplast.train.trainer import progress_bar

# WAST's lambda by kind of data (dst.md 2.7): images weigh the strength term more
WAST_LAMBDA = {"image": 0.4, "tabular": 0.9}


def input_strength(layer: SparseLayer) -> torch.Tensor:
    """QuickSelection's neuron strength of every input of `layer`: the sum of |w| over its live
    connections (pruned weights are exactly zero, so no mask is needed)."""
    return layer.neuron_magnitudes()[1]


def _seeded(seed: int) -> torch.Generator:
    torch.manual_seed(seed)  # layer initialisation and dropout
    return torch.Generator().manual_seed(seed)


def _bar(enabled: bool, description: str, total: int):
    """The trainer's progress bar, started with one task."""
    bar = progress_bar(enabled)
    if bar is not None:
        bar.start()
        bar.add_task(description, total=total, info="")
    return bar


def train(
    model: nn.Module,
    engine: DSTEngine,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    description: str,
    progress: bool,
    noise: float = 0.0,
    after_forward: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    after_epoch: Callable[[int], None] | None = None,
) -> None:
    """Mini-batch SGD with the DST engine stepping after every optimizer step.

    noise: std of Gaussian noise added to each batch's inputs, drawn afresh every batch
    (a denoising autoencoder's corruption). after_forward(targets, outputs) sees every batch;
    after_epoch(epoch) runs after every epoch but the last."""
    batches = math.ceil(len(inputs) / batch_size)
    bar = _bar(progress, description, epochs * batches)
    model.train()
    try:
        for epoch in range(epochs):
            order = torch.randperm(len(inputs), generator=generator)
            for b in range(batches):
                rows = order[b * batch_size : (b + 1) * batch_size]
                x, target = inputs[rows], targets[rows]
                if noise:
                    x = x + noise * torch.randn(x.shape, generator=generator)
                output = model(x)
                loss = loss_fn(output, target)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if after_forward is not None:
                    after_forward(target, output.detach())
                engine.step()
                if bar is not None:
                    bar.advance(0)
            if after_epoch is not None and epoch < epochs - 1:
                after_epoch(epoch)
    finally:
        engine.remove()
        if bar is not None:
            bar.stop()


def _autoencoder(features: int, hidden: int, dropout: float = 0.0) -> nn.Sequential:
    """d-hidden-d, sigmoid hidden units, linear output (WAST's and QuickSelection's)."""
    blocks: list[nn.Module] = [nn.Linear(features, hidden), nn.Sigmoid()]
    if dropout:
        blocks.append(nn.Dropout(dropout))
    return nn.Sequential(*blocks, nn.Linear(hidden, features))


def _tensor(x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)


def _check_positive(**values) -> None:
    for name, value in values.items():
        if value < 1:
            raise SelectionError(f"{name} {value!r} must be a positive integer")


def _sparse_sgd(
    model: nn.Module,
    generator: torch.Generator,
    density: float,
    distribution: str,
    epsilon: float | None = None,
    *,
    lr: float,
    momentum: float,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> tuple[Topology, torch.optim.SGD]:
    """Sparsify `model` in place (`sparsify`'s density, distribution and epsilon; the masks drawn
    from `generator`) and make its SGD optimizer, attached so that every layer's pruned weights
    stay zero."""
    topology = sparsify(model, density=density, distribution=distribution, epsilon=epsilon, generator=generator)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay
    )
    topology.attach(optimizer)
    return topology, optimizer


# -- QuickSelection ----------------------------------------------------------------------------
@register_method("quickselection", supervised=False, summary="sparse denoising autoencoder (SET), neuron strength")
def quickselection_scores(
    x,
    y,
    k,
    seed,
    epochs: int = 100,
    hidden: int = 1000,
    epsilon: float = 13.0,
    drop_fraction: float = 0.2,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 1e-5,
    batch_size: int = 100,
    noise: float = 0.2,
    noise_mode: str = "fixed",
    dropout: float = 0.2,
    progress: bool = False,
):
    """QuickSelection: train the d-hidden-d sparse denoising autoencoder with SET (after every
    epoch but the last), score each input by its strength in the final encoder. noise_mode
    "fixed" corrupts the training set once (the paper), "per_batch" afresh every batch."""
    if noise_mode not in ("fixed", "per_batch"):
        raise SelectionError(f"noise_mode {noise_mode!r}; choose from: fixed, per_batch")
    _check_positive(epochs=epochs, hidden=hidden, batch_size=batch_size)
    generator = _seeded(seed)
    clean = _tensor(x)
    model = _autoencoder(clean.shape[1], hidden, dropout)
    topology, optimizer = _sparse_sgd(
        model, generator, 1.0, "er", epsilon, lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    steps = math.ceil(len(clean) / batch_size)
    engine = DSTEngine(topology, preset("set", drop_fraction=drop_fraction), epochs * steps, steps, seed)
    # a fixed corruption is drawn once (the inputs are the noisy copy, the targets stay clean)
    fixed = noise_mode == "fixed"
    inputs = clean + noise * torch.randn(clean.shape, generator=generator) if fixed else clean
    train(
        model,
        engine,
        optimizer,
        inputs,
        clean,
        nn.functional.mse_loss,
        epochs,
        batch_size,
        generator,
        "quickselection",
        progress,
        noise=0.0 if fixed else noise,
    )
    return input_strength(topology.layers["0"]).numpy().copy()


# -- WAST ----------------------------------------------------------------------------------------
class ReconstructionImportance:
    """WAST's neuron importance in a d-h-d autoencoder, the engine's "importance" signal.

    After every batch (x clean, x_hat its reconstruction, e_i = mean over the batch |x_i - x_hat_i|):

        I_in(i)  <- decay I_in(i)  + lam e_i + (1 - lam) sum_h |W1[h, i]|   (encoder input i)
        I_out(i) <- decay I_out(i) + lam e_i + (1 - lam) sum_h |W2[i, h]|   (decoder output i)

    and every hidden neuron has importance 1. decay = 1 is WAST's running sum. The drop score of
    a weight is |w| times the importance of its feature-side neuron (encoder: its input, decoder:
    its output), the growth score importance(dst) x importance(src).

    The engine's own importance signal is the supervised form (gradient x input); WAST's comes
    from the reconstruction error, which only the training loop sees: it hands each batch to
    `observe` and this signal takes the engine's slot.
    """

    def __init__(self, encoder: SparseLayer, decoder: SparseLayer, lam: float, decay: float = 1.0):
        if not 0.0 <= lam <= 1.0:
            raise SelectionError(f"lam {lam!r} must be in [0, 1]")
        self.encoder, self.decoder = encoder, decoder
        self.lam, self.decay = lam, decay
        hidden, features = encoder.shape
        self.feature_in = torch.zeros(features)
        self.feature_out = torch.zeros(features)
        ones = torch.ones(hidden)
        self.src = {encoder.name: self.feature_in, decoder.name: ones}
        self.dst = {encoder.name: ones, decoder.name: self.feature_out}
        self.error: torch.Tensor | None = None

    def observe(self, clean: torch.Tensor, reconstruction: torch.Tensor) -> None:
        self.error = (clean - reconstruction).abs().mean(0)

    @torch.no_grad()
    def update(self) -> None:
        error = self.error if self.error is not None else torch.zeros_like(self.feature_in)
        strength_in = self.encoder.neuron_magnitudes()[1]
        strength_out = self.decoder.neuron_magnitudes()[0]
        self.feature_in.mul_(self.decay).add_(self.lam * error + (1 - self.lam) * strength_in)
        self.feature_out.mul_(self.decay).add_(self.lam * error + (1 - self.lam) * strength_out)
        self.error = None

    def per_weight_src(self, name: str, flat: torch.Tensor) -> torch.Tensor:
        """Importance of each live weight's feature-side neuron (WAST's drop factor)."""
        if name == self.encoder.name:
            return self.feature_in[flat % self.encoder.shape[1]]
        return self.feature_out[flat // self.decoder.shape[1]]

    def score_chunks(self, name: str):
        shape = (self.encoder if name == self.encoder.name else self.decoder).shape
        return lambda: outer_chunks(self.dst[name], self.src[name], shape)

    def reset(self, name: str, flat: torch.Tensor) -> None:
        """Neuron importance carries on over rewiring."""

    def remove(self) -> None:
        """No hooks: the training loop hands in the batches."""

    def state(self) -> dict[str, torch.Tensor]:
        return {"feature_in": self.feature_in, "feature_out": self.feature_out}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        self.feature_in.copy_(tensors["feature_in"])
        self.feature_out.copy_(tensors["feature_out"])


def attention_autoencoder(
    x: np.ndarray,
    seed: int,
    grow: AttentionGrow,
    epochs: int,
    hidden: int,
    density: float,
    drop_fraction: float,
    lr: float,
    batch_size: int,
    noise: float,
    description: str,
    progress: bool,
) -> ReconstructionImportance:
    """Train WAST's sparse denoising autoencoder (uniform density, SGD with Nesterov momentum,
    noise re-drawn every batch, topology updated after every batch) with the attention drop and
    the grow part `grow`; return its importance signal."""
    _check_positive(epochs=epochs, hidden=hidden, batch_size=batch_size)
    generator = _seeded(seed)
    clean = _tensor(x)
    model = _autoencoder(clean.shape[1], hidden)
    topology, optimizer = _sparse_sgd(model, generator, density, "uniform", lr=lr, momentum=0.9, nesterov=True)
    steps = math.ceil(len(clean) / batch_size)
    algorithm = Algorithm(
        description, UpdateSchedule(update_every=1, drop_fraction=drop_fraction), AttentionDrop(), grow
    )
    importance = ReconstructionImportance(
        topology.layers["0"], topology.layers["2"], grow.importance_lambda, grow.importance_decay
    )
    engine = DSTEngine(topology, algorithm, epochs * steps, steps, seed, signals={"importance": importance})
    train(
        model,
        engine,
        optimizer,
        clean,
        clean,
        nn.functional.mse_loss,
        epochs,
        batch_size,
        generator,
        description,
        progress,
        noise=noise,
        after_forward=importance.observe,
    )
    return importance


@register_method("wast", supervised=False, summary="sparse denoising autoencoder rewired by input importance")
def wast_scores(
    x,
    y,
    k,
    seed,
    epochs: int = 10,
    hidden: int = 200,
    density: float = 0.2,
    drop_fraction: float = 0.3,
    data_kind: str = "tabular",
    lam: float | None = None,
    lr: float = 0.1,
    batch_size: int = 128,
    noise: float = 0.2,
    progress: bool = False,
):
    """WAST: the paper's autoencoder setup; lam defaults by `data_kind` (image 0.4, tabular 0.9)."""
    if data_kind not in WAST_LAMBDA:
        raise SelectionError(f"unknown data_kind {data_kind!r}; choose from: {', '.join(WAST_LAMBDA)}")
    grow = AttentionGrow(importance_lambda=WAST_LAMBDA[data_kind] if lam is None else lam)
    importance = attention_autoencoder(
        x, seed, grow, epochs, hidden, density, drop_fraction, lr, batch_size, noise, "wast", progress
    )
    return importance.feature_in.numpy().copy()


# -- DAST, randomized attention ------------------------------------------------------------------
@register_method(
    "dast", supervised=True, summary="sparse MLP trained with DAST (randomized attention), input importance"
)
def dast_scores(
    x,
    y,
    k,
    seed,
    epochs: int = 10,
    hidden: Sequence[int] = (1000,),
    density: float = 0.2,
    lr: float = 0.05,
    batch_size: int = 128,
    update_every: int = 100,
    progress: bool = False,
):
    """The DAST preset on a sparse MLP classifier (ERK at `density`, a topology update every
    `update_every` steps); the score of an input is the importance of its neuron in the first
    layer at the end of training."""
    _check_positive(epochs=epochs, batch_size=batch_size)
    generator = _seeded(seed)
    inputs, labels = _tensor(x), torch.as_tensor(y, dtype=torch.int64)
    classes = int(labels.max()) + 1
    model = MLP(inputs.shape[1], tuple(hidden), classes)
    topology, optimizer = _sparse_sgd(model, generator, density, "erk", lr=lr, momentum=0.9, nesterov=True)
    steps = math.ceil(len(inputs) / batch_size)
    engine = DSTEngine(topology, preset("dast", update_every=update_every), epochs * steps, steps, seed)
    importance = engine.signals["importance"]
    train(
        model,
        engine,
        optimizer,
        inputs,
        labels,
        nn.functional.cross_entropy,
        epochs,
        batch_size,
        generator,
        "dast",
        progress,
    )
    first = next(iter(topology.layers))
    return importance.src[first].numpy().copy()


# -- NeuroFS-style ------------------------------------------------------------------------------
class InputNeuronEvolution:
    """NeuroFS's gradual input-neuron removal on the first sparse layer (dst.md 2.9).

    Starts with a random (1 - zeta_in) share of the inputs active. After epoch t (every epoch but
    the last):

        n_remove(t) = ceil((to_remove - removed) / (epoch_remove - t))   until epoch_remove = 0.65 epochs
        n_update(t) = int(removed * zeta_in * (1 - t / epochs))           newcomers tried for an epoch

    (`removed` counted after this round's removals; the reference code counts it before them, so
    its first round brings no newcomers)

    the schedule keeps `start - removed` inputs: the weakest mature active inputs go until that many
    are left (an input added in the last round is protected: it has had one epoch), then n_update
    inactive ones with the largest summed |gradient| of their missing connections join as
    newcomers; the zeta_in share of the remaining input weights closest to zero (per sign) is
    dropped and regrown by |gradient| among the active inputs back to the budget. Newcomers are
    tried before anything makes room for them, as in the reference code, where they join the
    active set: swapping them in for the weakest at once would end a short run with untrained
    inputs in the selection (at 3 epochs all 50 of K = 50: SVM 74.6% against 81.9% on
    Fashion-MNIST). The selection is the k strongest active inputs at the end.
    """

    def __init__(self, layer: SparseLayer, k: int, epochs: int, zeta: float, generator: torch.Generator):
        self.layer, self.k, self.epochs, self.zeta, self.generator = layer, k, epochs, zeta, generator
        hidden, features = layer.shape
        self.budget = layer.nnz
        start = max(k, int((1 - zeta) * features))
        self.active = torch.zeros(features, dtype=torch.bool)
        self.active[torch.randperm(features, generator=generator)[:start]] = True
        self.added_at = torch.full((features,), -2)
        self.removed_at = torch.full((features,), -1)
        self.to_remove = start - k
        self.removed = 0
        self.epoch_remove = max(1, int(0.65 * epochs))

    def columns(self, flat: torch.Tensor) -> torch.Tensor:
        return flat % self.layer.shape[1]

    def input_gradient(self) -> torch.Tensor:
        """Sum of |dense gradient| per input (the last batch of the epoch)."""
        grad = torch.cat([g for _, g in self.layer.dense_grad_chunks()]).view(self.layer.shape)
        return grad.abs().sum(0)

    @torch.no_grad()
    def evolve(self, epoch: int, optimizers) -> None:
        strength = input_strength(self.layer)
        if epoch < self.epoch_remove and self.removed < self.to_remove:
            self.removed += math.ceil((self.to_remove - self.removed) / (self.epoch_remove - epoch))
        kept = self.k + self.to_remove - self.removed  # the schedule's active inputs after this round
        mature = (self.active & (self.added_at < epoch - 1)).nonzero().squeeze(1)
        excess = min(max(0, int(self.active.sum()) - kept), mature.numel())
        weakest = mature[select_extreme(strength[mature], excess, self.generator, largest=False)]
        self.active[weakest] = False
        self.removed_at[weakest] = epoch
        n_update = int(self.removed * self.zeta * (1 - epoch / self.epochs))
        if n_update:
            gradient = self.input_gradient()
            pool = (~self.active).nonzero().squeeze(1)
            pool = pool[~torch.isin(pool, weakest)]
            added = pool[select_extreme(gradient[pool], min(n_update, pool.numel()), self.generator, largest=True)]
            self.active[added] = True
            self.added_at[added] = epoch
        values, flat = self.layer.live()
        keep = self.active[self.columns(flat)]
        gone = flat[~keep]
        kept_values, kept_flat = values[keep], flat[keep]
        gone = torch.cat([gone, kept_flat[drop_by_signed_magnitude(kept_values, self.zeta, self.generator)]])
        self.regrow(gone, optimizers)

    def regrow(self, gone: torch.Tensor, optimizers) -> None:
        """Rewire: remove `gone`, grow by |gradient| among the empty positions of active inputs
        back to the budget (a just-dropped position may come back, new)."""
        candidates = self.layer.candidates(gone)
        grad = torch.cat([g for _, g in self.layer.dense_grad_chunks()]).abs()
        everything = torch.arange(self.layer.size)
        eligible = candidates.contains(everything) & self.active[self.columns(everything)]
        eligible = eligible.nonzero().squeeze(1)
        n = self.budget - (self.layer.nnz - gone.numel())
        grown = eligible[select_extreme(grad[eligible], n, self.generator, largest=True)]
        self.layer.rewire(gone, grown, optimizers)

    @torch.no_grad()
    def start(self, optimizers) -> None:
        """Drop the connections of the inputs that start inactive, regrow them at random among
        the active ones (no gradient yet)."""
        _, flat = self.layer.live()
        gone = flat[~self.active[self.columns(flat)]]
        candidates = self.layer.candidates(gone)
        everything = torch.arange(self.layer.size)
        eligible = (candidates.contains(everything) & self.active[self.columns(everything)]).nonzero().squeeze(1)
        grown = eligible[torch.randperm(eligible.numel(), generator=self.generator)[: gone.numel()]]
        self.layer.rewire(gone, grown, optimizers)

    def scores(self) -> np.ndarray:
        """Active inputs by strength, ahead of the removed ones by how late they were removed."""
        strength = input_strength(self.layer)
        removed = (self.removed_at - self.epochs).float()  # negative: earlier removal, lower
        return torch.where(self.active, strength, removed).numpy().copy()


@register_method("neurofs", supervised=True, summary="sparse MLP removing input neurons gradually down to k (NeuroFS)")
def neurofs_scores(
    x,
    y,
    k,
    seed,
    epochs: int = 100,
    hidden: Sequence[int] = (1000, 1000, 1000),
    epsilon: float = 30.0,
    input_fraction: float = 0.2,
    hidden_fraction: float = 0.3,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 1e-5,
    batch_size: int = 100,
    progress: bool = False,
):
    """NeuroFS-style selection: a tanh MLP (ER epsilon) whose hidden layers are rewired every
    epoch (SET drop, gradient growth) while its input neurons are removed down to k."""
    _check_positive(epochs=epochs, batch_size=batch_size)
    if not 0.0 <= input_fraction < 1.0:
        raise SelectionError(f"input_fraction {input_fraction!r} must be in [0, 1)")
    generator = _seeded(seed)
    inputs, labels = _tensor(x), torch.as_tensor(y, dtype=torch.int64)
    widths = [inputs.shape[1], *hidden]
    blocks: list[nn.Module] = []
    for n_in, n_out in zip(widths[:-1], widths[1:]):
        blocks += [nn.Linear(n_in, n_out), nn.Tanh()]
    model = nn.Sequential(*blocks, nn.Linear(widths[-1], int(labels.max()) + 1))
    topology, optimizer = _sparse_sgd(
        model, generator, 1.0, "er", epsilon, lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    first = next(iter(topology.layers))
    hidden_layers = Topology({n: l for n, l in topology.layers.items() if n != first}, model)
    hidden_layers.optimizers.append(optimizer)  # the engine rewires these; `topology` already masks them
    steps = math.ceil(len(inputs) / batch_size)
    algorithm = Algorithm(
        "neurofs-hidden",
        UpdateSchedule(update_every="epoch", drop_fraction=hidden_fraction),
        SignedMagnitudeDrop(),
        GradientGrow(),
    )
    engine = DSTEngine(hidden_layers, algorithm, epochs * steps, steps, seed)
    evolution = InputNeuronEvolution(topology.layers[first], k, epochs, input_fraction, generator)
    evolution.start([optimizer])
    input_layer = topology.layers[first]

    class CaptureLastBatch:
        """Keep the first layer's dense gradient of each epoch's last batch for the evolution."""

        def __init__(self):
            self.step = 0
            input_layer.capture = steps == 1

        def __call__(self, target, output):
            self.step += 1
            input_layer.capture = (self.step + 1) % steps == 0

    def after_epoch(epoch: int) -> None:
        evolution.evolve(epoch, [optimizer])
        input_layer.clear_signals()

    train(
        model,
        engine,
        optimizer,
        inputs,
        labels,
        nn.functional.cross_entropy,
        epochs,
        batch_size,
        generator,
        "neurofs",
        progress,
        after_forward=CaptureLastBatch(),
        after_epoch=after_epoch,
    )
    return evolution.scores()
