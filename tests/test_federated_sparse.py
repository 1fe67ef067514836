"""Sparse devices in semi-decentralized training: exact density after every step of a round,
the mixing rules, dense exchange at density 1, the wire format and its byte counts, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_federated import small as dense_small  # the same small federation

from neuroplast import cli
from neuroplast.data import load_dataset
from neuroplast.federated import FederatedConfig, Federation, federate
from neuroplast.federated.simulator import server_sample
from neuroplast.federated.sparse import SparseFederation, WireFormat, pack_bits, unpack_bits


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def small(**overrides) -> FederatedConfig:
    """test_federated's 8 devices in 2 components on digits, with a small MLP at 30% density."""
    sparse = dict(model="mlp", hidden=[16], density=0.3, dst_every=2)
    return dense_small(**{**sparse, **overrides})


@pytest.mark.parametrize("masks", ["per-device", "shared"])
@pytest.mark.parametrize("algorithm", ["s2s", "s2a"])
def test_density_is_exact_on_every_device_after_every_step(digits, masks, algorithm):
    fed = SparseFederation(small(masks=masks, algorithm=algorithm), digits)
    counts = fed.live_counts().clone()
    assert counts[0].tolist() == list(fed.layer_nnz.values())
    first_mask = fed.mask.clone()

    def check():
        assert torch.equal(fed.live_counts(), counts)
        assert (fed.x[~fed.mask] == 0).all()  # pruned weights exactly zero

    for r in range(12):
        fed.local_step(r, 0)
        check()
        if fed.engine is not None and fed.schedule.is_update_step(r + 1):
            fed.rewire_devices(r)
            check()
        fed.d2d(r)
        check()
        if fed.is_server_round(r):
            fed.d2s(r)
            check()
    # the masks did move (per device: each its own way; shared: the same everywhere)
    assert not torch.equal(fed.mask, first_mask)
    if masks == "shared":
        assert (fed.mask == fed.mask[0]).all()
    else:
        assert (fed.mask != fed.mask[0]).any(1).sum() >= 4


HOOK_PRESETS = ["snfs", "ctre", "ctre-seq", "wast", "dast", "dast2"]  # signals beyond the gradient


@pytest.mark.parametrize("method", HOOK_PRESETS)
def test_every_preset_rewires_per_device_masks_at_exact_layer_counts(digits, method):
    fed = SparseFederation(small(dst_method=method, dst_every=1, local_steps=2, algorithm="s2a"), digits)
    assert fed.engine is not None and fed.engine.signals  # a preset whose signals come from more than the gradient
    counts = fed.live_counts().clone()
    assert counts[0].tolist() == list(fed.layer_nnz.values())
    first_mask = fed.mask.clone()
    for r in range(6):
        for step in range(2):
            fed.local_step(r, step)
        if fed.schedule.is_update_step(r + 1):
            fed.rewire_devices(r)
            assert torch.equal(fed.live_counts(), counts)  # every layer of every device: what sparsify gave it
            assert (fed.x[~fed.mask] == 0).all()
        fed.d2d(r)
        if fed.is_server_round(r):
            fed.d2s(r)
    assert (fed.mask != first_mask).any(1).all()  # every device rewired its own mask
    assert (fed.mask != fed.mask[0]).any(1).sum() >= 4


def test_hook_signals_are_gathered_from_each_devices_last_batch_of_the_round(digits):
    fed = SparseFederation(small(dst_method="ctre", dst_every=1, local_steps=2), digits)
    fed.round(0)  # rewires after round 0: the last device of the process is the last one served
    first = next(iter(fed.topology.layers))
    index = fed.batch_indices(0, 1)[fed.hi - 1]  # its mini-batch of the round's last local step
    assert torch.equal(fed.engine.signals["activations"].inputs[first], fed.x_train[index])
    dast2 = SparseFederation(small(dst_method="dast2", dst_every=1), digits)
    dast2.round(0)
    activity = dast2.engine.signals["activity"]
    for name in dast2.topology.layers:
        assert activity.errors[name].shape[0] == dast2.config.batch_size
        assert (activity.src[name] > 0).any() and (activity.dst[name] > 0).any()


def test_a_hook_signal_preset_rewires_by_its_signal(digits):
    def masks(method: str, skip_pass: bool = False) -> torch.Tensor:
        fed = SparseFederation(small(dst_method=method, dst_every=1), digits)
        if skip_pass:  # no forward and backward through the module: the hooks see nothing
            fed._signal_pass = lambda index: None
        for r in range(3):
            fed.round(r)
        return fed.mask

    wast = masks("wast")
    assert not torch.equal(wast, masks("wast", skip_pass=True))  # importance has its gradient term
    assert not torch.equal(wast, masks("rigl"))
    with pytest.raises(RuntimeError, match="no training batch"):  # dast2's exact gradient needs the batch
        masks("dast2", skip_pass=True)


def test_per_device_mixing_averages_each_weight_over_its_holders(digits):
    fed = SparseFederation(small(topology="complete", dst_every=1), digits)
    for r in range(3):  # let the masks diverge
        fed.local_step(r, 0)
        fed.rewire_devices(r)
    x, m = fed.x.clone(), fed.mask.clone()
    w = torch.as_tensor(fed.mixing.matrix(3), dtype=torch.float64)
    fed.d2d(3)
    for i in range(8):
        holders = w[i] @ m.double()
        expected = torch.where(m[i], (w[i] @ x.double()) / holders, 0.0)
        assert torch.allclose(fed.x[i].double(), expected, rtol=1e-5, atol=1e-7)
    # a weight live on i and on no neighbour keeps i's value (the device itself always counts)
    alone = m[0] & (m[1:4].sum(0) == 0)
    assert alone.any() and torch.allclose(fed.x[0, alone], x[0, alone])


@pytest.mark.parametrize("algorithm", ["s2s", "s2a"])
def test_per_device_server_averages_over_the_sampled_holders(digits, algorithm):
    fed = SparseFederation(small(algorithm=algorithm, dst_every=1), digits)
    for r in range(3):
        fed.local_step(r, 0)
        fed.rewire_devices(r)
    x, m = fed.x.clone(), fed.mask.clone()
    fed.d2s(5)
    sample = server_sample(0, 5, 8, 3)
    held = m[sample].double().sum(0)
    average = x[sample].double().sum(0) / held
    receivers = range(8) if algorithm == "s2a" else sample.tolist()
    for i in range(8):
        if i in receivers:
            expected = torch.where(m[i] & (held > 0), average, x[i].double())
        else:
            expected = x[i].double()
        assert torch.allclose(fed.x[i].double(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("masks", ["per-device", "shared"])
@pytest.mark.parametrize("algorithm", ["s2s", "s2a"])
def test_sparse_exchange_equals_dense_exchange_at_density_one(digits, masks, algorithm):
    config = small(density=1.0, masks=masks, algorithm=algorithm)
    sparse, dense = SparseFederation(config, digits), Federation(config, digits)
    assert torch.equal(sparse.mask, torch.ones_like(sparse.mask))
    for r in range(8):
        sparse.round(r)
        dense.round(r)
    # the same up to float summation order (the server sums decoded uploads, the dense one multiplies)
    assert torch.allclose(sparse.x, dense.x, rtol=1e-5, atol=1e-6)
    if masks == "shared":  # nothing to move, no indices: the dense bytes
        assert sparse.bytes_d2d == dense.bytes_d2d and sparse.bytes_d2s == dense.bytes_d2s
    else:
        # values as dense, plus a bitmap of the positions (a mask is still sent)
        bitmap = math.ceil(sparse.wire.maskable / 8)
        assert sparse.bytes_d2d == dense.bytes_d2d + sparse.mixing.messages(0) * 8 * bitmap


def test_wire_format_picks_the_smaller_index_encoding_and_round_trips(digits):
    assert WireFormat(live=110, maskable=1000, live_maskable=100, shared=False).index_encoding == "bitmap"
    assert WireFormat(live=30, maskable=1000, live_maskable=20, shared=False).index_encoding == "int32"
    assert WireFormat(live=110, maskable=1000, live_maskable=100, shared=True).model_bytes == 440
    bits = torch.rand(1001, generator=torch.Generator().manual_seed(0)) < 0.3
    assert torch.equal(unpack_bits(pack_bits(bits), 1001), bits)
    for density in (0.3, 0.02):  # bitmap, then int32 flat indices
        fed = SparseFederation(small(density=density), digits)
        fed.local_step(0, 0)
        fed.rewire_devices(1)
        payload = fed.encode_model(2)
        assert payload.numel() == fed.wire.model_bytes
        model, mask = fed.decode_model(payload)
        assert torch.equal(mask, fed.mask[2]) and torch.equal(model, fed.x[2])


def test_bytes_are_counted_per_message(digits):
    fed = SparseFederation(small(algorithm="s2a", rounds=2, period=1), digits)
    wire = fed.wire
    assert wire.index_encoding == "bitmap"
    fed.round(0)
    edges = 2 * 2 * 4  # two 2x2 grids
    assert fed.bytes_d2d == edges * (4 * wire.live + math.ceil(wire.maskable / 8))
    # 3 sampled models up, 5 masks of the others up, values at each receiver's mask down to all 8
    assert fed.bytes_d2s == 3 * wire.model_bytes + 5 * wire.index_bytes + 8 * wire.values_bytes
    assert fed.dense_bytes_d2d == edges * 4 * fed.parameters
    assert fed.dense_bytes_d2s == (3 + 8) * 4 * fed.parameters
    shared = SparseFederation(small(algorithm="s2s", masks="shared", period=1), digits)
    shared.round(0)
    moved = sum(shared.server_drop_counts(0).values())
    assert moved > 0
    # values only up and down; growth proposals (score + index) up; the mask's change (indices) to all 8
    assert shared.bytes_d2s == 3 * (shared.wire.values_bytes + 8 * moved) + 8 * 8 * moved + 3 * shared.wire.values_bytes


@pytest.mark.parametrize("masks,method", [("per-device", "rigl"), ("shared", "rigl"), ("per-device", "dast")])
def test_sparse_run_resumes_like_an_uninterrupted_run(digits, tmp_path, masks, method):
    config = small(masks=masks, dst_method=method, rounds=10, eval_every=3, checkpoint_every=4)
    federate(config, tmp_path / "whole", progress=False, log=None, dataset=digits)

    def crash(finished):
        if finished == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        federate(config, tmp_path / "cut", progress=False, log=None, dataset=digits, on_round=crash)
    federate(config, tmp_path / "cut", resume=True, progress=False, log=None, dataset=digits)
    records = [
        [
            {k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        ]
        for name in ("whole", "cut")
    ]
    assert records[0] == records[1]
    final = records[0][-1]
    assert final["bytes_d2d"] < 0.6 * final["dense_bytes_d2d"]
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["sparse"]["masks"] == masks
    resumed = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert 0 < resumed["seconds"] < 10 * summary["seconds"] + 60  # the clock resumes, not a byte counter


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--density", "0"], "density 0.0 must be in (0, 1]"),
        (["--masks", "mixed"], "unknown masks 'mixed'; choose from: per-device, shared"),
        (["--dst-method", "dense"], "unknown dst_method 'dense'; choose from: static, set, rigl, snfs, mest, ctre,"),
        (["--model", "cnn", "--density", "0.3", "--dst-method", "ctre"], "dst_method 'ctre' gathers activations"),
        (["--dst-every", "0"], "dst_every 0 must be a positive integer"),
    ],
)
def test_bad_sparse_settings_exit_2_with_one_line(capsys, tmp_path, argv, expected):
    try:
        code = cli.main(["federate", "--out", str(tmp_path / "r"), "--quiet", *argv])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1


def test_a_study_with_densities_compares_sparse_with_dense_devices(tmp_path):
    from neuroplast.experiments.semidec import (
        parse_semidec_study,
        run_semidec_study,
        sparse_table,
        write_semidec_report,
    )

    run = {k: v for k, v in vars(small(rounds=8, eval_every=3)).items() if k not in ("algorithm", "topology", "seed")}
    run.update(sampled=None, period=None, density=None)
    run = {k: v for k, v in run.items() if v is not None}
    values = {
        "study": {
            "algorithms": ["s2s"],
            "topologies": ["grid"],
            "sampled": [3],
            "periods": [2],
            "seeds": [0],
            "densities": [1.0, 0.3],
            "workers": 1,
        },
        "regimes": {"R1": {}},
        "run": run,
    }
    study = parse_semidec_study(values, out=tmp_path)
    assert [cell.name for cell in study.cells] == [
        "R1/grid/K3-H2/s2s/density1/seed0",
        "R1/grid/K3-H2/s2s/density0.3/seed0",
    ]
    run_semidec_study(study, progress=False, log=None)
    (row,) = sparse_table(study)
    assert row["density"] == 0.3 and 0.2 < row["bytes"][0] < 0.6
    write_semidec_report(study, log=None)
    assert "## Sparse devices against dense ones" in (tmp_path / "semidec.md").read_text()
