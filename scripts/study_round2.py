"""Tables of a finished (or partly finished) round-two study (configs/study_round2*.toml): per
method, the final test accuracy and the area under the learning curve (mean over epochs of the
test accuracy) with mean ± sample std over seeds; the paired difference of a candidate method to
each baseline (same seeds: the same initial topology) with a bootstrap 95% confidence interval
(percentile, over seeds: with 3 seeds it has few distinct values, so the differences per seed are
listed too);
and, on tasks with known informative features, the share of first-layer live connections on them.

    python scripts/study_round2.py runs/study-round2 --baselines dast snfs rigl set wast

Writes `<study out>/round2.md` and prints it.
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


def dataset_of(cell: CellResult) -> str:
    return json.loads((cell.folder / "summary.json").read_text())["config"]["dataset"]


def share_of(cell: CellResult) -> float | None:
    """First-layer live connections on the informative features (None without known features)."""
    if dataset_of(cell) not in KNOWN_FEATURES:
        return None
    data = cached_dataset(dataset_of(cell), True)
    checkpoint = find_checkpoint(cell.folder)
    if checkpoint is None:
        return None
    tensors, _ = load_checkpoint(checkpoint)
    counts = input_connectivity(tensors, data.num_features, cell.layers or None)
    return None if counts is None else informative_share(counts, data.extras["informative"])


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the study's out folder")
    parser.add_argument("--candidate", default="dast2", help="the method compared with each baseline")
    parser.add_argument("--baselines", nargs="+", default=["dast", "snfs", "rigl", "set", "wast"])
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


if __name__ == "__main__":
    main()
