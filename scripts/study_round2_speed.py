"""How quickly round two's methods reach a target accuracy: steps, training FLOPs and seconds.

For each method, every budget's study (configs/study_round2_budget*.toml and the 3-epoch study) is
searched for the first epoch's end at which the mean test accuracy over the seeds reaches the
target, and the table gives the budget whose runs reach it in the fewest steps: the epoch, the optimizer steps, the training FLOPs
(`neuroplast.dst.analysis.training_flops`, the RigL paper's accounting, in units of one epoch of
dense training) and the training seconds (two CPU cores shared by two runs: compare within a table,
not across machines).

    python scripts/study_round2_speed.py runs/study-round2-e1 runs/study-round2-e2 runs/study-round2-tuned \\
        runs/study-round2-e5 runs/study-round2-e10 runs/study-round2-e20 --targets 0.87 set:10

A target is an accuracy (0.87) or method:budget, the mean final accuracy of that method's runs
with that budget. Writes --out (default docs/results/study_round2_speed.md) and prints it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from study_round2 import BUDGET_STUDIES, study_cells

from neuroplast.dst.analysis import dense_epoch_flops, training_flops
from neuroplast.train.trainer import read_metrics


def curves(folders: list[Path], seeds: set[int]) -> dict[str, dict[int, dict[int, dict]]]:
    """method -> budget -> seed -> {accuracy, steps, flops, seconds} per epoch (finished runs only)."""
    out: dict[str, dict[int, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for method, seed, cell in study_cells(folders):
        config = json.loads((cell.folder / "summary.json").read_text())["config"]
        records = read_metrics(cell.folder / "metrics.jsonl")
        if seed not in seeds or len(records) != config["epochs"]:
            continue
        samples = 60_000 - config.get("validation", 0)
        steps_per_epoch = math.ceil(samples / config["batch_size"])
        flops = training_flops(records, method, samples, config["batch_size"], config.get("dst"))
        unit = dense_epoch_flops(records, samples)
        out[method][config["epochs"]][seed] = {
            "accuracy": [r["test_accuracy"] for r in records],
            "epoch": [r["epoch"] for r in records],
            "steps": [steps_per_epoch * r["epoch"] for r in records],
            "flops": [f / unit for f in flops],
            "seconds": [sum(r["train_seconds"] for r in records[: i + 1]) for i in range(len(records))],
        }
    return out


def first_reach(run: dict, target: float) -> int | None:
    """Index of the first epoch whose test accuracy reaches `target` (None if none does)."""
    return next((i for i, a in enumerate(run["accuracy"]) if a >= target - 1e-12), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("studies", nargs="*", type=Path, default=[Path(p) for p in BUDGET_STUDIES])
    parser.add_argument("--methods", nargs="+", default=["dast2", "snfs", "rigl", "set", "wast", "dense"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--targets", nargs="+", default=["0.87", "set:10"])
    parser.add_argument("--out", type=Path, default=Path("docs/results/study_round2_speed.md"))
    args = parser.parse_args()
    data = curves(args.studies, set(args.seeds))
    methods = [m for m in args.methods if m in data]
    lines = [
        "# Round two: steps, training FLOPs and seconds to a target accuracy",
        "",
        "Fashion-MNIST, MLP 784-1000-1000-1000-10, 95% sparsity (ERK). For each method, the budget E whose runs "
        "reach the target (their mean test accuracy over the seeds at an epoch's end) in the fewest steps; "
        "the seeds in brackets, steps, FLOPs and seconds are means over them. FLOPs: training FLOPs in units of one epoch of dense training (the RigL paper's "
        "accounting, `neuroplast.dst.analysis.training_flops`). Seconds: training time on two shared CPU cores.",
    ]
    for text in args.targets:
        if ":" in text:
            ref_method, ref_budget = text.split(":")
            finals = [r["accuracy"][-1] for r in data.get(ref_method, {}).get(int(ref_budget), {}).values()]
            if not finals:
                print(f"note: no finished {ref_method} runs with budget {ref_budget}; target skipped")
                continue
            target, name = statistics.fmean(finals), f"{ref_method}'s final accuracy with E = {ref_budget}"
        else:
            target, name = float(text), "a fixed level"
        lines += [
            "",
            f"## Target {100 * target:.2f}% ({name})",
            "",
            "| method | budget E | epoch | steps | FLOPs (dense epochs) | seconds |",
            "|---|---|---|---|---|---|",
        ]
        for method in methods:
            best = None
            for budget, runs in sorted(data[method].items()):
                mean_curve = [statistics.fmean(r["accuracy"][i] for r in runs.values()) for i in range(budget)]
                i = first_reach({"accuracy": mean_curve}, target)
                if i is None:
                    continue
                row = tuple(statistics.fmean(r[key][i] for r in runs.values()) for key in ("steps", "flops", "seconds"))
                if best is None or row[0] < best[0]:
                    best = (row[0], budget, len(runs), i + 1, row[1], row[2])
            if best is None:
                lines.append(f"| {method} | not reached at any measured budget | | | | |")
                continue
            steps, budget, n, epoch, flops, seconds = best
            lines.append(f"| {method} | {budget} ({n}) | {epoch:.1f} | {steps:,.0f} | {flops:.2f} | {seconds:.0f} |")
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
