"""Semi-decentralized learning: mixing weights, the split, the S2S/S2A operators, the simulator
against a per-device loop, the torchrun engine against the simulator, resume and bad input."""

from __future__ import annotations

import json
import math

import networkx as nx
import numpy as np
import pytest
import torch

from neuroplast import cli
from neuroplast.data import load_dataset
from neuroplast.federated import FederatedConfig, Federation, federate, two_level_dirichlet
from neuroplast.federated.distributed import check_layout
from neuroplast.federated.loop import PerDeviceLoop
from neuroplast.federated.partition import PartitionError, split_counts
from neuroplast.federated.topology import (
    TOPOLOGIES,
    Mixing,
    component_graph,
    component_weights,
    grid_shape,
    metropolis_hastings,
    second_eigenvalue,
    spectral_gap,
)
from neuroplast.train.checkpoint import load_checkpoint
from neuroplast.train.config import ConfigError


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def small(**overrides) -> FederatedConfig:
    """8 devices in 2 components on digits: seconds per run."""
    values = dict(
        dataset="digits",
        devices=8,
        components=2,
        sampled=3,
        period=2,
        batch_size=8,
        lr=0.05,
        min_size=5,
        rounds=12,
        eval_every=4,
        checkpoint_every=4,
        topology="grid",
    )
    return FederatedConfig(**{**values, **overrides}).validate()


# -- topologies and weights ----------------------------------------------------------------------


@pytest.mark.parametrize("topology", [t for t in TOPOLOGIES if t != "none"])
def test_metropolis_hastings_is_symmetric_doubly_stochastic(topology):
    graph = component_graph(topology, 50, seed=3, edge_probability=0.1, degree=4)
    w = metropolis_hastings(graph)
    assert np.allclose(w, w.T)
    assert np.allclose(w.sum(0), 1) and np.allclose(w.sum(1), 1)
    assert (w >= 0).all()
    # W_ij = 1 / (1 + max(deg_i, deg_j)) on every edge, 0 off the graph
    for i, j in graph.edges():
        assert w[i, j] == pytest.approx(1 / (1 + max(graph.degree(i), graph.degree(j))))
    off_graph = ~(nx.to_numpy_array(graph).astype(bool) | np.eye(50, dtype=bool))
    assert (w[off_graph] == 0).all()


def test_second_eigenvalue_matches_the_spec():
    assert grid_shape(50) == (5, 10)
    assert second_eigenvalue(component_weights("ring", 50, 0, 0)) == pytest.approx(0.99474, abs=1e-5)
    assert second_eigenvalue(component_weights("grid", 50, 0, 0)) == pytest.approx(0.97848, abs=1e-5)
    assert spectral_gap(component_weights("ring", 50, 0, 0)) == pytest.approx(0.0105, abs=1e-4)
    assert spectral_gap(component_weights("grid", 50, 0, 0)) == pytest.approx(0.0426, abs=1e-4)
    assert spectral_gap(component_weights("complete", 50, 0, 0)) == pytest.approx(1.0)
    # the ring's weights: 1/3 to each neighbour and to itself
    ring = component_weights("ring", 50, 0, 0)
    assert ring[0, 1] == pytest.approx(1 / 3) and ring[0, 49] == pytest.approx(1 / 3)
    assert ring[0, 0] == pytest.approx(1 / 3)


def test_random_graphs_are_connected_and_dynamic_changes_every_round():
    for seed in range(5):
        assert nx.is_connected(component_graph("erdos-renyi", 30, seed=seed, edge_probability=0.08))
    mixing = Mixing("dynamic", 20, 2, seed=1, degree=3 + 1)
    assert not np.allclose(mixing.matrix(0), mixing.matrix(1))
    assert np.array_equal(mixing.matrix(5), Mixing("dynamic", 20, 2, seed=1, degree=4).matrix(5))
    # block-diagonal: nothing crosses components
    assert (mixing.matrix(3)[:10, 10:] == 0).all()
    # sparse and dense products agree
    x = torch.randn(20, 7, dtype=torch.float64)
    assert torch.allclose(Mixing("ring", 20, 2, 0).apply(0, x), torch.as_tensor(Mixing("ring", 20, 2, 0).matrix(0)) @ x)


# -- the split -------------------------------------------------------------------------------------


def test_split_counts_hand_out_every_sample():
    counts = split_counts(10, np.array([0.33, 0.33, 0.34]))
    assert counts.sum() == 10 and list(counts) == [3, 3, 4]


def test_two_level_dirichlet_is_deterministic_complete_and_meets_min_size():
    labels = np.repeat(np.arange(10), 300)
    a = two_level_dirichlet(labels, 20, 2, 0.1, 0.5, min_size=30, seed=4)
    b = two_level_dirichlet(labels, 20, 2, 0.1, 0.5, min_size=30, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a.train + a.local_test, b.train + b.local_test))
    every = np.concatenate(a.train + a.local_test)
    assert np.array_equal(np.sort(every), np.arange(len(labels)))  # each sample exactly once
    assert min(len(t) + len(s) for t, s in zip(a.train, a.local_test)) >= 30
    # small alpha_inter: the two components hold different label mixes; large: about the same
    skewed = a.component_histograms(labels, 10)
    even = two_level_dirichlet(labels, 20, 2, 100.0, 100.0, seed=4).component_histograms(labels, 10)
    share = lambda h: h[0] / h.sum(0)  # noqa: E731
    assert np.abs(share(skewed) - 0.5).max() > 0.3
    assert np.abs(share(even) - 0.5).max() < 0.1
    # the local test part has the device's label skew: same labels as its training part
    for train, test in zip(a.train, a.local_test):
        assert set(labels[test]) <= set(labels[train]) | set(labels[test])
        assert abs(len(test) - 0.2 * (len(train) + len(test))) <= 1


def test_split_that_cannot_meet_min_size_says_so():
    with pytest.raises(PartitionError, match="min_size 100 x 20 devices needs 2000 samples"):
        two_level_dirichlet(np.zeros(1000, dtype=int), 20, 2, 1.0, 1.0, min_size=100)


# -- the server operators ------------------------------------------------------------------------


def _with_random_rows(fed: Federation, seed: int = 0) -> torch.Tensor:
    fed.x = torch.randn(fed.x.shape, generator=torch.Generator().manual_seed(seed))
    return fed.x.clone()


def test_s2s_keeps_the_mean_and_s2a_sends_x_s_to_all(digits):
    from neuroplast.federated.simulator import server_sample

    for algorithm in ("s2s", "s2a"):
        fed = Federation(small(algorithm=algorithm), digits)
        before = _with_random_rows(fed)
        fed.d2s(round_=1)
        sample = server_sample(0, 1, 8, 3)
        x_s = before[sample].mean(0)
        others = torch.ones(8, dtype=torch.bool)
        others[sample] = False
        if algorithm == "s2s":
            assert torch.allclose(fed.x.mean(0), before.mean(0), atol=1e-6)
            assert torch.allclose(fed.x[sample], x_s.expand(3, -1))
            assert torch.equal(fed.x[others], before[others])
        else:
            assert torch.allclose(fed.x, x_s.expand(8, -1))


def test_sampling_factors_match_the_spec(digits):
    """Over many draws: E||x_S - x̄||² = (n-K)/(K(n-1)) σ² (S2A's bias) and S2S leaves a mean
    disagreement of (n-K)/(n-1) σ²."""
    n, k, draws = 8, 3, 4000
    fed = Federation(small(algorithm="s2s", sampled=k), digits)
    x0 = _with_random_rows(fed, seed=1).double()
    mean = x0.mean(0)
    sigma2 = ((x0 - mean) ** 2).sum(1).mean().item()
    bias, disagreement = 0.0, 0.0
    for r in range(draws):
        fed.x = x0.float().clone()
        fed.d2s(r)
        after = fed.x.double()
        disagreement += ((after - after.mean(0)) ** 2).sum(1).mean().item()
        from neuroplast.federated.simulator import server_sample

        bias += ((x0[server_sample(0, r, n, k)].mean(0) - mean) ** 2).sum().item()
    assert bias / draws == pytest.approx((n - k) / (k * (n - 1)) * sigma2, rel=0.05)
    assert disagreement / draws == pytest.approx((n - k) / (n - 1) * sigma2, rel=0.05)


def test_k_equal_n_makes_s2s_and_s2a_the_same(digits):
    runs = [Federation(small(algorithm=a, sampled=8, rounds=6), digits) for a in ("s2s", "s2a")]
    for fed in runs:
        for r in range(6):
            fed.round(r)
    assert torch.equal(runs[0].x, runs[1].x)


# -- simulator against the per-device loop -------------------------------------------------------


@pytest.mark.parametrize("model", ["linear", "mlp", "cnn"])
@pytest.mark.parametrize("algorithm", ["s2s", "s2a", "fedavg", "dsgd"])
def test_simulator_equals_a_per_device_loop(digits, model, algorithm):
    config = small(model=model, hidden=[16], cnn_hidden=16, algorithm=algorithm, topology="dynamic", degree=2)
    fed, loop = Federation(config, digits), PerDeviceLoop(config, digits)
    for r in range(5):
        fed.round(r)
        loop.round(r)
    assert torch.allclose(fed.x, loop.stacked(), rtol=1e-5, atol=1e-6)


def test_consensus_parts_add_up_and_heterogeneity_follows_the_split(digits):
    fed = Federation(small(), digits)
    x = _with_random_rows(fed)
    intra, inter = fed.two_level_spread(x)
    total = ((x.double() - x.double().mean(0)) ** 2).sum(1).mean().item()
    assert intra + inter == pytest.approx(total, rel=1e-9)
    skewed = Federation(small(alpha_inter=0.05, min_size=3), digits).heterogeneity()
    even = Federation(small(alpha_inter=1000.0, alpha_intra=1000.0), digits).heterogeneity()
    assert skewed["zeta2_inter"] > 10 * even["zeta2_inter"]


# -- runs: metrics, resume -----------------------------------------------------------------------


def _records(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_metrics_and_resume_ends_like_an_uninterrupted_run(digits, tmp_path):
    config = small(rounds=14, eval_every=3, checkpoint_every=5)
    federate(config, tmp_path / "whole", progress=False, log=None, dataset=digits)

    def crash(finished):
        if finished == 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        federate(config, tmp_path / "cut", progress=False, log=None, dataset=digits, on_round=crash)
    assert load_checkpoint(tmp_path / "cut" / "checkpoint")[1]["round"] == 10
    with pytest.raises(ConfigError, match="pass --resume"):
        federate(config, tmp_path / "cut", progress=False, log=None, dataset=digits)
    federate(config, tmp_path / "cut", resume=True, progress=False, log=None, dataset=digits)
    whole, cut = _records(tmp_path / "whole"), _records(tmp_path / "cut")
    assert [r["round"] for r in whole] == [3, 6, 9, 12, 14]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(whole) == strip(cut)
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["final"]["round"] == 14
    partition = json.loads((tmp_path / "whole" / "partition.json").read_text())
    assert len(partition["component_label_histograms"]) == 2 and partition["zeta2_inter"] >= 0
    # bytes: D2D each round = directed edges x d x 4; D2S per server round = (K up + K or n down) x d x 4
    d = 64 * 10 + 10
    edges = 2 * 2 * 4  # two 2x2 grids (4-cycles): 4 edges each, both directions
    assert whole[-1]["bytes_d2d"] == 14 * edges * d * 4
    assert whole[-1]["bytes_d2s"] == 7 * (3 + 3) * d * 4


def test_a_different_config_in_the_same_folder_is_refused(digits, tmp_path):
    federate(small(rounds=4), tmp_path, progress=False, log=None, dataset=digits)
    with pytest.raises(ConfigError, match=r"changed: lr"):
        federate(small(rounds=4, lr=0.5), tmp_path, resume=True, progress=False, log=None, dataset=digits)


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--sampled", "200"], "sampled (K) 200 must be in [1, devices = 100]"),
        (["--sampled", "1"], "sampled (K) 1 must be in [2, 100] with s2s"),
        (["--period", "0"], "period (H) 0 must be >= 1 round"),
        (["--components", "3"], "devices 100 are not divisible into components 3; choose components from: 1, 2, 4"),
        (["--topology", "star"], "unknown topology 'star'; choose from: ring, grid, complete, erdos-renyi, dynamic"),
        (["--alpha-inter", "0"], "alpha_inter 0.0 must be > 0"),
        (["--alpha-intra", "-1"], "alpha_intra -1.0 must be > 0"),
        (["--algorithm", "gossip"], "unknown algorithm 'gossip'; choose from: s2s, s2a, fedavg, dsgd"),
        (
            ["--topology", "dynamic", "--degree", "3", "--devices", "10", "--sampled", "5"],
            "degree 3 gives no regular graph on 5 devices",
        ),
        (["--dataset", "digits", "--min-size", "50"], "min_size 50 x 100 devices needs 5000 samples"),
        (["--engine", "distributed", "--dataset", "digits"], "--engine distributed runs under torchrun"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, argv, expected):
    try:
        code = cli.main(["federate", "--out", str(tmp_path / "r"), "--quiet", *argv])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err
    assert len(err.strip().splitlines()) == 1


def test_process_counts_that_do_not_fit_are_refused():
    assert check_layout(100, 2, 4) == 25
    assert check_layout(100, 2, 1) == 100
    with pytest.raises(
        ConfigError, match="3 processes do not divide 100 devices; choose a number of processes from: 1, 2, 4"
    ):
        check_layout(100, 2, 3)
    with pytest.raises(ConfigError, match="5 processes would split a component"):
        check_layout(100, 2, 5)


def test_fedavg_and_dsgd_are_the_special_cases(digits):
    fedavg = small(algorithm="fedavg")
    assert not fedavg.uses_d2d and fedavg.uses_server and fedavg.server_sends_to_all
    dsgd = small(algorithm="dsgd", sampled=1)  # K is unused without a server
    assert dsgd.uses_d2d and not dsgd.uses_server
    fed = Federation(dsgd, digits)
    for r in range(4):
        fed.round(r)
    assert fed.bytes_d2s == 0 and math.isfinite(fed.evaluate().avg_test_accuracy)
