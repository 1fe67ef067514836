"""Semi-decentralized learning: the stacked simulator against a per-device loop, and the torchrun
engine against the simulator, in one run.

    python bench/federated.py [--rounds 20] [--cnn-rounds 3] [--processes 2] [--out docs/results/federated.md]

1. One round (local step + D2D + D2S, with H = 1 so every round has a server step) for 100
   devices in 2 components on a ring, Fashion-MNIST: `Federation` (every device a row of one
   matrix, torch.func) against `PerDeviceLoop` (one module and optimizer per device, parameters
   mixed neighbour by neighbour). Median seconds per round after one warm-up round, same process.
2. The same linear configuration under torchrun with P processes (gloo) against the simulator in
   this process: seconds per round (evaluation once, at the end) and the bytes each process hands
   to collectives.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import Report, machine

from neuroplast.data import load_dataset
from neuroplast.federated import FederatedConfig, Federation, federate
from neuroplast.federated.loop import PerDeviceLoop


def seconds_per_round(system, rounds: int) -> float:
    system.round(0)  # warm-up
    times = []
    for r in range(1, rounds + 1):
        start = time.perf_counter()
        system.round(r)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def engine_run(config: FederatedConfig, processes: int, folder: Path) -> dict:
    keys = ("dataset", "model", "devices", "components", "topology", "algorithm", "sampled", "period", "rounds")
    flags = [part for key in keys for part in (f"--{key.replace('_', '-')}", str(getattr(config, key)))]
    flags += ["--eval-every", str(config.rounds), "--checkpoint-every", str(config.rounds)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    command += ["-m", "neuroplast.federated", "--out", str(folder), "--engine", "distributed", "--quiet", *flags]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // processes))})
    return json.loads((folder / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds, linear model")
    parser.add_argument("--cnn-rounds", type=int, default=3, help="timed rounds, CNN")
    parser.add_argument("--engine-rounds", type=int, default=200)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the tables to this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("fashion-mnist")
    base = dict(dataset="fashion-mnist", devices=100, components=2, topology="ring", algorithm="s2s", sampled=20)
    report = Report(args.out)
    report.add(
        f"100 devices in 2 components (ring), S2S with K = 20 and H = 1, batch 128, {args.threads} threads; "
        f"{machine()}",
        "",
    )
    report.table(["model", "parameters", "per-device loop (s/round)", "simulator (s/round)", "speed-up", "goal"])
    for model, rounds, goal in (("linear", args.rounds, 20), ("cnn", args.cnn_rounds, 3)):
        config = FederatedConfig(**base, model=model, period=1).validate()
        simulator = seconds_per_round(Federation(config, data), rounds)
        loop = seconds_per_round(PerDeviceLoop(config, data), rounds)
        parameters = Federation(config, data).parameters
        met = "met" if loop / simulator >= goal else "not met"
        report.row(
            model, f"{parameters:,}", f"{loop:.3f}", f"{simulator:.3f}", f"{loop / simulator:.1f}x", f"≥ {goal}x: {met}"
        )

    config = FederatedConfig(**base, model="linear", period=5, rounds=args.engine_rounds).validate()
    with tempfile.TemporaryDirectory() as tmp:
        simulated = federate(config, Path(tmp) / "sim", progress=False, log=None, dataset=data)
        engine = engine_run(config, args.processes, Path(tmp) / "engine")
    sim_round = simulated["seconds"] / config.rounds
    engine_round = engine["seconds"] / config.rounds
    sent = engine["bytes_sent_per_process"]
    report.add(
        "",
        f"Linear model, S2S with K = 20 and H = 5, {config.rounds} rounds (one evaluation, at the end): the "
        f"simulator with {args.threads} threads against torchrun with {args.processes} gloo processes "
        f"({max(1, 2 // args.processes)} thread each).",
        "",
        "| engine | s/round | vs simulator | bytes sent per process per round |",
        "|---|---|---|---|",
        f"| simulator (1 process) | {sim_round * 1000:.1f} ms | 1.00x | 0 |",
        f"| torchrun, P = {args.processes} | {engine_round * 1000:.1f} ms | {sim_round / engine_round:.2f}x | "
        + ", ".join(f"rank {r}: {b / config.rounds / 1e3:.1f} kB" for r, b in enumerate(sent))
        + " |",
        "",
        f"Logical traffic of the algorithm per round (either engine): D2D {simulated['final']['bytes_d2d'] / config.rounds / 1e6:.2f} MB, "
        f"D2S {simulated['final']['bytes_d2s'] / config.rounds / 1e6:.3f} MB.",
    )
    report.save()


if __name__ == "__main__":
    main()
