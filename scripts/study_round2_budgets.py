"""Accuracy against the epoch budget in round two (configs/study_round2_budget*.toml and the
tuned 3-epoch study configs/study_round2_tuned.toml): per method and budget E, the final test
accuracy (mean ± sample std over the paired seeds), DAST2 minus each method at the same budget
(paired, with a bootstrap 95% interval over the seeds), and the smallest budget whose mean reaches
the reference (SET after 10 epochs). Each budget is its own run with every schedule laid over its
E epochs, not a point read off a longer run.

    python scripts/study_round2_budgets.py runs/study-round2-e1 runs/study-round2-e2 \\
        runs/study-round2-tuned runs/study-round2-e5 runs/study-round2-e10 runs/study-round2-e20

Writes the table to --out (default docs/results/study_round2_budgets.md) and the figure to
--figure (default docs/figures/round2_budgets.png), the learning curves of every budget to --curves
(default docs/figures/round2_budget_curves.png), and prints the table. With --by density the
same against the sparsity (3-epoch budget, configs/study_round2_d*.toml), no target:

    python scripts/study_round2_budgets.py --by density runs/study-round2-d90 runs/study-round2-tuned \
        runs/study-round2-d98 runs/study-round2-d99 --out docs/results/study_round2_sparsity.md \
        --figure docs/figures/round2_sparsity.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from study_round2 import BUDGET_STUDIES, bootstrap_ci, mean_std, study_cells

from neuroplast.experiments.report import CellResult


def budget_of(cell: CellResult) -> int:
    return int(json.loads((cell.folder / "summary.json").read_text())["config"]["epochs"])


def sparsity_of(cell: CellResult) -> float:
    """The configured sparsity in % (90, 95, ...)."""
    return round(100 * (1 - cell.density), 6)


def collect(folders: list[Path], seeds: set[int], key=budget_of) -> dict[str, dict[float, dict[int, list[float]]]]:
    """method -> key (budget or sparsity) -> seed -> test accuracy after every epoch (each folder's
    study grid, finished runs only)."""
    results: dict[str, dict[int, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(dict))
    for method, seed, cell in study_cells(folders):
        if seed in seeds and len(cell.test_accuracy) == budget_of(cell):
            results[method][key(cell)][seed] = cell.test_accuracy
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("studies", nargs="*", type=Path, default=[Path(p) for p in BUDGET_STUDIES])
    parser.add_argument(
        "--methods", nargs="+", default=["dast2", "dast2-attribution", "snfs", "rigl", "set", "wast", "dense"]
    )
    parser.add_argument("--candidate", default="dast2")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--by", choices=["epochs", "density"], default="epochs", help="the column: budget or sparsity")
    parser.add_argument("--reference", default="set:10", help="method:budget whose mean is the target ('' for none)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/study_round2_budgets.md"))
    parser.add_argument("--figure", type=Path, default=Path("docs/figures/round2_budgets.png"))
    parser.add_argument(
        "--curves",
        type=Path,
        default=Path("docs/figures/round2_budget_curves.png"),
        help="with --by epochs: the learning curves of every budget, one panel each",
    )
    args = parser.parse_args()
    by_epochs = args.by == "epochs"
    curves = collect(args.studies, set(args.seeds), budget_of if by_epochs else sparsity_of)
    results = {
        m: {k: {s: c[-1] for s, c in by_seed.items()} for k, by_seed in by_key.items()} for m, by_key in curves.items()
    }
    methods = [m for m in args.methods if m in results]
    budgets = sorted({e for m in methods for e in results[m]})
    label = (lambda e: f"E = {e:g}") if by_epochs else (lambda e: f"{e:g}%")
    target, ref = None, {}
    if by_epochs and args.reference:
        ref_method, ref_budget = args.reference.split(":")
        ref = results.get(ref_method, {}).get(int(ref_budget), {})
        target = statistics.fmean(ref.values()) if ref else None

    seeds = ", ".join(map(str, args.seeds))
    header = ["| method | " + " | ".join(label(e) for e in budgets) + " |", "|---|" + "---|" * len(budgets)]
    setting = "95% sparsity (ERK)" if by_epochs else "ERK, 3-epoch budget"
    lines = [
        f"# Round two: final test accuracy against the {'epoch budget' if by_epochs else 'sparsity'}",
        "",
        f"Fashion-MNIST, MLP 784-1000-1000-1000-10, {setting}, seeds {seeds}; final test accuracy "
        "in % (mean ± sample std over the seeds, the number of seeds in brackets).",
        "",
        *header,
    ]
    for method in methods:
        row = []
        for e in budgets:
            values = list(results[method].get(e, {}).values())
            row.append(f"{mean_std(values)} ({len(values)})" if values else "—")
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    lines += [
        "",
        f"{args.candidate} − method at the same {'budget' if by_epochs else 'sparsity'} (points of final accuracy, paired seeds; "
        "mean [bootstrap 95% interval]):",
        "",
        *header,
    ]
    for method in methods:
        if method == args.candidate:
            continue
        row = []
        for e in budgets:
            own, other = results[args.candidate].get(e, {}), results[method].get(e, {})
            seeds = sorted(set(own) & set(other))
            if not seeds:
                row.append("—")
                continue
            diff = [100 * (own[s] - other[s]) for s in seeds]
            low, high = bootstrap_ci(diff)
            row.append(f"{statistics.fmean(diff):+.2f} [{low:+.2f}, {high:+.2f}]")
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    if target is not None:
        lines += [
            "",
            f"Target: {ref_method} after {ref_budget} epochs, {100 * target:.2f}% (mean over seeds "
            f"{', '.join(map(str, sorted(ref)))}). Smallest measured budget whose mean reaches it:",
            "",
        ]
        for method in methods:
            reached = [
                e for e in budgets if results[method].get(e) and statistics.fmean(results[method][e].values()) >= target
            ]
            lines.append(f"- {method}: {label(reached[0]) if reached else 'none of the measured budgets'}")
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in methods:
        es = [e for e in budgets if results[method].get(e)]
        means = [100 * statistics.fmean(results[method][e].values()) for e in es]
        stds = [100 * statistics.stdev(results[method][e].values()) if len(results[method][e]) > 1 else 0.0 for e in es]
        ax.errorbar(es, means, yerr=stds, marker="o", capsize=3, label=method, lw=2 if method == args.candidate else 1)
    if target is not None:
        ax.axhline(100 * target, color="grey", ls="--", lw=1, label=f"{ref_method}, {ref_budget} epochs")
    if by_epochs:
        ax.set_xscale("log")
    ax.set_xticks(budgets)
    ax.set_xticklabels([f"{e:g}" for e in budgets])
    ax.set_xlabel("epoch budget E (every schedule laid over E epochs)" if by_epochs else "sparsity (%)")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title(
        "Fashion-MNIST, 95% sparsity: accuracy against the budget"
        if by_epochs
        else "Fashion-MNIST, 3-epoch budget: accuracy against the sparsity"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=120)
    print(f"figure: {args.figure}")
    if by_epochs:
        curves_figure(curves, methods, budgets, args.candidate, args.curves)
        print(f"figure: {args.curves}")


def curves_figure(curves, methods, budgets, candidate, path: Path) -> None:
    """One panel per budget: each method's mean test accuracy over the seeds after every epoch
    (`curves` as `collect` returns them)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(budgets), figsize=(2.6 * len(budgets), 3.2), sharey=True, squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        for method in methods:
            runs = curves.get(method, {}).get(budget)
            if runs:
                mean = [100 * statistics.fmean(epoch) for epoch in zip(*runs.values())]
                ax.plot(range(1, budget + 1), mean, marker=".", lw=2 if method == candidate else 1, label=method)
        ax.set_title(f"E = {budget:g}", fontsize=9)
        ax.set_xticks(range(1, budget + 1, max(1, budget // 5)))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%), mean over seeds")
    axes[0][0].set_ylim(bottom=80)
    handles = {}
    for ax in axes[0]:
        handles.update(zip(ax.get_legend_handles_labels()[1], ax.get_legend_handles_labels()[0]))
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles), fontsize=8)
    fig.suptitle("Fashion-MNIST, 95% sparsity: learning curves per epoch budget", fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
