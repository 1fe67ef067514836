"""The csr backend against the masked backend (the oracle): same results for the same seed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from neuroplast.dst import DSTEngine, preset
from neuroplast.models import CNN, MLP
from neuroplast.sparse import sparsify
from neuroplast.sparse.csr import CSRLinear


def pair(density=0.1, seed=0, widths=(48, 40), n_in=30):
    """The same model, sparsified by both backends from the same seed."""
    models, topologies = [], []
    for backend in ("masked", "csr"):
        torch.manual_seed(seed)
        model = MLP(n_in, widths, 5)
        topologies.append(
            sparsify(model, density, "erk", backend=backend, generator=torch.Generator().manual_seed(seed))
        )
        models.append(model)
    return models, topologies


def live_weights(topology) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: layer.live() for name, layer in topology.layers.items()}


def assert_same_topology(masked, csr, atol=1e-6):
    for name in masked.layers:
        (mv, mf), (cv, cf) = masked.layers[name].live(), csr.layers[name].live()
        assert torch.equal(mf, cf), f"{name}: different live positions"
        torch.testing.assert_close(mv, cv, atol=atol, rtol=1e-5)


def batch(seed, n_in=30, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, n_in, generator=g), torch.randint(0, 5, (n,), generator=g)


def test_csr_layers_hold_only_live_weights():
    (masked, csr), (tm, tc) = pair()
    assert all(isinstance(l.module, CSRLinear) for l in tc.layers.values())
    assert not any(p.dim() == 2 for p in csr.parameters()), "no dense weight may exist in the csr model"
    assert tm.density() == tc.density() and [s.nnz for s in tm.stats()] == [s.nnz for s in tc.stats()]
    assert_same_topology(tm, tc)


@pytest.mark.parametrize("kernels", ["numba", "torch"])
def test_memory_bytes_count_every_array_the_layer_keeps(monkeypatch, kernels):
    from neuroplast.sparse import kernels as kernel_module

    if kernels == "numba" and kernel_module.backend() != "numba":
        pytest.skip("numba is not available")
    monkeypatch.setenv("NEUROPLAST_KERNELS", kernels)
    layer = CSRLinear.random(30, 20, 100, torch.Generator().manual_seed(0))
    inverse = 4 * 100 if kernels == "numba" else 0  # int32 inverse permutation of the numba backward
    assert layer.memory_bytes() == {
        "values": 4 * 100,
        "indices": 8 * (20 + 1) + 8 * 100,
        "transpose": 8 * (30 + 1) + 8 * 100 + 8 * 100 + inverse,
        "dense_equivalent": 4 * 20 * 30,
    }


def test_forward_and_gradients_match_the_masked_backend():
    (masked, csr), (tm, tc) = pair()
    x, y = batch(0)
    xm, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    lm, lc = F.cross_entropy(masked(xm), y), F.cross_entropy(csr(xc), y)
    torch.testing.assert_close(lm, lc)
    lm.backward()
    lc.backward()
    torch.testing.assert_close(xm.grad, xc.grad, atol=1e-6, rtol=1e-5)
    for name in tm.layers:
        mask_layer, csr_layer = tm.layers[name], tc.layers[name]
        _, flat = csr_layer.live()
        values_grad = csr_layer.module.values.grad
        assert values_grad.shape == (csr_layer.nnz,), "the csr weight gradient must be per live weight, never dense"
        torch.testing.assert_close(values_grad, mask_layer.weight.grad.view(-1)[flat], atol=1e-6, rtol=1e-5)


def test_gradient_check_of_the_sparse_function():
    from neuroplast.sparse.csr import _SparseLinearFunction

    torch.manual_seed(0)
    linear = torch.nn.Linear(7, 5).double()
    flat = torch.tensor([0, 3, 8, 9, 13, 20, 21, 22, 34])  # row 3 (positions 21..27) has one entry
    layer = CSRLinear.from_linear(linear, flat)
    x = torch.randn(4, 7, dtype=torch.double, requires_grad=True)
    inputs = (x, layer.values, layer.bias)
    assert torch.autograd.gradcheck(lambda x, v, b: _SparseLinearFunction.apply(x, v, b, layer, x.dtype), inputs)


@pytest.mark.parametrize("shape", ["2d", "3d", "strided"])
def test_numba_and_torch_paths_agree_on_all_gradients(monkeypatch, shape):
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(12, 9, generator=g) < 0.3
    mask[4] = False  # an empty row
    layer = CSRLinear.from_linear(torch.nn.Linear(9, 12), mask.view(-1).nonzero().squeeze(1))
    base = torch.randn(6, 18, generator=g)
    x = {"2d": base[:, :9], "3d": base.reshape(6, 2, 9), "strided": base[:, ::2]}[shape]  # [:, ::2] is non-contiguous
    results = {}
    for which in ("numba", "torch"):
        monkeypatch.setenv("NEUROPLAST_KERNELS", which)
        xi = x.clone().requires_grad_() if shape != "strided" else base.clone().requires_grad_()
        inp = xi[:, ::2] if shape == "strided" else xi
        layer.values.grad = layer.bias.grad = None
        out = layer(inp)
        out.backward(torch.ones_like(out) * torch.arange(out.shape[-1]))
        results[which] = (out.detach(), xi.grad, layer.values.grad.clone(), layer.bias.grad.clone())
    for fast, reference in zip(results["numba"], results["torch"]):
        torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)


def test_a_layer_without_live_weights():
    layer = CSRLinear.from_linear(torch.nn.Linear(6, 4), torch.empty(0, dtype=torch.long))
    x = torch.randn(3, 6, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    torch.testing.assert_close(out, layer.bias.detach().expand(3, 4))
    assert torch.all(x.grad == 0) and layer.values.grad.numel() == 0


def test_rewiring_between_forward_and_backward_is_refused():
    (_, csr), (_, tc) = pair()
    x, y = batch(0)
    loss = F.cross_entropy(csr(x), y)
    DSTEngine(tc, preset("set", update_every=1), total_steps=10, steps_per_epoch=1).update()
    with pytest.raises(RuntimeError, match="changed between its forward and backward"):
        loss.backward()


def test_in_place_activation_after_a_csr_layer():
    (_, csr), _ = pair()
    x, _ = batch(0)
    layer = csr.features[0]
    out = torch.relu_(layer(x))
    out.sum().backward()
    assert layer.values.grad is not None


class SharedLayer(torch.nn.Module):
    """The same square layer applied twice (weight sharing)."""

    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(20, 20)
        self.head = torch.nn.Linear(20, 5)

    def forward(self, x):
        return self.head(torch.relu(self.inner(torch.relu(self.inner(x)))))


def test_rigl_growth_sees_every_use_of_a_shared_layer():
    topologies = []
    for backend in ("masked", "csr"):
        torch.manual_seed(0)
        model = SharedLayer()
        topology = sparsify(model, 0.2, "uniform", backend=backend, generator=torch.Generator().manual_seed(0))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        topology.attach(optimizer)
        engine = DSTEngine(topology, preset("rigl", update_every=1), total_steps=10, steps_per_epoch=10)
        x, y = batch(0, n_in=20)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        engine.step()
        topologies.append(topology)
    assert_same_topology(*topologies)


def test_an_optimizer_made_before_sparsify_is_refused():
    torch.manual_seed(0)
    model = MLP(30, (16,), 5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    topology = sparsify(model, 0.2, backend="csr")
    with pytest.raises(ValueError, match="create it after sparsify"):
        topology.attach(optimizer)
    engine = DSTEngine(topology, preset("set"), total_steps=10, steps_per_epoch=1)
    with pytest.raises(RuntimeError, match="no optimizer is attached"):
        engine.step()


def test_a_checkpoint_of_another_shape_is_refused():
    small = CSRLinear.from_linear(torch.nn.Linear(6, 4), torch.tensor([0, 5, 9]))
    large = CSRLinear.from_linear(torch.nn.Linear(60, 4), torch.tensor([0, 50, 59, 100]))
    with pytest.raises(RuntimeError, match="column indices outside"):
        small.load_state_dict(large.state_dict())
    other_rows = CSRLinear.from_linear(torch.nn.Linear(6, 7), torch.tensor([0, 5, 9]))
    with pytest.raises(RuntimeError, match="crow has 8 entries"):
        small.load_state_dict(other_rows.state_dict())


@pytest.mark.parametrize("method", ["set", "rigl"])
@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_training_with_rewiring_matches_the_masked_backend(method, optimizer_name):
    (masked, csr), (tm, tc) = pair(density=0.15)
    engines, optimizers = [], []
    for model, topology in ((masked, tm), (csr, tc)):
        if optimizer_name == "sgd":
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
        else:
            optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05)
        topology.attach(optimizer)
        optimizers.append(optimizer)
        engines.append(DSTEngine(topology, preset(method, update_every=4), total_steps=40, steps_per_epoch=4, seed=3))
    for step in range(24):
        x, y = batch(step)
        for model, optimizer, engine in zip((masked, csr), optimizers, engines):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            engine.step()
        assert_same_topology(tm, tc, atol=1e-5)
    assert len(engines[0].history) == len(engines[1].history) == 6  # steps 4, 8, ..., 24
    for update_m, update_c in zip(engines[0].history, engines[1].history):
        assert [(l.live, l.dropped, l.grown, l.r_s) for l in update_m.layers] == [
            (l.live, l.dropped, l.grown, l.r_s) for l in update_c.layers
        ]
    # optimizer state carried across rewiring: equal at every live position
    for name in tm.layers:
        _, flat = tc.layers[name].live()
        state_m = optimizers[0].state[tm.layers[name].weight]
        state_c = optimizers[1].state[tc.layers[name].module.values]
        for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
            if key in state_m:
                torch.testing.assert_close(state_c[key], state_m[key].view(-1)[flat], atol=1e-5, rtol=1e-4)


def test_index_arrays_are_valid_after_rewiring(monkeypatch):
    monkeypatch.setenv("NEUROPLAST_KERNELS", "torch")  # the torch path builds (and here validates) CSR tensors
    (_, csr), (_, tc) = pair()
    engine = DSTEngine(tc, preset("set", update_every=1), total_steps=10, steps_per_epoch=1)
    for _ in range(3):
        engine.update()
    with torch.sparse.check_sparse_tensor_invariants():
        x, y = batch(0)
        F.cross_entropy(csr(x), y).backward()
    for layer in tc.layers.values():
        module = layer.module
        assert torch.all(module.crow.diff() >= 0) and module.crow[-1] == module.nnz
        flat = module.flat_index()
        assert torch.all(flat.diff() > 0), "positions sorted and distinct"
        transposed = torch.sparse_csr_tensor(
            module.crow_t,
            module.col_t,
            module.values.detach()[module.perm_t],
            (module.in_features, module.out_features),
            check_invariants=True,
        )
        assert torch.equal(transposed.to_dense(), module.to_dense().t())


def test_csr_state_dict_roundtrips_across_topologies():
    (_, csr), (_, tc) = pair(seed=0)
    engine = DSTEngine(tc, preset("set", update_every=1), total_steps=10, steps_per_epoch=1)
    engine.update()  # grow the ever-active set: its size differs from a fresh model's
    state = csr.state_dict()
    (_, other), _ = pair(seed=1)  # different nnz per layer
    other.load_state_dict(state)
    x, y = batch(0)
    torch.testing.assert_close(other(x), csr(x))
    F.cross_entropy(other(x), y).backward()  # the loaded pattern trains
    assert all(m.values.grad.shape == m.values.shape for m in other.modules() if isinstance(m, CSRLinear))
    for key, value in csr.state_dict().items():
        assert torch.equal(value, other.state_dict()[key]), key


def test_csr_rejects_convolutions():
    with pytest.raises(ValueError, match="backend 'csr' supports nn.Linear layers only; features.0 is Conv2d"):
        sparsify(CNN(1, 28, 10), 0.1, backend="csr")


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_trainer_csr_matches_masked_and_resumes_exactly(tmp_path, method):
    from neuroplast.train import RunConfig, train

    def config(backend):
        return RunConfig(
            dataset="digits",
            method=method,
            backend=backend,
            hidden=[64, 64],
            epochs=4,
            batch_size=64,
            density=0.1,
            dst={"update_every": 7} if method == "rigl" else {},
        )

    def metrics(folder):
        import json

        return [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines()]

    train(config("masked"), tmp_path / "masked", progress=False, log=None)
    train(config("csr"), tmp_path / "csr", progress=False, log=None)
    assert len(metrics(tmp_path / "masked")) == len(metrics(tmp_path / "csr")) == 4
    for a, b in zip(metrics(tmp_path / "masked"), metrics(tmp_path / "csr")):
        assert a["layers"] == b["layers"] and a["r_s"] == b["r_s"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert abs(a["test_accuracy"] - b["test_accuracy"]) <= 0.005

    def crash_after_epoch_2(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config("csr"), tmp_path / "resumed", progress=False, log=None, on_epoch_end=crash_after_epoch_2)
    train(config("csr"), tmp_path / "resumed", resume=True, progress=False, log=None)
    strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rs]  # noqa: E731
    assert strip(metrics(tmp_path / "resumed")) == strip(metrics(tmp_path / "csr"))


@pytest.mark.skipif(
    __import__("neuroplast.sparse.kernels", fromlist=["backend"]).backend() != "numba",
    reason="numba kernels not available",
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 5, 128])
@pytest.mark.parametrize("rows, cols", [(37, 23), (7, 90)])
def test_numba_kernels_match_torch_sparse(monkeypatch, batch, rows, cols, dtype):
    """Every product, with float32 or bfloat16 activations (values stay float32): the same
    results, in the same dtypes, as torch.sparse computing in float32."""
    from neuroplast.sparse import kernels

    monkeypatch.setattr(kernels, "FEW_ROWS_INPUT", 0)  # take the column-parallel forward at this size

    g = torch.Generator().manual_seed(batch)
    density = torch.rand(rows, 1, generator=g)  # rows from empty to dense: every unroll tail occurs
    mask = torch.rand(rows, cols, generator=g) < density
    mask[3] = False
    flat = mask.view(-1).nonzero().squeeze(1)
    layer = CSRLinear.from_linear(torch.nn.Linear(cols, rows), flat)
    xt, gt = torch.randn(cols, batch, generator=g).to(dtype), torch.randn(rows, batch, generator=g).to(dtype)
    odd_shapes = [torch.randn(shape, generator=g).to(dtype) for shape in [(8, 16), (1, 5), (37, 19), (19, 37)]]
    results = {}
    for which in ("numba", "torch"):
        monkeypatch.setenv("NEUROPLAST_KERNELS", which)
        results[which] = (
            kernels.spmm_t(layer.pattern, layer.values, xt, rows),
            kernels.spmm_t(layer.pattern_t, layer.values, gt, cols),
            kernels.sddmm(layer.pattern, gt, xt),
            kernels.spmm_t(layer.pattern, layer.values, xt, rows, bias=layer.bias),
            kernels.transposed(xt),
            *kernels.sddmm(layer.pattern, gt, xt, row_sums=True),
            *kernels.backward_t(layer.pattern, layer.pattern_t, layer.values, gt, xt),
            kernels.spmm_t(layer.pattern, layer.values, xt, rows, bias=layer.bias, pattern_t=layer.pattern_t),
            *(kernels.transposed(a) for a in odd_shapes),
        )
    for fast, reference in zip(results["numba"], results["torch"], strict=True):
        # a bfloat16 output may round a float32 sum summed in another order to the next value
        tolerance = 1e-5 if fast.dtype == torch.float32 else 1e-2
        torch.testing.assert_close(fast, reference, atol=tolerance, rtol=tolerance)
    a, f = dtype, torch.float32  # activations keep their dtype; weight and bias gradients are float32
    assert [r.dtype for r in results["numba"][:10]] == [a, a, f, a, a, f, f, a, f, a]


@pytest.mark.skipif(
    __import__("neuroplast.sparse.kernels", fromlist=["backend"]).backend() != "numba",
    reason="numba kernels not available",
)
def test_bfloat16_outputs_round_to_nearest_even_as_torch_does():
    """The kernels write bfloat16 rows by rounding float32 sums: exactly torch's rounding,
    ties to even included, infinities kept, and a NaN stays a NaN."""
    from neuroplast.sparse import kernels

    g = torch.Generator().manual_seed(0)
    scale = 10.0 ** torch.randint(-30, 30, (4000,), generator=g).float()
    ties = ((torch.randint(0, 2**15, (64,), generator=g, dtype=torch.int32) << 16) | 0x8000).view(torch.float32)
    special = torch.tensor([0.0, 1e-40, -3e-39, 3.3e38, -3.39e38, float("inf"), -float("inf"), float("nan")])
    sums = torch.cat([torch.randn(4000, generator=g) * scale, ties, special])
    # an (n x 1) layer whose weights are the sums, times an input of 1: row r's float32 sum is sums[r]
    layer = CSRLinear.from_linear(torch.nn.Linear(1, sums.numel()), torch.arange(sums.numel()))
    layer.values.data.copy_(sums)
    one = torch.ones(1, 1, dtype=torch.bfloat16)
    got = kernels.spmm_t(layer.pattern, layer.values, one, sums.numel())[:, 0]
    expected = sums.to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got.isnan(), expected.isnan()) and int(got.isnan().sum()) == 1
    finite = ~expected.isnan()
    assert torch.equal(got[finite].view(torch.int16), expected[finite].view(torch.int16))


@pytest.mark.parametrize("kernels", ["numba", "torch"])
def test_under_bfloat16_autocast_activations_are_bfloat16_and_weights_stay_float32(monkeypatch, kernels):
    """As nn.Linear under torch.autocast: bfloat16 outputs and input gradients, values and their
    gradient float32; against float32, no less accurate than the masked layers under the same
    autocast (which round each product's output to bfloat16 too)."""
    monkeypatch.setenv("NEUROPLAST_KERNELS", kernels)
    (masked_model, csr_model), (masked_topology, csr_topology) = pair(density=0.3)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(16, 30, generator=g), torch.randint(0, 5, (16,), generator=g)

    def run(model, topology, autocast):
        leaf = x.clone().requires_grad_()
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            hidden = model.features[0](leaf)  # the first sparse layer on its own
            logits = model(leaf)
            loss = F.cross_entropy(logits, y)
        loss.backward()
        live_grads = [
            layer.module.values.grad if isinstance(layer.module, CSRLinear) else layer.module.weight.grad.view(-1)[flat]
            for layer in topology.layers.values()
            for flat in [layer.live()[1]]
        ]
        return hidden.detach(), logits.detach(), leaf.grad, torch.cat(live_grads)

    reference = run(csr_model, csr_topology, autocast=False)
    masked = run(masked_model, masked_topology, autocast=True)
    ours = run(csr_model, csr_topology, autocast=True)
    assert ours[0].dtype == ours[1].dtype == masked[1].dtype == torch.bfloat16 and ours[2].dtype == torch.float32
    assert all(layer.module.values.grad.dtype == torch.float32 for layer in csr_topology.layers.values())
    error = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    for name, mine, theirs, exact in zip(("hidden", "logits", "input grad", "weight grads"), ours, masked, reference):
        assert error(mine, exact) <= max(1.5 * error(theirs, exact), 0.01), name


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_training_under_bfloat16_autocast_with_rewiring(method):
    """The engine rewires a csr model trained under autocast (RigL's growth reads the bfloat16
    activations and gradients it captured) and the losses follow float32 training's."""
    curves = {}
    for autocast in (False, True):
        torch.manual_seed(0)
        model = MLP(30, (48, 40), 5)
        topology = sparsify(model, 0.3, "erk", backend="csr", generator=torch.Generator().manual_seed(0))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        topology.attach(optimizer)
        engine = DSTEngine(topology, preset(method, update_every=3), total_steps=30, steps_per_epoch=3)
        x, y = batch(0, n=64)
        curves[autocast] = []
        for _ in range(12):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            engine.step()
            curves[autocast].append(loss.item())
        assert len(engine.history) == 4 and all(record.layers[0].dropped > 0 for record in engine.history)
    assert curves[True][-1] < curves[True][0] - 0.1
    torch.testing.assert_close(torch.tensor(curves[True]), torch.tensor(curves[False]), atol=0.01, rtol=0)


@pytest.mark.parametrize("feature_major", [False, True])
def test_input_gradient_comes_back_in_the_inputs_layout(feature_major):
    """A batch-major x gets a batch-major dx (no copy for autograd to make); a transposed view
    (what a CSRLinear hands the next one) gets a transposed view back. Values match the masked layer."""
    models = []
    for backend in ("masked", "csr"):
        torch.manual_seed(3)
        models.append(torch.nn.Sequential(torch.nn.Linear(30, 20)))
        sparsify(models[-1], 0.3, "uniform", backend=backend, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(30, 12, generator=g).t() if feature_major else torch.randn(12, 30, generator=g)
    grads = []
    for model in models:
        leaf = x.detach().clone() if not feature_major else x.detach().t().clone().t()
        leaf.requires_grad_(True)
        grads.append(torch.autograd.grad(model(leaf).pow(2).sum(), leaf)[0])  # as returned, before accumulation
    assert grads[1].t().is_contiguous() == feature_major and grads[1].is_contiguous() != feature_major
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-5)


def test_kernels_leave_torchs_thread_count_alone():
    """numba's OpenMP layer shares the runtime with torch; a kernel must not change torch's count."""
    import subprocess
    import sys

    code = (
        "import torch; torch.set_num_threads(1)\n"
        "from neuroplast.sparse.csr import CSRLinear\n"
        "layer = CSRLinear.random(100, 50, 500)\n"
        "x = torch.randn(8, 100, requires_grad=True); layer(x).sum().backward()\n"
        "print(torch.get_num_threads())\n"
    )
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip().splitlines()[-1] == "1"


def test_random_csr_layers_train_under_the_engine():
    from torch import nn

    from neuroplast.sparse.topology import Topology

    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(CSRLinear.random(30, 64, 300, generator), nn.ReLU(), CSRLinear.random(64, 5, 100, generator))
    topology = Topology.of_csr_layers(model)
    assert [layer.nnz for layer in topology.layers.values()] == [300, 100]
    flat = topology.layers["0"].module.flat_index()
    assert flat.unique().numel() == 300 and int(flat.max()) < 30 * 64
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    topology.attach(optimizer)
    engine = DSTEngine(topology, preset("set", update_every=2), total_steps=20, steps_per_epoch=2)
    for step in range(6):
        x, y = batch(step)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        engine.step()
    assert len(engine.history) == 3 and [layer.nnz for layer in topology.layers.values()] == [300, 100]


def test_sampling_positions_without_enumerating_them(monkeypatch):
    from neuroplast.sparse import sampling

    monkeypatch.setattr(sampling, "ENUMERATE_UP_TO", 100)  # force the rejection sampler
    positions = sampling.sample_positions(10_000, 3_000, torch.Generator().manual_seed(0))
    assert positions.numel() == 3_000 and positions.unique().numel() == 3_000
    assert torch.all(positions.diff() > 0) and 0 <= int(positions.min()) and int(positions.max()) < 10_000
    # uniform: each tenth of the range holds about a tenth of the positions
    counts = torch.bincount(positions // 1_000, minlength=10)
    assert int(counts.min()) > 240 and int(counts.max()) < 360


def test_retain_freed_memory_is_a_block_that_restores_the_allocator():
    from neuroplast.sparse import retain_freed_memory

    with retain_freed_memory() as active:
        assert isinstance(active, bool)
        for _ in range(3):  # big allocations, freed and made again, inside the block
            big = torch.ones(40 * 2**20 // 4)
            assert float(big[-1]) == 1.0
            del big
    after = torch.zeros(40 * 2**20 // 4)  # and after it
    assert float(after.sum()) == 0.0


def test_numba_is_imported_when_a_kernel_is_first_asked_for():
    """`import neuroplast` stays cheap: numba (about 0.5 s) loads with the first kernel call or
    the first question to the compiled backend, not with the package."""
    import subprocess
    import sys

    code = (
        "import sys, neuroplast, neuroplast.attention, neuroplast.models\n"
        "assert 'numba' not in sys.modules, 'numba imported with the package'\n"
        "from neuroplast.compiled import backend\n"
        "backend()\n"
        "assert 'numba' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
