"""The torchrun engine: the simulator's results with 2 and 4 processes, and a worker killed for real."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from neuroplast.data import load_dataset
from neuroplast.federated import FederatedConfig, federate
from neuroplast.train.checkpoint import find_checkpoint, load_checkpoint

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads worker processes from /proc")

ARGS = {
    "dataset": "digits",
    "devices": 8,
    "components": 2,
    "sampled": 3,
    "period": 3,
    "batch_size": 16,
    "lr": 0.05,
    "min_size": 5,
    "rounds": 20,
    "eval_every": 5,
    "checkpoint_every": 10,
}


def flags(values: dict) -> list[str]:
    def text(value) -> str:
        return ",".join(map(str, value)) if isinstance(value, list) else str(value)

    return [part for key, value in values.items() for part in (f"--{key.replace('_', '-')}", text(value))]


def torchrun(processes: int, out: Path, values: dict, *extra: str, max_restarts: int = 0) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        f"--max-restarts={max_restarts}",
        "--monitor-interval=0.2",
        "-m",
        "neuroplast.federated",
        "--out",
        str(out),
        "--engine",
        "distributed",
        "--quiet",
        "--timeout",
        "30",
        *flags(values),
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, limit: float = 180) -> str:
    out, _ = process.communicate(timeout=limit)
    assert process.returncode == 0, out[-3000:]
    return out


def simulate(values: dict, out: Path) -> torch.Tensor:
    federate(FederatedConfig(**values), out, progress=False, log=None, dataset=load_dataset("digits"))
    return load_checkpoint(out / "checkpoint")[0]["x"]


@pytest.mark.parametrize(
    "processes,values,extra",
    [
        (2, {"topology": "ring", "algorithm": "s2s"}, ()),
        (4, {"topology": "dynamic", "degree": 2, "algorithm": "s2a"}, ("--exchange", "all_gather")),
        (4, {"topology": "grid", "algorithm": "s2s"}, ("--exchange", "p2p")),
    ],
)
def test_engine_gives_the_simulators_parameters(tmp_path, processes, values, extra):
    values = {**ARGS, **values}
    expected = simulate(values, tmp_path / "sim")
    finish(torchrun(processes, tmp_path / "engine", values, *extra))
    got = load_checkpoint(tmp_path / "engine" / "checkpoint")[0]["x"]
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)
    sim = [json.loads(line) for line in (tmp_path / "sim" / "metrics.jsonl").read_text().splitlines()]
    eng = [json.loads(line) for line in (tmp_path / "engine" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in eng] == [r["round"] for r in sim]
    for a, b in zip(sim, eng):
        assert a["bytes_d2d"] == b["bytes_d2d"] and a["bytes_d2s"] == b["bytes_d2s"]
        assert b["consensus_intra"] == pytest.approx(a["consensus_intra"], rel=1e-3, abs=1e-9)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)


SPARSE = {"model": "mlp", "hidden": [16], "density": 0.3, "dst_every": 2}


@pytest.mark.parametrize(
    "processes,values",
    [
        pytest.param(2, {"topology": "ring", "algorithm": "s2a", "masks": "per-device"}, marks=pytest.mark.slow),
        (4, {"topology": "grid", "algorithm": "s2s", "masks": "per-device"}),
        (4, {"topology": "dynamic", "degree": 2, "algorithm": "s2a", "masks": "shared"}),
        # a preset whose signals (activations, errors) hooks gather from each device's batch
        (2, {"topology": "ring", "algorithm": "s2s", "masks": "per-device", "dst_method": "dast2"}),
    ],
)
def test_engine_gives_the_simulators_sparse_run_and_sends_the_bytes_it_counts(tmp_path, processes, values):
    values = {**ARGS, **SPARSE, **values}
    federate(FederatedConfig(**values), tmp_path / "sim", progress=False, log=None, dataset=load_dataset("digits"))
    finish(torchrun(processes, tmp_path / "engine", values))
    expected, got = (load_checkpoint(tmp_path / name / "checkpoint")[0] for name in ("sim", "engine"))
    assert torch.equal(got["mask"], expected["mask"])
    assert torch.allclose(got["x"], expected["x"], rtol=1e-5, atol=1e-7)
    sim, eng = (
        [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("sim", "engine")
    )
    for a, b in zip(sim, eng, strict=True):
        assert {k: v for k, v in a.items() if "bytes" in k} == {k: v for k, v in b.items() if "bytes" in k}
    # every message went through the engine as a payload of exactly the counted size: sent to another
    # process (measured at dist.send) or, when both ends share a process, handed over in memory
    handed = json.loads((tmp_path / "engine" / "summary.json").read_text())["message_bytes_per_process"]
    between_d2d, between_d2s = sum(r[0] for r in handed), sum(r[1] for r in handed)
    within_d2d, within_d2s = sum(r[2] for r in handed), sum(r[3] for r in handed)
    assert between_d2d + within_d2d == eng[-1]["bytes_d2d"]
    assert between_d2s + within_d2s == eng[-1]["bytes_d2s"]
    assert between_d2s > 0 and (between_d2d > 0) == (processes == 4)  # P = 2: a component per process


def _workers(parent: int) -> dict[int, int]:
    """{rank: pid} of the worker processes torchrun started."""
    workers = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            env = dict(
                item.split("=", 1) for item in (entry / "environ").read_bytes().decode().split("\0") if "=" in item
            )
        except (OSError, ValueError):
            continue
        if "RANK" in env:
            workers[int(env["RANK"])] = int(entry.name)
    return workers


def _kill_a_worker_after_a_checkpoint(process: subprocess.Popen, out: Path, after_round: int) -> int:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = find_checkpoint(out)
        if found is not None:
            try:
                done = json.loads((found / "state.json").read_text())["round"]
            except (OSError, ValueError):
                done = 0
            if done >= after_round:
                workers = _workers(process.pid)
                if 1 in workers:
                    os.kill(workers[1], signal.SIGKILL)
                    return done
        assert process.poll() is None, "the run ended before a worker could be killed"
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


LONG = {**ARGS, "rounds": 1500, "eval_every": 100, "checkpoint_every": 25, "batch_size": 8}


def test_a_killed_worker_stops_the_job_and_leaves_the_checkpoint(tmp_path):
    process = torchrun(2, tmp_path / "run", LONG)
    killed_after = _kill_a_worker_after_a_checkpoint(process, tmp_path / "run", 50)
    start = time.monotonic()
    process.communicate(timeout=90)
    assert process.returncode != 0
    assert time.monotonic() - start < 60  # no hang: the job ends well within the collective timeout
    tensors, state = load_checkpoint(find_checkpoint(tmp_path / "run"))
    assert state["round"] >= killed_after and state["round"] % 25 == 0
    assert tensors["x"].shape == (8, 650) and torch.isfinite(tensors["x"]).all()


def test_max_restarts_resumes_and_ends_like_an_uninterrupted_run(tmp_path):
    whole = torchrun(2, tmp_path / "whole", LONG)
    finish(whole)
    process = torchrun(2, tmp_path / "restarted", LONG, max_restarts=1)
    _kill_a_worker_after_a_checkpoint(process, tmp_path / "restarted", 50)
    log = finish(process)
    assert "resuming" in log
    records = [
        [
            {k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        ]
        for name in ("whole", "restarted")
    ]
    assert [r["round"] for r in records[1]] == list(range(100, 1501, 100))
    assert records[0] == records[1]
    a = load_checkpoint(tmp_path / "whole" / "checkpoint")[0]["x"]
    b = load_checkpoint(tmp_path / "restarted" / "checkpoint")[0]["x"]
    assert torch.equal(a, b)
