"""Density distributions, sparsify(), and the masked backend's invariants."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from neuroplast.models import CNN, MLP
from neuroplast.sparse import CSRLinear, connections_per_input, layer_counts, layer_densities, sparsify

MLP_SHAPES = {"l1": (1000, 784), "l2": (1000, 1000), "l3": (1000, 1000), "out": (10, 1000)}


def test_erk_caps_a_layer_and_still_hits_the_global_density():
    d = layer_densities(MLP_SHAPES, 0.05, "erk")
    assert d["out"] == 1.0  # (1000 + 10) / (1000 * 10) scaled past 1: made dense
    assert all(0 < v < 1 for k, v in d.items() if k != "out")
    sizes = {k: math.prod(s) for k, s in MLP_SHAPES.items()}
    total = sum(sizes.values())
    assert sum(d[k] * sizes[k] for k in d) == pytest.approx(0.05 * total, rel=1e-12)
    counts = layer_counts(MLP_SHAPES, d)
    assert sum(counts.values()) == round(0.05 * total)
    assert counts["out"] == sizes["out"]


def test_erk_is_er_scaled_and_counts_kernel_dims():
    shapes = {"conv": (64, 32, 3, 3), "fc": (10, 256)}
    er = layer_densities(shapes, 0.05, "er")
    erk = layer_densities(shapes, 0.05, "erk")  # low enough that no layer is capped
    # ER ignores the kernel: raw = (64+32)/(64*32); ERK: (64+32+3+3)/(64*32*9)
    assert er["conv"] / er["fc"] == pytest.approx(((64 + 32) / (64 * 32)) / ((10 + 256) / 2560))
    assert erk["conv"] / erk["fc"] == pytest.approx(((64 + 32 + 6) / (64 * 32 * 9)) / ((10 + 256) / 2560))


def test_er_with_epsilon_is_sets_rule():
    d = layer_densities({"a": (4000, 3072), "b": (1000, 4000)}, 1.0, "er", epsilon=20)
    assert d["a"] == pytest.approx(20 * (3072 + 4000) / (3072 * 4000))
    assert d["b"] == pytest.approx(20 * 5000 / 4_000_000)


def test_uniform_and_forced_dense():
    d = layer_densities(MLP_SHAPES, 0.1, "uniform", dense_layers=["out"])
    assert d == {"l1": 0.1, "l2": 0.1, "l3": 0.1, "out": 1.0}
    with pytest.raises(ValueError, match="alone hold more than the density budget"):
        layer_densities({"a": (10, 10), "b": (1000, 1000)}, 0.00001, "erk", dense_layers=["a"])
    with pytest.raises(ValueError, match="choose from: uniform, er, erk"):
        layer_densities(MLP_SHAPES, 0.1, "gaussian")


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 300), st.integers(1, 300)), min_size=1, max_size=5),
    density=st.floats(0.01, 1.0),
    distribution=st.sampled_from(["uniform", "er", "erk"]),
)
def test_distributions_hit_the_budget_exactly(shapes, density, distribution):
    named = {f"l{i}": s for i, s in enumerate(shapes)}
    sizes = {k: math.prod(s) for k, s in named.items()}
    d = layer_densities(named, density, distribution)
    assert all(0 < v <= 1 + 1e-12 for v in d.values())
    budget = sum(d[k] * sizes[k] for k in named)
    assert budget == pytest.approx(density * sum(sizes.values()), rel=1e-9)
    counts = layer_counts(named, d)
    assert all(1 <= counts[k] <= sizes[k] for k in named)
    if all(d[k] * sizes[k] >= 1 for k in named):  # no layer bumped up to its one minimum weight
        assert sum(counts.values()) == round(budget)


def test_sparsify_mlp_exact_counts_and_zeros():
    model = MLP(784, (300, 100), 10)
    topo = sparsify(model, 0.1, "erk", generator=torch.Generator().manual_seed(0))
    total = sum(m.weight.numel() for m in topo.layers.values())
    assert sum(s.nnz for s in topo.stats()) == round(0.1 * total)
    for layer in topo.layers.values():
        assert torch.all(layer.weight[~layer.weight_mask] == 0)
        assert layer.weight_mask.dtype == torch.bool


def test_sparsify_selects_layers_by_option():
    model = MLP(20, (16, 16), 3)
    topo = sparsify(model, 0.5, "uniform", dense_first=True, dense_last=True)
    assert list(topo.layers) == ["features.2"]
    topo = sparsify(MLP(20, (16, 16), 3), 0.5, "uniform", exclude=["classifier"])
    assert list(topo.layers) == ["features.0", "features.2"]
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d"):
        sparsify(nn.Sequential(nn.ReLU()), 0.5)


def test_sparsify_cnn_conv_and_linear():
    model = CNN(3, 32, 10)
    topo = sparsify(model, 0.1, "erk", generator=torch.Generator().manual_seed(0))
    assert set(topo.layers) == {"features.0", "features.3", "classifier.1", "classifier.4"}
    assert topo.density() == pytest.approx(0.1, abs=1e-6)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_sparse_init_rescale_keeps_activation_scale():
    torch.manual_seed(0)
    dense = nn.Linear(1000, 1000)
    torch.manual_seed(0)
    sparse = nn.Linear(1000, 1000)
    sparsify(sparse, 0.05, "uniform", generator=torch.Generator().manual_seed(0))
    x = torch.randn(256, 1000)
    with torch.no_grad():
        ratio = sparse(x).std() / dense(x).std()
    assert 0.85 < float(ratio) < 1.15


def train_steps(model, optimizer, steps=25, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 20, generator=g)
        y = torch.randint(0, 3, (16,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    ],
    ids=["sgd-momentum", "adamw"],
)
def test_pruned_weights_stay_exactly_zero_and_out_of_optimizer_state(make_optimizer):
    torch.manual_seed(0)
    model = MLP(20, (32, 32), 3)
    topo = sparsify(model, 0.2, "uniform", generator=torch.Generator().manual_seed(1))
    optimizer = make_optimizer(model.parameters())
    topo.attach(optimizer)
    train_steps(model, optimizer)
    for layer in topo.layers.values():
        pruned = ~layer.weight_mask
        assert torch.all(layer.weight[pruned] == 0)
        assert torch.any(layer.weight[layer.weight_mask] != 0)
        for value in optimizer.state[layer.weight].values():
            if torch.is_tensor(value) and value.shape == layer.weight.shape:
                assert torch.all(value[pruned] == 0), "pruned gradients must not feed the optimizer state"


def test_state_dict_roundtrips_weights_and_masks():
    torch.manual_seed(0)
    model = MLP(20, (32, 32), 3)
    sparsify(model, 0.2, "erk", generator=torch.Generator().manual_seed(1))
    state = model.state_dict()
    assert any(k.endswith("weight_mask") for k in state)
    other = MLP(20, (32, 32), 3)
    sparsify(other, 0.2, "erk", generator=torch.Generator().manual_seed(2))  # a different mask
    other.load_state_dict(state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, other.state_dict()[key]), key


def masked_mlp(seed=1):
    torch.manual_seed(0)
    model = MLP(20, (32, 32), 3)
    topology = sparsify(model, 0.2, "uniform", generator=torch.Generator().manual_seed(seed))
    return model, topology


def pruned_are_zero(topology) -> bool:
    return all(bool(torch.all(layer.weight[~layer.weight_mask] == 0)) for layer in topology.layers.values())


def test_a_dense_state_dict_loaded_into_a_masked_model_is_masked():
    """As with torch.nn.utils.prune: pruned weights stay zero however the weight is written."""
    model, topology = masked_mlp()
    dense = {k: v for k, v in MLP(20, (32, 32), 3).state_dict().items()}  # no masks, every weight nonzero
    model.load_state_dict(dense, strict=False)
    assert pruned_are_zero(topology)  # masked right after the load, before any forward
    state = model.state_dict()
    assert all(torch.all(state[f"{n}.weight"][~state[f"{n}.weight_mask"]] == 0) for n in topology.layers)


def test_a_manual_edit_and_an_ema_copy_are_masked_before_they_are_used():
    model, topology = masked_mlp()
    layer = topology.layers["features.0"]
    pruned = (~layer.weight_mask).nonzero()[0].tolist()
    x = torch.randn(4, 20)
    expected = model(x)
    with torch.no_grad():
        layer.weight[tuple(pruned)] = 5.0  # a manual edit of a pruned weight
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)  # masked before the forward
    assert pruned_are_zero(topology)
    ema = copy.deepcopy(model)  # an EMA model: its own hooks check its own weights
    with torch.no_grad():
        for average, source in zip(ema.parameters(), MLP(20, (32, 32), 3).parameters()):
            average.mul_(0.5).add_(source, alpha=0.5)
    ema(x)
    for name in topology.layers:
        module = ema.get_submodule(name)
        assert torch.all(module.weight[~module.weight_mask] == 0)
    with torch.no_grad():
        layer.weight.data = torch.randn_like(layer.weight)  # a new tensor behind the parameter
    assert topology.layers["features.0"].neuron_magnitudes()[0].shape == (32,)
    assert pruned_are_zero(topology)  # the topology's own reads mask first too


def test_the_mask_check_leaves_training_unchanged():
    """The check masks only weights written since the last mask: a training step is unchanged,
    bit for bit, against masking after every step alone (the hooks removed)."""
    results = []
    for hooks in (True, False):
        model, topology = masked_mlp()
        if not hooks:
            for layer in topology.layers.values():
                layer.remove()
                layer.module.weight.register_hook(layer._mask_grad)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        topology.attach(optimizer)
        train_steps(model, optimizer)
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def plain_state(model: nn.Module) -> bool:
    return not any(k.endswith(("weight_mask", "weight_ever_active")) for k in model.state_dict())


def no_hooks(model: nn.Module) -> bool:
    return not any(
        m._forward_pre_hooks or m._state_dict_pre_hooks or m._load_state_dict_post_hooks for m in model.modules()
    ) and not any(p._backward_hooks for p in model.parameters())


@pytest.mark.parametrize("model_class", ["mlp", "cnn"])
def test_finalize_bakes_the_masks_into_a_plain_model(model_class):
    torch.manual_seed(0)
    model = MLP(20, (32, 32), 3) if model_class == "mlp" else CNN(3, 8, 10)
    topology = sparsify(model, 0.2, "uniform", generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    topology.attach(optimizer)
    x = torch.randn(4, 20) if model_class == "mlp" else torch.randn(2, 3, 8, 8)
    expected = model(x)
    nnz = sum(s.nnz for s in topology.stats())
    plain = topology.finalize()
    assert plain is model and topology.layers == {}
    assert plain_state(plain) and no_hooks(plain)
    torch.testing.assert_close(plain(x), expected, rtol=0, atol=0)
    fresh = MLP(20, (32, 32), 3) if model_class == "mlp" else CNN(3, 8, 10)
    fresh.load_state_dict(plain.state_dict())  # a plain model's state_dict, strict
    weights = [m.weight for m in plain.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert sum(int((w != 0).sum()) for w in weights) <= nnz
    optimizer.step()  # the topology let go of its optimizer hook
    with pytest.raises(ValueError, match="unknown csr 'coo'; choose from: sparse, dense"):
        topology.finalize(csr="coo")


@pytest.mark.parametrize("csr", ["sparse", "dense"])
def test_finalize_keeps_csr_layers_sparse_or_makes_them_dense(csr):
    torch.manual_seed(0)
    model = MLP(20, (32, 32), 3)
    topology = sparsify(model, 0.2, "uniform", backend="csr", generator=torch.Generator().manual_seed(1))
    x = torch.randn(4, 20)
    expected = model(x).detach()
    plain = topology.finalize(csr=csr)
    kind = CSRLinear if csr == "sparse" else nn.Linear
    assert all(isinstance(plain.get_submodule(n), kind) for n in ("features.0", "features.2", "classifier"))
    torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-6)
    assert no_hooks(plain)
    if csr == "dense":
        MLP(20, (32, 32), 3).load_state_dict(plain.state_dict())


@pytest.mark.parametrize("backend", ["masked", "csr"])
def test_connections_per_input_of_a_model_and_of_its_state(backend):
    torch.manual_seed(0)
    model = MLP(20, (32, 16), 3)
    sparsify(model, 0.3, "uniform", backend=backend, generator=torch.Generator().manual_seed(1))
    reference = MLP(20, (32, 16), 3)
    sparsify(reference, 0.3, "uniform", generator=torch.Generator().manual_seed(1))
    expected = {name: m.weight_mask.sum(0) for name, m in reference.named_modules() if hasattr(m, "weight_mask")}
    counts = connections_per_input(model)
    assert list(counts) == ["features.0", "features.2", "classifier"]
    assert all(torch.equal(counts[n], expected[n]) for n in counts)
    assert list(connections_per_input(model, in_features=32)) == ["features.2"]
    from_state = connections_per_input(model.state_dict(), in_features=20)
    assert list(from_state) == ["features.0"] and torch.equal(from_state["features.0"], expected["features.0"])
    if backend == "csr":  # a saved csr layer does not record its width
        assert connections_per_input(model.state_dict()) == {}


def test_connections_per_input_of_a_convolution_count_per_channel():
    model = CNN(3, 8, 10)
    sparsify(model, 0.2, "uniform", generator=torch.Generator().manual_seed(0))
    conv = model.features[0]
    counts = connections_per_input(model)["features.0"]
    assert counts.shape == (3,) and int(counts.sum()) == int(conv.weight_mask.sum())
