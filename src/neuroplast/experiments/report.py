"""Comparison tables (mean ± std over seeds) and learning-curve figures from run folders."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path


@dataclass
class RunResult:
    folder: Path
    method: str
    seed: int
    density: float
    epochs: list[int]
    test_accuracy: list[float]
    r_s: float
    seconds: float


@dataclass
class Row:
    method: str
    density: float
    seeds: int
    final_mean: float
    final_std: float
    best_mean: float
    r_s: float
    seconds_per_epoch: float


def load_run(folder: str | Path) -> RunResult:
    folder = Path(folder)
    summary = json.loads((folder / "summary.json").read_text())
    records = [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines() if l.strip()]
    config = summary["config"]
    return RunResult(
        folder=folder,
        method=config["method"],
        seed=config["seed"],
        density=summary["final_density"],
        epochs=[r["epoch"] for r in records],
        test_accuracy=[r["test_accuracy"] for r in records],
        r_s=summary["final_r_s"],
        seconds=summary["seconds"],
    )


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[RunResult]) -> list[Row]:
    """One row per method (in first-seen order), mean ± sample std over seeds."""
    groups: dict[str, list[RunResult]] = defaultdict(list)
    for run in runs:
        groups[run.method].append(run)
    rows = []
    for method, group in groups.items():
        finals = [r.test_accuracy[-1] for r in group]
        rows.append(
            Row(
                method=method,
                density=statistics.mean(r.density for r in group),
                seeds=len(group),
                final_mean=statistics.mean(finals),
                final_std=_std(finals),
                best_mean=statistics.mean(max(r.test_accuracy) for r in group),
                r_s=statistics.mean(r.r_s for r in group),
                seconds_per_epoch=statistics.mean(r.seconds / len(r.epochs) for r in group),
            )
        )
    return rows


def _accuracy(row: Row) -> str:
    """Mean ± sample std over seeds; one seed has no spread to show."""
    if row.seeds == 1:
        return f"{100 * row.final_mean:.2f}"
    return f"{100 * row.final_mean:.2f} ± {100 * row.final_std:.2f}"


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| method | density | seeds | final test acc (%) | best test acc (%) | R_s | s/epoch |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.method} | {r.density:.3f} | {r.seeds} | {_accuracy(r)} "
            f"| {100 * r.best_mean:.2f} | {r.r_s:.3f} | {r.seconds_per_epoch:.1f} |"
        )
    return "\n".join(lines) + "\n"


def print_table(rows: list[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("method", "density", "seeds", "final test acc (%)", "best (%)", "R_s", "s/epoch"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for r in rows:
        table.add_row(
            r.method,
            f"{r.density:.3f}",
            str(r.seeds),
            _accuracy(r),
            f"{100 * r.best_mean:.2f}",
            f"{r.r_s:.3f}",
            f"{r.seconds_per_epoch:.1f}",
        )
    Console().print(table)


def plot_learning_curves(runs: list[RunResult], path: str | Path, title: str) -> Path:
    """Test accuracy per epoch, one line per method (mean over seeds, band = min..max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[RunResult]] = defaultdict(list)
    for run in runs:
        groups[run.method].append(run)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for method, group in groups.items():
        length = min(len(r.test_accuracy) for r in group)
        curves = [[100 * a for a in r.test_accuracy[:length]] for r in group]
        epochs = group[0].epochs[:length]
        mean = [statistics.mean(c[i] for c in curves) for i in range(length)]
        label = f"{method} (density {group[0].density:.2f})"
        (line,) = ax.plot(epochs, mean, marker="o", markersize=3, label=label)
        if len(group) > 1:
            low = [min(c[i] for c in curves) for i in range(length)]
            high = [max(c[i] for c in curves) for i in range(length)]
            ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
