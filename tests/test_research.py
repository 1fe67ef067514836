"""Defining behaviour of the research algorithms: SNFS, MEST, CTRE, WAST and randomized attention (DAST)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from neuroplast.dst import (
    AttentionGrow,
    DSTEngine,
    LayerSignals,
    RandomGrow,
    SimilarityGrow,
    SimilaritySimGrow,
    preset,
)
from neuroplast.dst.criteria import drop_by_attention, drop_by_magnitude_and_gradient, grow_sampled
from neuroplast.dst.signals import ActivationBuffer, NeuronImportance
from neuroplast.models import MLP
from neuroplast.sparse import sparsify
from neuroplast.sparse.layer import Candidates


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def empty(mask: torch.Tensor) -> Candidates:
    """Candidates = the positions where `mask` (flat, bool) is False."""
    free = ~mask.reshape(-1)
    return Candidates(free.numel(), int(free.sum()), lambda f: free[f])


def chunks_of(scores: torch.Tensor, chunk: int | None = None):
    flat = scores.reshape(-1)
    chunk = chunk or flat.numel()
    return lambda: (
        (torch.arange(i, min(i + chunk, flat.numel())), flat[i : i + chunk]) for i in range(0, flat.numel(), chunk)
    )


def make_sparse(density=0.3, seed=0, widths=(12, 10), backend="masked"):
    torch.manual_seed(seed)
    model = MLP(8, widths, 3)
    topology = sparsify(model, density, "uniform", backend=backend, generator=gen(seed))
    return model, topology


def batch(seed, n=16):
    g = gen(seed)
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


# -- DAST: sampled growth ------------------------------------------------------------------------
def test_sampled_growth_with_tau_to_zero_is_the_deterministic_top_k():
    scores = torch.rand(400, generator=gen(1))
    live = torch.rand(400, generator=gen(2)) < 0.3
    sampled = grow_sampled(chunks_of(scores), empty(live), 25, gen(3), tau=1e-9, random_share=0.0)
    top = AttentionGrow().select(LayerSignals(score_chunks=chunks_of(scores)), empty(live), 25, gen(3))
    masked = scores.clone()
    masked[live] = -1
    assert set(sampled.tolist()) == set(top.tolist()) == set(torch.topk(masked, 25).indices.tolist())


def test_sampled_growth_with_random_share_one_is_random_growth():
    scores = torch.rand(300, generator=gen(1))
    live = torch.rand(300, generator=gen(2)) < 0.4
    assert torch.equal(
        grow_sampled(chunks_of(scores), empty(live), 30, gen(7), tau=0.5, random_share=1.0),
        RandomGrow().select(LayerSignals(), empty(live), 30, gen(7)),
    )


def test_sampled_growth_draws_in_proportion_to_score_power():
    """Two candidates with scores 1 and 3: with tau = 1 the second is drawn first 3/4 of the
    time; with tau = 0.5 (score^2) 9/10 of the time."""
    scores = torch.tensor([1.0, 3.0])
    for tau, expected in ((1.0, 0.75), (0.5, 0.9)):
        none_live = empty(torch.zeros(2, dtype=torch.bool))
        hits = sum(int(grow_sampled(chunks_of(scores), none_live, 1, gen(s), tau, 0.0)[0]) for s in range(4000))
        assert hits / 4000 == pytest.approx(expected, abs=0.025)


def test_sampled_growth_in_chunks_equals_one_piece_and_mixes_random_and_sampled():
    scores = torch.rand(1000, generator=gen(4)) ** 4
    live = torch.rand(1000, generator=gen(5)) < 0.2
    whole = grow_sampled(chunks_of(scores), empty(live), 50, gen(6), tau=0.7, random_share=0.4)
    chunked = grow_sampled(chunks_of(scores, 77), empty(live), 50, gen(6), tau=0.7, random_share=0.4)
    assert torch.equal(whole.sort().values, chunked.sort().values)
    assert whole.numel() == whole.unique().numel() == 50 and not bool(live[whole].any())
    # the first round(0.4 * 50) = 20 are SET's random growth from the same generator
    assert torch.equal(whole[:20], RandomGrow().select(LayerSignals(), empty(live), 20, gen(6)))


# -- WAST: importance, drop, grow ----------------------------------------------------------------
def test_wast_importance_follows_its_formula():
    """I <- decay I + lam e/mean(e) + (1-lam) s/mean(s), e = mean |(a - E[a]) dL/da| over the
    batch (centred gradient x activation, E[a] the batch mean), s = sum of |w| over each
    neuron's live weights; for input and output neurons."""
    lam, decay = 0.3, 0.8
    model, topology = make_sparse()
    importance = NeuronImportance(topology.layers, lam=lam, decay=decay)
    name, layer = "features.0", topology.layers["features.0"]
    expected_src = torch.zeros(8)
    expected_dst = torch.zeros(12)
    for seed in range(3):
        x, y = batch(seed)
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()  # the hooks record this batch
        # the hooks made the data require a gradient; recompute dL/dx and dL/dy independently
        x_leaf = x.clone().requires_grad_(True)
        pre = nn.functional.linear(x_leaf, layer.weight * layer.weight_mask, layer.module.bias)
        pre.retain_grad()
        out = model.classifier(model.features[1:](pre)) if hasattr(model, "classifier") else None
        assert out is not None
        nn.functional.cross_entropy(out, y).backward()
        e_src = ((x - x.mean(0)) * x_leaf.grad).abs().mean(0)
        e_dst = ((pre - pre.mean(0)) * pre.grad).detach().abs().mean(0)
        w = (layer.weight * layer.weight_mask).detach().abs()
        s_src, s_dst = w.sum(0), w.sum(1)
        expected_src = decay * expected_src + lam * e_src / e_src.mean() + (1 - lam) * s_src / s_src.mean()
        expected_dst = decay * expected_dst + lam * e_dst / e_dst.mean() + (1 - lam) * s_dst / s_dst.mean()
        importance.update()  # no optimizer step here: weights unchanged, as in the recomputation
    torch.testing.assert_close(importance.src[name], expected_src)
    torch.testing.assert_close(importance.dst[name], expected_dst)
    importance.remove()


def test_wast_drop_is_the_sign_split_on_weight_times_importance():
    values = torch.tensor([0.5, 0.2, -0.3, -0.1, 0.4, -0.6])
    src_importance = torch.tensor([0.1, 5.0, 1.0, 10.0, 1.0, 0.1])
    # z = w * I: 0.05, 1.0, -0.3, -1.0, 0.4, -0.06; fraction 0.5: 1 of 3 positives, 1 of 3 negatives
    dropped = drop_by_attention(values, 0.5, gen(), src_importance)
    assert sorted(dropped.tolist()) == [0, 5]


def test_wast_grows_where_importance_of_source_times_destination_is_largest():
    model, topology = make_sparse(density=0.2)
    importance = NeuronImportance(topology.layers)
    name = "features.0"
    importance.src[name] = torch.arange(8, dtype=torch.float) + 1
    importance.dst[name] = torch.arange(12, dtype=torch.float) + 1
    live = topology.layers[name].weight_mask.view(-1)
    grown = AttentionGrow().select(LayerSignals(score_chunks=importance.score_chunks(name)), empty(live), 10, gen())
    scores = torch.outer(importance.dst[name], importance.src[name]).view(-1).clone()
    scores[live] = -1
    assert set(grown.tolist()) == set(torch.topk(scores, 10).indices.tolist())
    importance.remove()


# -- CTRE -------------------------------------------------------------------------------------------
def test_ctre_grows_between_the_most_co_active_neurons():
    model, topology = make_sparse(density=0.2)
    buffer = ActivationBuffer(topology.layers, samples=64)
    x, y = batch(0, n=64)
    model.train()
    model(x)
    name, layer = "features.0", topology.layers["features.0"]
    xs, ys = buffer.inputs[name], buffer.outputs[name]
    assert xs.shape == (64, 8) and ys.shape == (64, 12)
    cos = (ys / ys.norm(dim=0)).t() @ (xs / xs.norm(dim=0))  # (out, in)
    flat, scores = next(buffer.score_chunks(name)())
    torch.testing.assert_close(scores.view(12, 8), cos.abs())
    live = layer.weight_mask.view(-1)
    grown = SimilarityGrow().select(LayerSignals(score_chunks=buffer.score_chunks(name)), empty(live), 5, gen())
    ranked = cos.abs().view(-1).clone()
    ranked[live] = -1
    assert set(grown.tolist()) == set(torch.topk(ranked, 5).indices.tolist())
    buffer.remove()


def test_ctre_buffer_keeps_only_the_most_recent_samples():
    model, topology = make_sparse()
    buffer = ActivationBuffer(topology.layers, samples=20)
    model.train()
    for seed in range(3):
        x, _ = batch(seed, n=16)
        model(x)
    recent = torch.cat([batch(1, 16)[0], batch(2, 16)[0]])[-20:]
    assert torch.equal(buffer.recent("inputs", "features.0"), recent)
    with torch.no_grad():  # outputs stay row-aligned with inputs
        torch.testing.assert_close(buffer.recent("outputs", "features.0"), model.features[0](recent))
    with torch.no_grad():
        model(batch(9)[0])  # evaluation does not count
    assert buffer.inputs["features.0"].shape[0] == 20
    buffer.remove()


def test_ctre_sim_replaces_a_reselected_dropped_connection_by_a_random_one():
    scores = torch.zeros(50)
    scores[[3, 7, 11]] = torch.tensor([9.0, 8.0, 7.0])  # the three best; 7 was just dropped
    live = torch.zeros(50, dtype=torch.bool)
    live[20:30] = True
    dropped = torch.tensor([7, 21])
    live[dropped] = False
    signals = LayerSignals(score_chunks=chunks_of(scores), dropped=dropped)
    grown = SimilaritySimGrow().select(signals, empty(live), 3, gen())
    assert grown.numel() == 3 and {3, 11} <= set(grown.tolist())
    assert not set(grown.tolist()) & {7, 21} and not bool(live[grown].any())


def test_ctre_seq_switches_to_random_growth_after_the_patience():
    model, topology = make_sparse()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    topology.attach(optimizer)
    engine = DSTEngine(topology, preset("ctre-seq", switch_patience=2), total_steps=100, steps_per_epoch=10)
    for accuracy, switched in ((0.5, False), (0.6, False), (0.6, False), (0.55, True)):
        engine.observe_epoch(accuracy)
        assert engine.grow.switched == switched
    engine.remove()


def test_activation_similarity_refuses_conv_layers():
    from neuroplast.models import CNN

    model = CNN(1, 28, 10)
    topology = sparsify(model, 0.2)
    with pytest.raises(ValueError, match="Linear layers only"):
        DSTEngine(topology, preset("ctre"), total_steps=10, steps_per_epoch=5)


# -- MEST ---------------------------------------------------------------------------------------------
def test_mest_drops_by_magnitude_plus_lambda_gradient():
    values = torch.tensor([0.1, 0.2, 0.3, 0.4])
    grads = torch.tensor([10.0, 0.0, 0.0, 0.0])
    assert drop_by_magnitude_and_gradient(values, 0.25, gen(), grads, lam=0.0).tolist() == [0]
    # 0.1 + 1.0 is now the largest score
    assert drop_by_magnitude_and_gradient(values, 0.25, gen(), grads, lam=0.1).tolist() == [1]


def test_mest_elastic_mutation_halves_then_stops():
    algorithm = preset("mest")
    schedule = algorithm.schedule.at(total_steps=160, steps_per_epoch=1)
    assert schedule.fraction_at(10) == pytest.approx(0.2)
    assert schedule.fraction_at(100) == pytest.approx(0.1)  # after 56.25% of training
    assert schedule.is_update_step(119) and not schedule.is_update_step(120)  # none after 75%


# -- SNFS -----------------------------------------------------------------------------------------------
def test_snfs_redistributes_growth_by_mean_momentum_and_grows_at_largest_momentum():
    model, topology = make_sparse(density=0.3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    topology.attach(optimizer)
    engine = DSTEngine(topology, preset("snfs"), total_steps=10, steps_per_epoch=1)
    layers = topology.layers
    nnz = {name: layer.nnz for name, layer in layers.items()}
    # layer 0 gets 3x the mean |momentum| of layer 1 and the classifier none: growth follows
    for name, level in zip(layers, (3.0, 1.0, 0.0)):
        engine.signals["momentum"].momentum[name] = level * torch.rand(layers[name].shape, generator=gen(1))
    momentum = {name: m.clone() for name, m in engine.signals["momentum"].momentum.items()}
    masks = {name: layer.weight_mask.clone() for name, layer in layers.items()}
    record = engine.update()
    total_dropped = sum(l.dropped for l in record.layers)
    assert total_dropped == sum(math.ceil(0.5 * n) for n in nnz.values())  # ceil(p nnz), p = 0.5 at t = 0
    assert sum(l.grown for l in record.layers) == total_dropped  # every connection placed again
    grown = {l.name: l.grown for l in record.layers}
    assert grown["classifier"] == 0 and grown["features.0"] > grown["features.2"] > 0
    layer = layers["features.0"]
    new = (layer.weight_mask & ~masks["features.0"]).view(-1).nonzero().squeeze(1)
    # grown at the positions of largest |momentum| among those empty after the drop
    empty_after = ~masks["features.0"].view(-1)
    empty_after[new] = True
    scores = momentum["features.0"].abs().view(-1).clone()
    scores[~empty_after] = -1
    assert set(new.tolist()) <= set(torch.topk(scores, grown["features.0"]).indices.tolist())
    assert sum(layer.nnz for layer in layers.values()) == sum(nnz.values())


def test_snfs_momentum_is_an_ema_of_the_dense_gradient_and_refuses_csr():
    model, topology = make_sparse()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    topology.attach(optimizer)
    engine = DSTEngine(topology, preset("snfs", momentum_beta=0.5), total_steps=100, steps_per_epoch=50)
    grads = []
    for seed in range(2):
        optimizer.zero_grad()
        x, y = batch(seed)
        nn.functional.cross_entropy(model(x), y).backward()
        grads.append(topology.layers["features.0"].dense_grad.clone())
        optimizer.step()
        engine.step()
    torch.testing.assert_close(
        engine.signals["momentum"].momentum["features.0"], 0.5 * (0.5 * grads[0]) + 0.5 * grads[1]
    )
    _, csr_topology = make_sparse(backend="csr")
    with pytest.raises(ValueError, match="use backend 'masked'"):
        DSTEngine(csr_topology, preset("snfs"), total_steps=10, steps_per_epoch=5)


# -- every method: survival, backends ---------------------------------------------------------------------
def test_survival_is_the_share_of_last_updates_regrown_connections_not_dropped():
    model, topology = make_sparse()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    topology.attach(optimizer)
    engine = DSTEngine(topology, preset("set", update_every=1), total_steps=10, steps_per_epoch=1)
    layer = topology.layers["features.0"]
    first = engine.update()
    assert first.layers[0].survival is None
    grown = engine.last_grown["features.0"]
    with torch.no_grad():  # regrown weights are 0: make some of them large so they survive
        layer.weight.view(-1)[grown[: grown.numel() // 2]] = 5.0
    before = layer.weight_mask.clone()
    second = engine.update()
    dropped = set(_dropped(before, layer, engine))
    survived = sum(1 for f in grown.tolist() if f not in dropped)
    assert second.layers[0].survival == pytest.approx(survived / grown.numel())
    assert 0.5 <= second.layers[0].survival < 1.0


def _dropped(before, layer, engine):
    """Positions live before the last update and not live after it, nor regrown by it."""
    after = layer.weight_mask.view(-1)
    regrown = set(engine.last_grown["features.0"].tolist())
    return [f for f in before.view(-1).nonzero().squeeze(1).tolist() if not after[f] or f in regrown]


@pytest.mark.parametrize("method", ["mest", "ctre", "wast", "dast"])
def test_masked_and_csr_backends_rewire_alike(method):
    """Same seed and method: the same topology after several updates on both backends."""
    masks = {}
    for backend in ("masked", "csr"):
        model, topology = make_sparse(backend=backend)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        topology.attach(optimizer)
        overrides = {"update_every": 3, "drop_lambda": 0.1} if method == "mest" else {"update_every": 3}
        engine = DSTEngine(topology, preset(method, **overrides), total_steps=24, steps_per_epoch=6, seed=1)
        for step in range(12):
            optimizer.zero_grad()
            x, y = batch(step)
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            engine.step()
        assert engine.history, "no update happened"
        masks[backend] = {name: set(layer.live()[1].tolist()) for name, layer in topology.layers.items()}
        engine.remove()
    assert masks["masked"] == masks["csr"]


def test_dast_anneals_tau_and_random_share_from_exploring_to_exploiting():
    model, topology = make_sparse()
    algorithm = preset("dast", tau_start=2.0, tau_end=0.2, random_start=0.6, random_end=0.0)
    engine = DSTEngine(topology, algorithm, total_steps=400, steps_per_epoch=100)  # updates until step 300
    start, middle, end = (engine.grow.record(engine.schedule.progress(t)) for t in (0, 150, 300))
    assert start["tau"] == pytest.approx(2.0) and start["random_share"] == pytest.approx(0.6)
    assert middle["tau"] == pytest.approx(1.1) and middle["random_share"] == pytest.approx(0.3)
    assert end["tau"] == pytest.approx(0.2) and end["random_share"] == pytest.approx(0.0, abs=1e-12)
    engine.remove()


def test_bad_knobs_are_named():
    with pytest.raises(ValueError, match="random_start 1.5 must be in"):
        preset("dast", random_start=1.5)
    with pytest.raises(ValueError, match="unknown algorithm setting 'temperature'"):
        preset("dast", temperature=1.0)


def test_an_input_that_never_varies_gets_no_loss_driven_importance():
    """Like WAST's reconstruction error for a constant pixel, centred gradient x input is zero
    there, whether standardisation made the constant 0 or not."""
    model, topology = make_sparse()
    importance = NeuronImportance(topology.layers, lam=1.0)  # the loss-driven term alone
    x, y = batch(0)
    x[:, 3] = 0.0
    x[:, 5] = -0.81
    nn.functional.cross_entropy(model(x), y).backward()
    importance.update()
    src = importance.src["features.0"]
    assert src[3] == 0 and float(src[5]) <= 1e-6 * float(src.max()) and float(src.max()) > 0
    importance.remove()
