"""Defining behaviour of the DST criteria, schedules and engine."""

from __future__ import annotations

import math
import tomllib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from neuroplast.cli import build_parser, config_from_args
from neuroplast.dst import DSTEngine, GradientGrow, LayerSignals, RandomGrow, Schedule, knob_fields, preset
from neuroplast.dst.criteria import drop_by_magnitude, drop_by_signed_magnitude
from neuroplast.models import MLP
from neuroplast.sparse import sparsify
from neuroplast.sparse.layer import Candidates
from neuroplast.train import ConfigError, RunConfig


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def empty_positions(candidates: torch.Tensor) -> Candidates:
    flat = candidates.reshape(-1)
    return Candidates(flat.numel(), int(flat.sum()), lambda f: flat[f])


def signed_drop(weight, mask, fraction, generator):
    """SET's drop on a dense weight + mask, as flat indices."""
    flat = mask.reshape(-1).nonzero().squeeze(1)
    return flat[drop_by_signed_magnitude(weight.reshape(-1)[flat], fraction, generator)]


def gradient_signals(grad: torch.Tensor, chunk: int | None = None) -> LayerSignals:
    flat_grad = grad.reshape(-1)
    chunk = chunk or flat_grad.numel()
    return LayerSignals(
        lambda: (
            (torch.arange(i, min(i + chunk, flat_grad.numel())), flat_grad[i : i + chunk])
            for i in range(0, flat_grad.numel(), chunk)
        )
    )


# -- SET ---------------------------------------------------------------------------------------
def test_set_drop_takes_smallest_positives_and_negatives_closest_to_zero():
    weight = torch.tensor([0.9, 0.1, 0.5, 0.3, -0.05, -0.8, -0.2, -0.6, 0.7, 0.0, 0.0, -1.0])
    mask = torch.ones_like(weight, dtype=torch.bool)
    mask[8] = False  # a pruned position is never dropped
    # live positives (zeros count as positive): 0.9 0.1 0.5 0.3 0.0 0.0 -> 6, floor(0.5*6)=3
    # live negatives: -0.05 -0.8 -0.2 -0.6 -1.0 -> 5, floor(0.5*5)=2: closest to zero: -0.05, -0.2
    dropped = signed_drop(weight, mask, 0.5, gen())
    assert sorted(dropped.tolist()) == sorted([9, 10, 1, 4, 6])


def test_set_drop_is_exact_on_a_random_layer():
    g = gen(3)
    weight = torch.randn(50, 40, generator=g)
    mask = torch.rand(50, 40, generator=g) < 0.3
    dropped = set(signed_drop(weight, mask, 0.3, gen()).tolist())
    flat_w, flat_m = weight.view(-1), mask.view(-1)
    positives = sorted((float(flat_w[i]), i) for i in range(flat_w.numel()) if flat_m[i] and flat_w[i] >= 0)
    negatives = sorted(((-float(flat_w[i])), i) for i in range(flat_w.numel()) if flat_m[i] and flat_w[i] < 0)
    expected = {i for _, i in positives[: math.floor(0.3 * len(positives))]}
    expected |= {i for _, i in negatives[: math.floor(0.3 * len(negatives))]}
    assert dropped == expected


def test_ties_are_broken_by_the_seed_not_by_position():
    values = torch.zeros(1000)
    a = drop_by_magnitude(values, 0.1, gen(0))
    b = drop_by_magnitude(values, 0.1, gen(0))
    c = drop_by_magnitude(values, 0.1, gen(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.numel() == 100 and a.max() > 100  # not simply the first 100 positions


def test_random_growth_only_picks_empty_positions_uniformly():
    candidates = torch.zeros(100, dtype=torch.bool)
    candidates[::2] = True
    counts = torch.zeros(100)
    for seed in range(400):
        grown = RandomGrow().select(LayerSignals(), empty_positions(candidates), 10, gen(seed))
        assert candidates[grown].all() and grown.unique().numel() == 10
        counts[grown] += 1
    # every one of the 50 candidates is chosen about 400 * 10 / 50 = 80 times
    assert counts[~candidates].sum() == 0
    assert counts[candidates].min() > 40 and counts[candidates].max() < 130


# -- RigL --------------------------------------------------------------------------------------
def test_rigl_grows_where_dense_gradient_is_largest_among_empty_positions():
    g = gen(5)
    grad = torch.randn(30, 30, generator=g)
    candidates = torch.rand(30, 30, generator=g) < 0.5
    grown = GradientGrow().select(gradient_signals(grad), empty_positions(candidates), 17, gen())
    scores = grad.abs().view(-1).clone()
    scores[~candidates.view(-1)] = -1
    assert set(grown.tolist()) == set(torch.topk(scores, 17).indices.tolist())


def test_gradient_growth_in_chunks_equals_growth_in_one_piece():
    grad = torch.randn(40, 25, generator=gen(2))
    grad[grad.abs() < 0.5] = 0.0  # many exact ties at zero: tie-breaking must not depend on chunking
    candidates = torch.rand(40, 25, generator=gen(3)) < 0.7
    whole = GradientGrow().select(gradient_signals(grad), empty_positions(candidates), 400, gen(4))
    for chunk in (1, 7, 25, 333):
        pieces = GradientGrow().select(gradient_signals(grad, chunk), empty_positions(candidates), 400, gen(4))
        assert torch.equal(pieces.sort().values, whole.sort().values)


def test_rigl_drop_fraction_follows_the_cosine():
    schedule = preset("rigl").schedule.at(total_steps=10_000, steps_per_epoch=100)
    assert schedule.end == 7500 and schedule.every == 100
    for t in (100, 1000, 3750, 7400):
        assert schedule.fraction_at(t) == pytest.approx(0.15 * (1 + math.cos(math.pi * t / 7500)))
    assert schedule.fraction_at(3750) == pytest.approx(0.15)
    updates = [t for t in range(10_001) if schedule.is_update_step(t)]
    assert updates[0] == 100 and updates[-1] == 7400 and len(updates) == 74


def test_set_updates_after_every_epoch_but_the_last():
    schedule = preset("set").schedule.at(total_steps=5 * 30, steps_per_epoch=30)
    assert [t for t in range(151) if schedule.is_update_step(t)] == [30, 60, 90, 120]
    assert schedule.fraction_at(60) == 0.3


def test_schedule_rejects_bad_values():
    with pytest.raises(ValueError, match="choose from: constant, cosine"):
        Schedule(every=1, end=10, fraction=0.3, anneal="linear")


def make_sparse(density=0.2, seed=0, widths=(24, 24)):
    torch.manual_seed(seed)
    model = MLP(16, widths, 4)
    topology = sparsify(model, density, "uniform", generator=gen(seed))
    return model, topology


def backward(model, seed):
    g = gen(seed)
    x, y = torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,), generator=g)
    nn.functional.cross_entropy(model(x), y).backward()


def test_rigl_engine_uses_the_dense_gradient_of_the_update_step():
    model, topology = make_sparse()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: weights stay put
    topology.attach(optimizer)
    engine = DSTEngine(topology, preset("rigl", update_every=3), total_steps=30, steps_per_epoch=10)
    layer = topology.layers["features.0"]
    for step in range(1, 4):
        optimizer.zero_grad()
        assert topology.capture_dense_grad == (step == 3)
        backward(model, step)
        if step == 3:
            dense_grad = topology.layers["features.0"].dense_grad.clone()
            assert torch.all(layer.weight.grad[~layer.weight_mask] == 0)  # the optimizer saw a masked grad
            assert torch.any(dense_grad[~layer.weight_mask] != 0)
            before = layer.weight_mask.clone()
        optimizer.step()
        updated = engine.step()
    assert updated
    record = engine.history[-1]
    assert record.layers[0].grown > 0
    n = math.floor(engine.schedule.fraction_at(3) * int(before.sum()))
    grown = (layer.weight_mask & ~before).view(-1).nonzero().squeeze(1)
    # every newly grown position is among the top-|grad| positions empty after the drop
    candidates = ~before.view(-1)
    scores = dense_grad.abs().view(-1).clone()
    scores[~candidates] = -1
    top = set(torch.topk(scores, n).indices.tolist())
    assert set(grown.tolist()) <= top
    assert record.layers[0].grown == grown.numel() and int(layer.weight_mask.sum()) == int(before.sum())
    assert torch.all(layer.weight.view(-1)[grown] == 0)
    assert all(l.dense_grad is None for l in topology.layers.values())


def test_a_just_dropped_position_regrown_is_kept_with_value_and_state():
    model, topology = make_sparse()
    layer = topology.layers["features.0"]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    topology.attach(optimizer)
    backward(model, 0)
    optimizer.step()
    engine = DSTEngine(topology, preset("rigl", update_every=1, end_fraction=1.0), total_steps=10, steps_per_epoch=10)
    with torch.no_grad():
        live = layer.weight_mask.view(-1).nonzero().squeeze(1)
        weakest = int(live[0])
        layer.weight.view(-1)[weakest] = 1e-9  # surely dropped
    # the dense gradient is huge exactly there, so it is also the first position regrown
    # empty positions get gradients in [1, 2); live ones 0, except `weakest`, whose is huge
    grad = (1 + torch.rand(layer.weight.shape, generator=gen(9))) * ~layer.weight_mask
    grad.view(-1)[weakest] = 1e6
    for other in topology.layers.values():
        other.dense_grad = torch.zeros_like(other.weight)
    layer.dense_grad = grad
    momentum_before = optimizer.state[layer.weight]["momentum_buffer"].view(-1)[weakest].item()
    assert momentum_before != 0
    nnz = int(layer.weight_mask.sum())
    engine.step()
    assert layer.weight_mask.view(-1)[weakest]
    assert layer.weight.view(-1)[weakest].item() == pytest.approx(1e-9)
    assert optimizer.state[layer.weight]["momentum_buffer"].view(-1)[weakest].item() == momentum_before
    record = engine.history[-1].layers[0]
    n = math.floor(engine.schedule.fraction_at(1) * nnz)
    assert record.dropped == record.grown == n - 1  # the kept one is counted as neither


def test_set_regrowth_of_a_just_dropped_position_is_a_new_connection():
    """SET (unlike RigL) gives a regrown position the grown init (0) and fresh state."""
    torch.manual_seed(0)
    layer = nn.Linear(10, 10)
    topology = sparsify(layer, 0.5, "uniform", rescale_init=False, generator=gen(0))
    with torch.no_grad():
        layer.weight.copy_(torch.randn(10, 10, generator=gen(1)) * layer.weight_mask)
    nnz = int(layer.weight_mask.sum())
    engine = DSTEngine(topology, preset("set", drop_fraction=1.0, update_every=1), total_steps=10, steps_per_epoch=1)
    record = engine.update().layers[0]
    assert record.dropped == record.grown == nnz  # zeta = 1 drops every live weight
    assert int(layer.weight_mask.sum()) == nnz
    assert torch.all(layer.weight == 0)  # all regrown ones start at 0, none kept its old value


def test_changed_positions_get_their_optimizer_state_reset():
    model, topology = make_sparse()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    topology.attach(optimizer)
    engine = DSTEngine(topology, preset("set"), total_steps=20, steps_per_epoch=2, seed=0)
    before = {n: l.weight_mask.clone() for n, l in topology.layers.items()}
    for step in range(2):
        optimizer.zero_grad()
        backward(model, step)
        optimizer.step()
        engine.step()
    for name, layer in topology.layers.items():
        changed = layer.weight_mask ^ before[name]
        assert changed.any()
        state = optimizer.state[layer.weight]
        assert torch.all(state["exp_avg"][changed] == 0) and torch.all(state["exp_avg_sq"][changed] == 0)
        assert torch.all(layer.weight[changed] == 0)  # dropped -> 0, grown -> init 0


@settings(max_examples=20, deadline=None)
@given(
    density=st.floats(0.02, 0.9),
    fraction=st.floats(0.0, 1.0),
    method=st.sampled_from(["set", "rigl"]),
    widths=st.tuples(st.integers(2, 40), st.integers(2, 40)),
    seed=st.integers(0, 2**16),
)
def test_nnz_is_invariant_over_many_random_updates(density, fraction, method, widths, seed):
    """20 examples x 50 updates = 1,000 random drop/grow updates."""
    torch.manual_seed(seed)
    model = MLP(16, widths, 4)
    topology = sparsify(model, density, "erk", generator=gen(seed))
    nnz = {n: int(l.weight_mask.sum()) for n, l in topology.layers.items()}
    engine = DSTEngine(
        topology,
        preset(method, drop_fraction=fraction, update_every=1, end_fraction=1.0),
        total_steps=10_000,
        steps_per_epoch=1,
        seed=seed,
    )
    g = gen(seed)
    with torch.no_grad():
        for _ in range(50):
            for layer in topology.layers.values():  # random live weights, as training would leave them
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * layer.weight_mask)
            for layer in topology.layers.values():
                layer.dense_grad = torch.randn(layer.weight.shape, generator=g)
            engine.update()
            for name, layer in topology.layers.items():
                assert int(layer.weight_mask.sum()) == nnz[name]
                assert torch.all(layer.weight[~layer.weight_mask] == 0)
                assert torch.all(layer.weight_ever_active[layer.weight_mask])
    assert len(engine.history) == 50


def test_static_never_changes_and_unknown_method_is_named():
    model, topology = make_sparse()
    engine = DSTEngine(topology, preset("static"), total_steps=10, steps_per_epoch=1)
    before = {n: l.weight_mask.clone() for n, l in topology.layers.items()}
    assert not any(engine.step() for _ in range(10))
    assert all(torch.equal(before[n], l.weight_mask) for n, l in topology.layers.items())
    with pytest.raises(ValueError, match="unknown method 'magic'; choose from: dense, static, set, rigl, snfs, "):
        preset("magic")


def test_r_s_counts_positions_ever_active():
    model, topology = make_sparse(density=0.1)
    engine = DSTEngine(topology, preset("set", update_every=1), total_steps=100, steps_per_epoch=1)
    assert topology.r_s() == pytest.approx(topology.density())
    for _ in range(5):
        engine.update()
    ever = sum(int(l.weight_ever_active.sum()) for l in topology.layers.values())
    size = sum(l.weight_mask.numel() for l in topology.layers.values())
    assert topology.r_s() == ever / size > topology.density()
    assert engine.history[-1].layers[0].r_s == topology.layers["features.0"].r_s()


# -- parts own their knobs ---------------------------------------------------------------------
def test_every_knob_is_a_flag_and_a_dst_key_with_its_parts_help(tmp_path):
    train_help = " ".join(build_parser()._subparsers._group_actions[0].choices["train"].format_help().split())
    for name, f in knob_fields().items():
        assert f"--{name.replace('_', '-')}" in train_help and " ".join(f.metadata["help"].split()) in train_help
    args = build_parser().parse_args(["train", "--out", str(tmp_path), "--method", "mest", "--drop-lambda", "0.5"])
    config = config_from_args(args)
    assert config.dst == {"drop_lambda": 0.5}
    assert preset(config.method, **config.dst).drop.drop_lambda == 0.5


def test_knobs_go_to_the_parts_that_have_them():
    dast = preset("dast", drop_fraction=0.2, tau_start=2.0, drop_lambda=0.3)  # drop_lambda: MEST's, ignored
    assert dast.schedule.drop_fraction == 0.2 and dast.grow.tau_start == 2.0
    assert preset("dast", tau_start=None).grow.tau_start == preset("dast").grow.tau_start  # None keeps
    assert preset("snfs").drop.rounding == "ceil" and preset("rigl").grow.regrown_is_kept
    assert preset("wast").needs == {"importance": {"lam": 0.4, "decay": 1.0}}
    assert preset("rigl").needs == {"dense_grad": {}} and preset("static").needs == {}


def test_run_config_keeps_dst_knobs_in_one_table_and_reads_the_flat_layout():
    config = RunConfig.from_dict({"method": "wast", "update_every": 100, "dst": {"importance_decay": 0.9}}).validate()
    assert config.dst == {"importance_decay": 0.9, "update_every": 100}  # flat keys: configs saved before [dst]
    text = config.to_toml()
    assert "[dst]" in text and RunConfig.from_dict(tomllib.loads(text)).validate() == config
    assert not config.changed_from({"method": "wast", "update_every": 100, "importance_decay": 0.9})
    assert config.changed_from({"method": "wast", "update_every": 10, "importance_decay": 0.9}) == ["dst"]
    with pytest.raises(ConfigError, match="unknown dst setting 'temperature'; choose from: update_every, "):
        RunConfig(dst={"temperature": 1.0}).validate()
    with pytest.raises(ConfigError, match="drop_fraction 2.0 must be in"):
        RunConfig(dst={"drop_fraction": 2.0}).validate()
    with pytest.raises(ConfigError, match="update_every 'often' must be of type int"):
        RunConfig(dst={"update_every": "often"}).validate()
