"""Tables of a finished (or partly finished) round-two study (configs/study_round2*.toml): per
method, the final test accuracy and the area under the learning curve (mean over epochs of the
test accuracy) with mean ± sample std over seeds; the paired difference of a candidate method to
each baseline (same seeds: the same initial topology) with a bootstrap 95% confidence interval
(percentile, over seeds: with 3 seeds it has few distinct values, so the differences per seed are
listed too);
and, on tasks with known informative features, the share of first-layer live connections on them.

    python scripts/study_round2.py runs/study-round2 --baselines dast snfs rigl set wast mest ctre dense

Writes `<study out>/round2.md` and prints it; with --figure PATH, also the study grid's learning
curves (mean test accuracy per epoch, ± sample std over the seeds as a band) to PATH.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from collections import defaultdict
from pathlib import Path

from neuroplast.dst.analysis import informative_share, random_share
from neuroplast.experiments.report import CellResult, input_connectivity, load_cell
from neuroplast.experiments.runner import cached_dataset
from neuroplast.train.checkpoint import find_checkpoint, load_checkpoint

KNOWN_FEATURES = ("synthetic", "fashion-mnist-noise")  # datasets whose informative features are known
# The round's studies of one setting at each epoch budget (configs/study_round2_budget*.toml and the
# tuned 3-epoch study), read by study_round2_budgets.py and study_round2_speed.py.
BUDGET_STUDIES = [
    "runs/study-round2-e1",
    "runs/study-round2-e2",
    "runs/study-round2-tuned",
    "runs/study-round2-e5",
    "runs/study-round2-e10",
    "runs/study-round2-e20",
]


def bootstrap_ci(values: list[float], resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% interval of the mean of `values` resampled with replacement."""
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def auc(cell: CellResult) -> float:
    """Area under the test-accuracy curve, per epoch of the budget (1 = 100% from the first epoch)."""
    return statistics.fmean(cell.test_accuracy)


def cells_of(out: Path) -> dict[str, dict[str, dict[int, CellResult]]]:
    """grid ("study" or "ablation") -> method -> seed -> finished cell."""
    grids: dict[str, dict[str, dict[int, CellResult]]] = defaultdict(lambda: defaultdict(dict))
    for summary in sorted(out.glob("**/seed*/summary.json")):
        folder = summary.parent
        grid = "ablation" if "ablation" in folder.relative_to(out).parts else "study"
        cell = load_cell(folder)
        grids[grid][cell.method][cell.seed] = cell
    return {grid: grids[grid] for grid in ("study", "ablation") if grid in grids}


def study_cells(folders: list[Path]):
    """(method, seed, cell) of every study-grid cell in `folders` (a missing folder is noted and skipped)."""
    for folder in folders:
        if not folder.exists():
            print(f"note: {folder} does not exist; skipped")
            continue
        for method, by_seed in cells_of(folder).get("study", {}).items():
            for seed, cell in by_seed.items():
                yield method, seed, cell


def dataset_of(cell: CellResult) -> str:
    return json.loads((cell.folder / "summary.json").read_text())["config"]["dataset"]


def counts_of(cell: CellResult):
    """First-layer live connections per input feature after training (None if unknown)."""
    data = cached_dataset(dataset_of(cell), True)
    checkpoint = find_checkpoint(cell.folder)
    if checkpoint is None:
        return None
    tensors, _ = load_checkpoint(checkpoint)
    return input_connectivity(tensors, data.num_features, cell.layers or None)


def share_of(cell: CellResult) -> float | None:
    """First-layer live connections on the informative features (None without known features)."""
    if dataset_of(cell) not in KNOWN_FEATURES:
        return None
    counts = counts_of(cell)
    data = cached_dataset(dataset_of(cell), True)
    return None if counts is None else informative_share(counts, data.extras["informative"])


def noise_connectivity_figure(methods: dict[str, dict[int, CellResult]], path: Path, seed: int = 0) -> None:
    """fashion-mnist-noise: live connections per input, the 784 pixels and the 784 appended noise
    columns side by side as 28x28 images, one row per method (seed `seed`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(m, counts_of(cells[seed])) for m, cells in methods.items() if seed in cells]
    rows = [(m, c.float()) for m, c in rows if c is not None and c.numel() == 2 * 784]
    if not rows:
        return
    top = max(float(c.max()) for _, c in rows)
    fig, axes = plt.subplots(len(rows), 2, figsize=(4.6, 2.2 * len(rows)), squeeze=False)
    for (method, counts), (left, right) in zip(rows, axes):
        pixels, noise = counts[:784].reshape(28, 28), counts[784:].reshape(28, 28)
        image = left.imshow(pixels, vmin=0, vmax=top, cmap="viridis")
        right.imshow(noise, vmin=0, vmax=top, cmap="viridis")
        left.set_ylabel(f"{method}\n{float(pixels.sum() / counts.sum()):.3f} on pixels", fontsize=8)
        for ax in (left, right):
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].set_title("784 pixels", fontsize=9)
    axes[0][1].set_title("784 noise columns", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.6, label="live connections per input")
    fig.suptitle(f"first layer after training, seed {seed}", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def mean_std(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    if not values:
        return "—"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.fmean(values):.{digits}f} ± {scale * std:.{digits}f}"


def method_table(methods: dict[str, dict[int, CellResult]], with_share: bool) -> list[str]:
    head = "| method | seeds | final acc (%) | AUC (%) | train s |" + (" informative share |" if with_share else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for method, seeds in methods.items():
        cells = list(seeds.values())
        row = (
            f"| {method} | {len(cells)} | {mean_std([c.test_accuracy[-1] for c in cells])} | "
            f"{mean_std([auc(c) for c in cells])} | {statistics.fmean(sum(c.train_seconds) for c in cells):.0f} |"
        )
        if with_share:
            shares = [s for s in (share_of(c) for c in cells) if s is not None]
            row += f" {mean_std(shares, 1.0, 3)} |" if shares else " — |"
        lines.append(row)
    return lines


def paired_table(methods: dict[str, dict[int, CellResult]], candidate: str, baselines: list[str]) -> list[str]:
    lines = [
        f"| {candidate} − baseline | paired seeds | Δ final acc (points) | 95% CI | per seed | Δ AUC (points) | 95% CI |",
        "|---|---|---|---|---|---|---|",
    ]
    for baseline in baselines:
        if baseline not in methods or candidate not in methods:
            continue
        seeds = sorted(set(methods[candidate]) & set(methods[baseline]))
        if not seeds:
            continue
        cells = []
        for metric in (lambda c: c.test_accuracy[-1], auc):
            diff = [100 * (metric(methods[candidate][s]) - metric(methods[baseline][s])) for s in seeds]
            low, high = bootstrap_ci(diff)
            cells += [f"{statistics.fmean(diff):+.2f}", f"[{low:+.2f}, {high:+.2f}]"]
            if len(cells) == 2:  # the final accuracy's differences, seed by seed
                cells.append(" ".join(f"{d:+.2f}" for d in diff))
        lines.append(f"| {baseline} | {len(seeds)} | " + " | ".join(cells) + " |")
    return lines


def curves_figure(methods: dict[str, dict[int, CellResult]], candidate: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for method, seeds in methods.items():
        curves = [c.test_accuracy for c in seeds.values()]
        length = min(len(c) for c in curves)
        epochs = list(range(1, length + 1))
        mean = [100 * statistics.fmean(c[i] for c in curves) for i in range(length)]
        std = [100 * statistics.stdev(c[i] for c in curves) if len(curves) > 1 else 0.0 for i in range(length)]
        width = 2.2 if method == candidate else 1.2
        (line,) = ax.plot(epochs, mean, marker="o", lw=width, label=f"{method} ({len(curves)})")
        ax.fill_between(
            epochs,
            [m - d for m, d in zip(mean, std)],
            [m + d for m, d in zip(mean, std)],
            color=line.get_color(),
            alpha=0.12,
        )
    ax.set_xticks(range(1, max(len(c.test_accuracy) for s in methods.values() for c in s.values()) + 1))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), title="method (seeds)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the study's out folder")
    parser.add_argument("--candidate", default="dast2", help="the method compared with each baseline")
    parser.add_argument("--baselines", nargs="+", default=["dast", "snfs", "rigl", "set", "wast"])
    parser.add_argument("--figure", type=Path, help="also write the study grid's learning curves here")
    parser.add_argument(
        "--connectivity", type=Path, help="fashion-mnist-noise: also write the input layer's connections per input here"
    )
    args = parser.parse_args()
    grids = cells_of(args.out)
    if not grids:
        raise SystemExit(f"no finished cells under {args.out}")
    first = next(iter(next(iter(next(iter(grids.values())).values())).values()))
    with_share = dataset_of(first) in KNOWN_FEATURES
    lines = [f"# {args.out.name}", ""]
    for grid, methods in grids.items():
        methods = dict(sorted(methods.items(), key=lambda item: (item[0] != args.candidate, item[0])))
        lines += [f"## {grid}", "", *method_table(methods, with_share), ""]
        baselines = args.baselines if grid == "study" else [m for m in methods if m != args.candidate]
        lines += [*paired_table(methods, args.candidate, baselines), ""]
    if with_share:
        data = cached_dataset(dataset_of(first), True)
        lines.append(
            f"Informative share: first-layer live connections on the {data.extras['informative'].numel()} "
            f"informative of {data.num_features} features after training; a random topology has "
            f"{random_share(data.num_features, data.extras['informative']):.3f}."
        )
    text = "\n".join(lines) + "\n"
    (args.out / "round2.md").write_text(text)
    print(text)
    if args.figure is not None and "study" in grids:
        methods = dict(sorted(grids["study"].items(), key=lambda item: (item[0] != args.candidate, item[0])))
        config = json.loads((first.folder / "summary.json").read_text())["config"]
        title = (
            f"{config['dataset']}, {100 * (1 - config['density']):g}% sparsity, "
            f"{config['epochs']}-epoch budget: test accuracy per epoch (mean ± std over seeds)"
        )
        curves_figure(methods, args.candidate, title, args.figure)
        print(f"figure: {args.figure}")
    if args.connectivity is not None and "study" in grids and dataset_of(first) == "fashion-mnist-noise":
        methods = dict(sorted(grids["study"].items(), key=lambda item: (item[0] != args.candidate, item[0])))
        noise_connectivity_figure(methods, args.connectivity)
        print(f"figure: {args.connectivity}")


if __name__ == "__main__":
    main()
