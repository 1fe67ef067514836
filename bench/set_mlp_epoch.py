"""End-to-end: seconds per training epoch of SET-MLP 784-1000-1000-1000-10 on Fashion-MNIST at
99% sparsity (ERK): dense vs masked vs csr backends, in one process.

    python bench/set_mlp_epoch.py [--epochs 3] [--density 0.01] [--dataset fashion-mnist]

Each configuration trains `--epochs` epochs (SET rewires after each but the last); the table
reports the median training time of the epochs after the first (the one epoch with `--epochs 1`;
evaluation excluded; the first
epoch also pays warm-up and kernel compilation), the final test accuracy, and the weight memory
of the csr layers next to their dense size. The configurations run one after another.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import Report, machine

from neuroplast.data import load_dataset
from neuroplast.sparse.csr import CSRLayer
from neuroplast.train import RunConfig
from neuroplast.train.trainer import Run, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="also write the tables (markdown) to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset, flatten=True)
    rows = []
    for name, method, backend in (
        ("dense", "dense", "masked"),
        ("masked SET", "set", "masked"),
        ("csr SET", "set", "csr"),
    ):
        config = RunConfig(
            dataset=args.dataset, method=method, backend=backend, density=args.density, epochs=args.epochs
        )
        epoch_seconds = []
        summary = train(
            config,
            None,
            progress=False,
            log=None,
            dataset=data,
            on_epoch_end=lambda record, times=epoch_seconds: times.append(record["train_seconds"]),
        )
        seconds = statistics.median(epoch_seconds[1:] or epoch_seconds)
        rows.append((name, seconds, summary["final_test_accuracy"]))
        print(f"{name}: {seconds:.2f} s/epoch, test accuracy {summary['final_test_accuracy']:.4f}", flush=True)
    dense_seconds = rows[0][1]
    if args.epochs <= 2:
        timing = f"training time of epoch {args.epochs}"
    else:
        timing = f"median training time of epochs 2-{args.epochs}"
    report = Report(args.out)
    report.add(
        "",
        f"{args.dataset}, MLP 784-1000-1000-1000-10, density {args.density} (ERK), batch 128, "
        f"{torch.get_num_threads()} threads, {timing}; {machine()}",
        "",
    )
    report.table(["model", "s/epoch", "speed-up vs dense", "test accuracy"])
    for name, seconds, accuracy in rows:
        report.row(name, f"{seconds:.2f}", f"{dense_seconds / seconds:.2f}x", f"{100 * accuracy:.2f}%")

    run = Run(RunConfig(dataset=args.dataset, method="set", backend="csr", density=args.density, epochs=1), data)
    report.add("")
    report.table(["layer", "nnz", "csr bytes (values + indices + transpose)", "dense bytes", "ratio"])
    for layer in run.topology.layers.values():
        assert isinstance(layer, CSRLayer)
        memory = layer.module.memory_bytes()
        held = memory["values"] + memory["indices"] + memory["transpose"]
        dense = memory["dense_equivalent"]
        report.row(layer.name, layer.nnz, f"{held:,}", f"{dense:,}", f"{held / dense:.3f}")
    report.save()


if __name__ == "__main__":
    main()
