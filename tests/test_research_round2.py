"""Defining behaviour of DAST2's parts: the centred attention signal, the supervised-attention
candidate sampler, growth shared across layers, the front-loaded schedule, the stochastic
neuron-normalised drop with protection of new connections, per-feature standardisation and the
informative share of the first layer."""

from __future__ import annotations

import math

import pytest
import torch
from test_research import batch, gen, make_sparse  # the same small sparse MLPs and batches
from torch import nn

from neuroplast.data import load_dataset
from neuroplast.dst import DSTEngine, LayerSignals, Schedule, UpdateSchedule, preset
from neuroplast.dst.analysis import first_layer_share, informative_share, random_share
from neuroplast.dst.criteria import drop_stochastic_normalised, grow_from_candidates, select_extreme
from neuroplast.dst.signals import NeuronActivity, NeuronImportance, weight_neurons
from neuroplast.models import MLP
from neuroplast.sparse import sparsify
from neuroplast.sparse.layer import Candidates


def train_steps(model, topology, engine, optimizer, steps, first_seed=0):
    for step in range(steps):
        optimizer.zero_grad()
        x, y = batch(first_seed + step)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        engine.step()


# -- 1. an input that never varies gets no importance --------------------------------------------
def test_a_constant_input_gets_zero_importance_whatever_its_value():
    """Centred attribution |(a - E[a]) dL/da|: a pixel standardised to a constant -0.81 (an empty
    Fashion-MNIST pixel with per-channel statistics) gets no loss-driven importance, and no
    supervised attention either."""
    model, topology = make_sparse(density=1.0)
    importance = NeuronImportance(topology.layers, lam=1.0)  # the loss-driven term alone
    activity = NeuronActivity(topology.layers, beta=0.0)
    x, y = batch(0)
    x[:, 3] = -0.81
    nn.functional.cross_entropy(model(x), y).backward()
    importance.update()
    activity.update()
    for src in (importance.src["features.0"], activity.src["features.0"]):
        assert float(src[3]) <= 1e-6 * float(src.max())
        assert float(src.min(0).values) >= 0 and float(src.max()) > 0
    importance.remove()
    activity.remove()


# -- 2. the supervised-attention candidate sampler -----------------------------------------------
def test_activity_is_a_moving_average_and_grad_at_is_the_exact_gradient():
    beta = 0.5
    model, topology = make_sparse()
    topology.capture_dense_grad = True
    activity = NeuronActivity(topology.layers, beta=beta)
    layer = topology.layers["features.0"]
    expected_src = torch.zeros(8)
    for seed in range(2):
        x, y = batch(seed)
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        activity.update()
        expected_src = beta * expected_src + (1 - beta) * (x - x.mean(0)).abs().mean(0)
    torch.testing.assert_close(activity.src["features.0"], expected_src)
    everywhere = torch.arange(layer.size)
    torch.testing.assert_close(activity.grad_at("features.0")(everywhere), layer.dense_grad.reshape(-1))
    activity.remove()


def test_attribution_src_is_the_centred_attribution_and_ignores_an_input_the_loss_ignores():
    """attribution_src: I_src is the moving average of |(a - E[a]) dL/da| (an autograd oracle);
    an input that varies but whose weights are all zero gets none, though its activity is large."""
    beta = 0.5
    model, topology = make_sparse(density=1.0)
    layer = topology.layers["features.0"]
    with torch.no_grad():
        layer.parameter.view(layer.shape)[:, 5] = 0.0  # the loss cannot see input 5
    activity = NeuronActivity(topology.layers, beta=beta, attribution=True)
    expected = torch.zeros(8)
    for seed in range(2):
        x, y = batch(seed)
        oracle_x = x.clone().requires_grad_(True)
        model.zero_grad()
        nn.functional.cross_entropy(model(oracle_x), y).backward()
        oracle_grad = oracle_x.grad.clone()
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        activity.update()
        expected = beta * expected + (1 - beta) * ((x - x.mean(0)) * oracle_grad).abs().mean(0)
    src = activity.src["features.0"]
    torch.testing.assert_close(src, expected)
    assert float(src[5]) == 0.0 and float((x[:, 5] - x[:, 5].mean()).abs().mean()) > 0.1
    activity.remove()
    assert preset("dast2", attribution_src=True).grow.needs["activity"]["attribution"] is True


def test_sampler_with_tau_zero_and_no_random_share_grows_the_top_exact_gradient_candidates():
    """tau -> 0, no random share: the candidates are the m empty positions of largest attention
    score, and the n grown are those of largest |exact gradient| among them."""
    n, m = 6, 30
    scores = torch.rand(400, generator=gen(1))
    gradient = torch.randn(400, generator=gen(2))
    live = torch.rand(400, generator=gen(3)) < 0.3
    free = ~live
    candidates = Candidates(400, int(free.sum()), lambda f: free[f])
    chunks = lambda: iter([(torch.arange(400), scores)])  # noqa: E731
    grown = grow_from_candidates(chunks, candidates, n, gen(4), lambda f: gradient[f], m / n, 0.0, 0.0)
    masked_scores = torch.where(free, scores, torch.full_like(scores, -1.0))
    pool = torch.topk(masked_scores, m).indices
    expected = pool[torch.topk(gradient[pool].abs(), n).indices]
    assert sorted(grown.tolist()) == sorted(expected.tolist())
    # one candidate per connection grown: the sampled candidates themselves (no gradient needed)
    alone = grow_from_candidates(chunks, candidates, n, gen(4), None, 1.0, 0.0, 0.0)
    assert sorted(alone.tolist()) == sorted(torch.topk(masked_scores, n).indices.tolist())


def test_sampler_with_all_positions_as_candidates_is_gradient_growth():
    """A candidate set covering every empty position grows where |gradient| is largest (RigL)."""
    scores, gradient = torch.rand(200, generator=gen(5)), torch.randn(200, generator=gen(6))
    free = torch.rand(200, generator=gen(7)) < 0.5
    candidates = Candidates(200, int(free.sum()), lambda f: free[f])
    chunks = lambda: iter([(torch.arange(200), scores)])  # noqa: E731
    grown = grow_from_candidates(chunks, candidates, 5, gen(8), lambda f: gradient[f], 1000.0, 1.0, 0.3)
    expected = torch.topk(torch.where(free, gradient.abs(), torch.full_like(gradient, -1.0)), 5).indices
    assert sorted(grown.tolist()) == sorted(expected.tolist())


# -- growth shared across layers -------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["masked", "csr"])
def test_redistribution_by_attention_keeps_the_global_live_count_exact(backend):
    model, topology = make_sparse(density=0.3, backend=backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    topology.attach(optimizer)
    engine = DSTEngine(topology, preset("dast2", update_every=1000), total_steps=2000, steps_per_epoch=10)
    train_steps(model, topology, engine, optimizer, 2)
    layers = topology.layers
    activity = engine.signals["activity"]
    for name, level in zip(layers, (4.0, 1.0, 0.0)):  # layer 0 has the most attention, the last none
        activity.dst[name] = activity.dst[name] * level
    before = {name: layer.nnz for name, layer in layers.items()}
    record = engine.update()
    grown = {l.name: l.grown for l in record.layers}
    dropped = {l.name: l.dropped for l in record.layers}
    assert sum(layer.nnz for layer in layers.values()) == sum(before.values())
    assert sum(grown.values()) == sum(dropped.values())
    assert grown["features.0"] > dropped["features.0"] and grown["classifier"] < dropped["classifier"]
    train_steps(model, topology, engine, optimizer, 2, first_seed=5)  # trains on with the new live counts
    engine.remove()


# -- front-loaded schedule -----------------------------------------------------------------------
def test_front_loaded_schedule_updates_often_early_and_rarely_late():
    schedule = UpdateSchedule(update_every=10, update_growth=1.5, end_fraction=0.8).at(1000, 100)
    steps = sorted(t for t in range(1, 1001) if schedule.is_update_step(t))
    intervals = [b - a for a, b in zip(steps, steps[1:])]
    assert steps[0] == 10 and steps[-1] < 800
    assert (
        all(later >= earlier for earlier, later in zip(intervals, intervals[1:])) and intervals[-1] > 5 * intervals[0]
    )
    even = Schedule(every=10, end=800, fraction=0.3)
    assert [t for t in range(1, 1001) if even.is_update_step(t)] == list(range(10, 800, 10))
    with pytest.raises(ValueError, match="update_growth 0.5 must be >= 1"):
        UpdateSchedule(update_growth=0.5)


# -- stochastic neuron-normalised drop -----------------------------------------------------------
def test_normalised_drop_with_tau_zero_drops_the_smallest_relative_magnitudes():
    shape = (4, 10)
    flat = torch.randperm(40, generator=gen(1))[:24].sort().values
    out, _ = weight_neurons(flat, shape)
    values = torch.randn(24, generator=gen(2)) * (out.double() + 1).pow(3).float()  # neurons of very different scale
    dropped = drop_stochastic_normalised(values, 0.25, gen(3), flat, shape, tau=0.0)
    mean = torch.zeros(4).index_add_(0, out, values.abs()) / torch.zeros(4).index_add_(0, out, torch.ones(24))
    relative = values.abs() / mean[out]
    assert sorted(dropped.tolist()) == sorted(select_extreme(relative, 6, gen(0), largest=False).tolist())
    # not the globally smallest |w|: those all sit in the smallest-scale neuron
    assert sorted(dropped.tolist()) != sorted(select_extreme(values.abs(), 6, gen(0), largest=False).tolist())
    stochastic = drop_stochastic_normalised(values, 0.25, gen(3), flat, shape, tau=1.0)
    assert stochastic.numel() == 6 and stochastic.unique().numel() == 6


def test_protected_connections_are_not_dropped_at_the_next_update():
    model, topology = make_sparse(density=0.3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    topology.attach(optimizer)
    algorithm = preset(
        "dast2", update_every=1000, drop_fraction=0.6, drop_anneal="constant", redistribute_attention=False
    )
    engine = DSTEngine(topology, algorithm, total_steps=4000, steps_per_epoch=10)
    train_steps(model, topology, engine, optimizer, 2)
    engine.update()
    grown = {name: g.clone() for name, g in engine.last_grown.items()}
    second = engine.update()
    for name, layer in topology.layers.items():
        assert set(grown[name].tolist()) <= set(layer.live()[1].tolist())  # every new connection is still there
    assert all(l.dropped > 0 for l in second.layers)  # while others were dropped
    assert all(l.survival == 1.0 for l in second.layers if l.survival is not None)
    # without protection, connections grown at value 0 are the first to go
    unprotected = DSTEngine(topology, algorithm.with_knobs(protect_grown=False), total_steps=4000, steps_per_epoch=10)
    train_steps(model, topology, unprotected, optimizer, 2)
    unprotected.update()
    third = unprotected.update()
    assert any(l.survival is not None and l.survival < 1.0 for l in third.layers)
    engine.remove()
    unprotected.remove()


def test_drop_needs_flat_indices_and_shape():
    part = preset("dast2").drop
    with pytest.raises(RuntimeError, match="flat indices"):
        part.select(torch.ones(4), 0.5, gen(), LayerSignals())


# -- the composition -------------------------------------------------------------------------------
def test_dast2_rewires_alike_on_masked_and_csr_layers():
    masks = {}
    for backend in ("masked", "csr"):
        model, topology = make_sparse(backend=backend)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        topology.attach(optimizer)
        engine = DSTEngine(topology, preset("dast2", update_every=2), total_steps=24, steps_per_epoch=6, seed=1)
        train_steps(model, topology, engine, optimizer, 12)
        assert len(engine.history) >= 3
        masks[backend] = {name: set(layer.live()[1].tolist()) for name, layer in topology.layers.items()}
        engine.remove()
    assert masks["masked"] == masks["csr"]


@pytest.mark.parametrize(
    ("ablation", "knob", "value"),
    [
        ("dast2-no-redistribute", "redistribute_attention", False),
        ("dast2-no-attention", "random_start", 1.0),
        ("dast2-no-gradient", "candidate_multiple", 1.0),
        ("dast2-no-frontload", "update_growth", 1.0),
        ("dast2-no-stochastic-drop", "drop_tau", 0.0),
        ("dast2-no-normalise", "neuron_normalised", False),
        ("dast2-no-protect", "protect_grown", False),
    ],
)
def test_each_ablation_removes_one_part(ablation, knob, value):
    full, removed = preset("dast2"), preset(ablation)
    part = next(p for p in (removed.schedule, removed.drop, removed.grow) if hasattr(p, knob))
    assert getattr(part, knob) == value
    assert getattr(next(p for p in (full.schedule, full.drop, full.grow) if hasattr(p, knob)), knob) != value


# -- data: per-feature standardisation -------------------------------------------------------------
def test_per_feature_standardisation_makes_a_constant_pixel_zero():
    channel = load_dataset("digits", flatten=True)
    feature = load_dataset("digits", flatten=True, standardize="feature")
    constant = (channel.x_train == channel.x_train[0]).all(0)  # pixels that never vary (digits' corners)
    assert bool(constant.any())
    assert float(channel.x_train[:, constant].abs().min()) > 0.1  # a constant, not zero, per channel
    assert bool((feature.x_train[:, constant] == 0).all())
    varying = feature.x_train[:, ~constant]
    torch.testing.assert_close(varying.mean(0), torch.zeros(varying.shape[1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(varying.std(0), torch.ones(varying.shape[1]), atol=1e-3, rtol=0)
    with pytest.raises(Exception, match="unknown standardize 'pixel'; choose from: channel, feature"):
        load_dataset("digits", standardize="pixel")


# -- 3. the informative share of the first layer -----------------------------------------------------
def test_informative_share_counts_the_live_connections_on_informative_features():
    counts = torch.tensor([4, 0, 1, 5, 0, 0, 0, 0, 0, 10])
    assert informative_share(counts, torch.tensor([0, 3])) == pytest.approx(9 / 20)
    assert informative_share(torch.zeros(4), torch.tensor([1])) == 0.0
    assert random_share(10, torch.tensor([0, 3])) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="must be in 0..9"):
        informative_share(counts, torch.tensor([12]))


@pytest.mark.parametrize("backend", ["masked", "csr"])
def test_first_layer_share_of_a_random_topology_is_near_the_random_share(backend):
    torch.manual_seed(0)
    model = MLP(200, (300,), 2)
    sparsify(model, 0.2, "uniform", backend=backend, generator=gen(0))
    informative = torch.arange(0, 200, 10)
    share = first_layer_share(model, 200, informative)
    assert share == pytest.approx(random_share(200, informative), abs=0.02)
    # a layer wired to the informative inputs only has share 1
    layer = model.features[0]
    if backend == "masked":
        with torch.no_grad():
            layer.weight_mask.zero_()
            layer.weight_mask[:, informative] = True
        assert first_layer_share(model, 200, informative) == 1.0
    assert math.isfinite(share)


def test_training_flops_follow_the_rigl_accounting():
    from neuroplast.dst.analysis import dense_epoch_flops, training_flops

    # one sparse 100 x 10 layer at density 0.1 and a dense 10 x 2 classifier; one update per epoch
    layers = [{"name": "a", "density": 0.1, "nnz": 100}, {"name": "b", "density": 1.0, "nnz": 20}]
    update = {"step": 5, "layers": [{"name": "a", "live": 100, "grown": 10}, {"name": "b", "live": 20, "grown": 0}]}
    records = [{"epoch": e, "layers": layers, "updates": [update]} for e in (1, 2)]
    samples, batch = 640, 64
    live, dense = 2 * 120, 2 * 1020  # forward FLOPs per sample
    assert dense_epoch_flops(records, samples) == samples * 3 * dense
    assert training_flops(records, "dense", samples, batch) == [samples * 3 * dense, 2 * samples * 3 * dense]
    sparse = samples * 3 * live
    assert training_flops(records, "set", samples, batch) == [sparse, 2 * sparse]
    assert training_flops(records, "rigl", samples, batch)[0] == sparse + batch * (
        dense - live
    )  # dense grad per update
    assert training_flops(records, "snfs", samples, batch)[0] == sparse + samples * (dense - live)  # ... every step
    # DAST2: exact gradients of ceil(10 x 10) = 100 candidates (of 900 empty positions) per update
    assert training_flops(records, "dast2", samples, batch)[0] == sparse + batch * 2 * 100
    assert (
        training_flops(records, "dast2", samples, batch, {"candidate_multiple": 200.0})[0] == sparse + batch * 2 * 900
    )
