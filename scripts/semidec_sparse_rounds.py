"""Sparse devices against dense ones as training goes on: the late accuracy (mean of the
evaluations in the last quarter of the first R rounds) of every sparse cell and its dense partner
(same regime, graph, K, H, algorithm and seed) at several round counts R, and the gap, paired by
seed. Reads a finished `neuroplast federate-study` folder:

    python scripts/semidec_sparse_rounds.py runs/semidec-sparse-long --rounds 150 300 450 600 \\
        --out docs/results/semidec_sparse_long.md --figure docs/figures/semidec_sparse_long.png

or two `neuroplast federate` run folders, dense first (one seed):

    python scripts/semidec_sparse_rounds.py --pair runs/dense runs/sparse --rounds 600 800 1000
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from neuroplast.experiments.semidec import late_accuracy
from neuroplast.train import load_toml
from neuroplast.train.trainer import read_metrics

METRICS = (("local", "local_test_accuracy"), ("average model", "avg_test_accuracy"))


DENSE = "dense"  # the mask mode of a density-1 run


def mask_mode(config: dict) -> str:
    """ "dense", "shared" or "per-device": how a run's devices hold their weights."""
    if config.get("density", 1.0) >= 1.0:
        return DENSE
    return config.get("masks", "per-device")


def cells(study: Path) -> dict[tuple, dict[int, list[dict]]]:
    """(regime/graph/K-H, algorithm, mask mode) -> seed -> metrics records, finished runs only."""
    found: dict[tuple, dict[int, list[dict]]] = defaultdict(dict)
    for summary in sorted(study.glob("**/seed*/summary.json")):
        folder = summary.parent
        config = load_toml(folder / "config.toml")
        setting = str(folder.parent.parent.parent.relative_to(study))
        key = (setting, config["algorithm"], mask_mode(config))
        found[key][config["seed"]] = read_metrics(folder / "metrics.jsonl")
    return found


def mean_std(values: list[float], signed: bool = False) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:+.2f} ± {std:.2f}" if signed else f"{mean:.2f} ± {std:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path, nargs="?", help="a federate-study folder")
    parser.add_argument("--pair", type=Path, nargs=2, metavar=("DENSE", "SPARSE"), help="or two run folders")
    parser.add_argument("--rounds", nargs="+", type=int, default=[150, 300, 450, 600])
    parser.add_argument("--out", type=Path, default=None, help="markdown table (default: print only)")
    parser.add_argument("--figure", type=Path, default=None, help="gap against the rounds (png)")
    args = parser.parse_args()

    if (args.study is None) == (args.pair is None):
        parser.error("give a study folder or --pair DENSE SPARSE")
    if args.pair:
        dense, sparse = args.pair
        config = load_toml(sparse / "config.toml")
        name, algorithm = f"{dense.name} / {sparse.name}", config["algorithm"]
        found = {
            (name, algorithm, DENSE): {0: read_metrics(dense / "metrics.jsonl")},
            (name, algorithm, mask_mode(config)): {0: read_metrics(sparse / "metrics.jsonl")},
        }
        args.study = sparse.parent
    else:
        found = cells(args.study)
    lines = [
        f"Sparse against dense devices in {args.study.name} at R rounds: late accuracy (mean of the "
        "evaluations in the last quarter of the first R rounds), mean ± std over seeds; gap = sparse − "
        "dense, paired by seed.",
        "",
        "| setting | algorithm | masks | seeds | R | local: dense | local: sparse | local gap (pp) "
        "| average model: dense | average model: sparse | gap (pp) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    curves = {}
    for (setting, algorithm, masks), runs in sorted(found.items()):
        partner = found.get((setting, algorithm, DENSE), {})
        seeds = sorted(set(runs) & set(partner))
        if masks == DENSE or not seeds:
            continue
        label = f"{algorithm.upper()} {masks}"
        for r in args.rounds:
            if any(max(x["round"] for x in runs[s]) < r or max(x["round"] for x in partner[s]) < r for s in seeds):
                continue
            cols = []
            for _, key in METRICS:
                dense = [100 * late_accuracy([x for x in partner[s] if x["round"] <= r], key, r) for s in seeds]
                sparse = [100 * late_accuracy([x for x in runs[s] if x["round"] <= r], key, r) for s in seeds]
                gap = [b - a for a, b in zip(dense, sparse)]
                cols += [mean_std(dense), mean_std(sparse), mean_std(gap, signed=True)]
                curves.setdefault((label, key), []).append((r, statistics.fmean(gap)))
            lines.append(
                f"| {setting} | {algorithm.upper()} | {masks} | {len(seeds)} | {r} | " + " | ".join(cols) + " |"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.figure and curves:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.4), constrained_layout=True)
        labels = sorted({label for label, _ in curves})
        colours = dict(zip(labels, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
        for (label, key), points in sorted(curves.items()):
            style = "-" if key == "local_test_accuracy" else ":"
            name = "local" if key == "local_test_accuracy" else "average model"
            ax.plot(*zip(*points), style, color=colours[label], marker="o", ms=3, label=f"{label}, {name}")
        ax.axhline(-1, color="grey", lw=0.8, ls="--")  # the goal: within 1 point
        ax.set_xlabel("rounds R")
        ax.set_ylabel("sparse − dense, late accuracy (pp)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        fig.savefig(args.figure, dpi=120)
        plt.close(fig)


if __name__ == "__main__":
    main()
