"""Tune every round-two method's knobs with the same budget on a validation split (never the test set).

    python scripts/tune_round2.py [--config configs/study_round2.toml] [--workers 2] \\
        [--out runs/tune-round2] [--report docs/results/study_round2_tuning.md]

Each method of the study config's grid (dense has no knobs) trains with the study's own setting
and with each of the 6 settings drop fraction x update interval below (the other knobs at the
method's values in the config), one seed, on the first 50,000 Fashion-MNIST training images, and is
scored on the other 10,000 (`validation = 10000`: the test set is never read). Every method gets the
same 7 runs. The table lists each setting's validation accuracy after the last epoch and marks each
method's best, which configs/study_round2_tuned.toml then uses. Runs are resumable: a finished run
(its summary.json) is never trained again.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

DROP_FRACTIONS = [0.1, 0.3, 0.5]
UPDATE_EVERY = [25, 200]  # optimizer steps between topology updates (an epoch is 391 on 50,000 samples)
VALIDATION = 10_000


def settings() -> list[tuple[str, dict]]:
    """(label, knobs) for every method: the config's own setting, then the grid."""
    grid = [("as configured", {})]
    for fraction, every in itertools.product(DROP_FRACTIONS, UPDATE_EVERY):
        grid.append((f"drop {fraction}, every {every}", {"drop_fraction": fraction, "update_every": every}))
    return grid


def folder_name(label: str) -> str:
    return label.replace(", ", "-").replace(" ", "")


def run_one(job: tuple[dict, str]) -> tuple[str, str, list[float]]:
    import torch

    from neuroplast.train import RunConfig
    from neuroplast.train.trainer import read_metrics, train

    torch.set_num_threads(1)
    values, folder = job
    folder = Path(folder)
    if not (folder / "summary.json").exists():
        config = RunConfig.from_dict(values, f"tuning run {folder}").validate()
        train(config, out=folder, resume=True, progress=False, log=None)
    curve = [r["test_accuracy"] for r in read_metrics(folder / "metrics.jsonl")]
    return values["method"], folder.name, curve


def main() -> None:
    from neuroplast.train.config import load_toml

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/study_round2.toml", help="the study whose methods are tuned")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="runs/tune-round2")
    parser.add_argument("--report", default="docs/results/study_round2_tuning.md")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    study = load_toml(args.config)
    methods = [m for m in study["study"]["methods"] if m != "dense"]
    density = study["study"]["densities"][0]
    jobs, labels = [], {}
    for method in methods:
        own = study.get("method", {}).get(method, {})
        for label, knobs in settings():
            values = {**study["run"], **own, "method": method, "density": density, "seed": args.seed}
            values["validation"] = VALIDATION
            values["dst"] = {**own.get("dst", {}), **knobs}
            folder = Path(args.out) / method / folder_name(label)
            labels[(method, folder.name)] = label
            jobs.append((values, str(folder)))
    print(f"{len(jobs)} runs ({len(methods)} methods x {len(settings())} settings), {args.workers} workers")
    results: dict[str, list[tuple[str, list[float]]]] = {m: [] for m in methods}
    with ProcessPoolExecutor(args.workers) as pool:
        for method, name, curve in pool.map(run_one, jobs):
            results[method].append((labels[(method, name)], curve))
            print(f"{method:8s} {labels[(method, name)]:22s} validation accuracy {100 * curve[-1]:.2f}%", flush=True)

    run = study["run"]
    epochs = run["epochs"]
    lines = [
        "# Round two: every method's knobs tuned on a validation split",
        "",
        f"`python scripts/tune_round2.py --config {args.config}`: {run['dataset']}, the first "
        f"{60_000 - VALIDATION:,} training images for training and the last {VALIDATION:,} for validation (the "
        f"test set is never read), MLP {'-'.join(map(str, [784, *run['hidden'], 10]))}, {100 * (1 - density):g}% "
        f"sparsity, {epochs} epochs, seed {args.seed}. Every method gets the same 7 runs: its setting in "
        f"{args.config} and drop fraction {{{', '.join(map(str, DROP_FRACTIONS))}}} x update interval "
        f"{{{', '.join(map(str, UPDATE_EVERY))}}} steps, the other knobs unchanged. Validation accuracy (%) "
        "after the last epoch; **bold**: each method's best, used by configs/study_round2_tuned.toml.",
        "",
        "| method | " + " | ".join(label for label, _ in settings()) + " |",
        "|---|" + "---|" * len(settings()),
    ]
    best = {}
    for method in methods:
        by_label = {label: curve[-1] for label, curve in results[method]}
        best[method] = max(by_label, key=by_label.get)
        cells = [
            f"**{100 * by_label[label]:.2f}**" if label == best[method] else f"{100 * by_label[label]:.2f}"
            for label, _ in settings()
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Chosen knobs (the [method.NAME.dst] tables of configs/study_round2_tuned.toml):", ""]
    for method in methods:
        knobs = dict(settings())[best[method]]
        lines.append(f"- {method}: {json.dumps(knobs) if knobs else 'as configured'}")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(args.report) or ".", exist_ok=True)
    Path(args.report).write_text(text)


if __name__ == "__main__":
    main()
