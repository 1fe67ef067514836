"""Choose DAST's defaults on a validation split (never the test set).

    python scripts/tune_dast.py [--epochs 10] [--density 0.05] [--workers 2] [--out docs/results/dast_tuning.md]

Trains DAST with each combination of the knobs below (and WAST, SET for reference) on the
first 50,000 Fashion-MNIST training images, scores it on the other 10,000, one seed, csr
backend, and prints the table sorted by validation accuracy after the last epoch.
"""

from __future__ import annotations

import argparse
import itertools
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

import torch

GRID = {
    "tau_start": [0.5, 1.0],
    "random_start": [0.2, 0.5],
    "importance_decay": [0.9, 0.99],
}
_data = None


def validation_split():
    from neuroplast.data import load_dataset

    data = load_dataset("fashion-mnist", flatten=True)
    return replace(
        data,
        x_train=data.x_train[:50_000],
        y_train=data.y_train[:50_000],
        x_test=data.x_train[50_000:],
        y_test=data.y_train[50_000:],
        name=data.name + " (validation split)",
    )


def run_one(job: tuple[str, dict, int, float]) -> tuple[str, dict, list[float]]:
    global _data
    from neuroplast.train import RunConfig
    from neuroplast.train.trainer import train

    torch.set_num_threads(1)
    if _data is None:
        _data = validation_split()
    method, knobs, epochs, density = job
    curve = []
    config = RunConfig(dataset="fashion-mnist", method=method, backend="csr", epochs=epochs, density=density, dst=knobs)
    train(config, progress=False, log=None, dataset=_data, on_epoch_end=lambda r: curve.append(r["test_accuracy"]))
    return method, knobs, curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", help="also write the table (markdown) here")
    args = parser.parse_args()
    jobs = [("set", {}, args.epochs, args.density), ("wast", {"update_every": 100}, args.epochs, args.density)]
    for values in itertools.product(*GRID.values()):
        jobs.append(("dast", dict(zip(GRID, values)), args.epochs, args.density))
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(run_one, jobs))
    results.sort(key=lambda r: r[2][-1], reverse=True)
    lines = [
        f"Fashion-MNIST validation split (train 50k / validate 10k), MLP 784-1000-1000-1000-10, density "
        f"{args.density} (ERK), csr, seed 0, {args.epochs} epochs",
        "",
        "| method | knobs | " + " | ".join(f"val acc epoch {e + 1}" for e in range(args.epochs)) + " |",
        "|---|---|" + "---|" * args.epochs,
    ]
    for method, knobs, curve in results:
        text = ", ".join(f"{k}={v}" for k, v in knobs.items()) or "preset"
        lines.append(f"| {method} | {text} | " + " | ".join(f"{100 * a:.2f}" for a in curve) + " |")
    print("\n".join(lines))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
