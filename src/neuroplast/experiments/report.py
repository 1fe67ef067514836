"""Study tables (mean ± std over seeds) and figures (learning curves, connectivity) from run folders."""

from __future__ import annotations

import json
import statistics
import textwrap
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path


def read_run_folder(folder: Path) -> tuple[dict, list[dict]]:
    """(summary, per-epoch records) of a finished run folder."""
    summary = json.loads((folder / "summary.json").read_text())
    records = [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return summary, records


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


# -- studies: methods x densities x seeds -------------------------------------------------------


@dataclass
class CellResult:
    """One finished run (a cell of a study), as read from its run folder."""

    folder: Path
    method: str
    density: float  # as configured (the actual density is in summary.json)
    seed: int
    epochs: list[int]
    test_accuracy: list[float]
    train_seconds: list[float]
    survival: list[float]  # every non-null `survival` of every layer of every topology update
    r_s: float  # final R_s from summary.json
    seconds: float
    layers: list[str]  # the sparse layers, in model order (empty for a dense model)


def load_cell(folder: str | Path) -> CellResult:
    """The finished run in `folder` (summary.json and metrics.jsonl): the one loader of run results."""
    folder = Path(folder)
    summary, records = read_run_folder(folder)
    config = summary["config"]
    survival = [
        layer["survival"]
        for record in records
        for update in record.get("updates", [])
        for layer in update.get("layers", [])
        if layer.get("survival") is not None
    ]
    last_layers = records[-1].get("layers", []) if records and config["method"] != "dense" else []
    return CellResult(
        folder=folder,
        method=config["method"],
        density=config["density"],
        seed=config["seed"],
        epochs=[r["epoch"] for r in records],
        test_accuracy=[r["test_accuracy"] for r in records],
        train_seconds=[r["train_seconds"] for r in records if r.get("train_seconds") is not None],
        survival=survival,
        r_s=summary["final_r_s"],
        seconds=summary["seconds"],
        layers=[layer["name"] for layer in last_layers],
    )


@dataclass
class Stat:
    """Mean and sample standard deviation over `n` seeds."""

    mean: float
    std: float
    n: int


def _stat(values: list[float]) -> Stat | None:
    return Stat(statistics.mean(values), _std(values), len(values)) if values else None


def mean_curve(cells: list[CellResult]) -> list[tuple[int, Stat]]:
    """Test accuracy per epoch over the cells' seeds, for the epochs every cell has."""
    if not cells:
        return []
    length = min(len(c.test_accuracy) for c in cells)
    return [
        (cells[0].epochs[i], _stat([c.test_accuracy[i] for c in cells]))  # type: ignore[misc]
        for i in range(length)
    ]


def epochs_to_reach(curve: list[tuple[int, float]], target: float | None) -> int | None:
    """The first epoch at which `curve` ((epoch, accuracy) pairs) reaches `target`; None if never."""
    if target is None:
        return None
    for epoch, accuracy in curve:
        if accuracy >= target - 1e-12:
            return epoch
    return None


@dataclass
class StudyRow:
    density: float
    method: str
    seeds: int
    accuracy: dict[int, Stat | None]  # at each report epoch (None: no seed has that epoch)
    final: Stat
    r_s: float
    survival: float | None  # mean survival of regrown connections; None if never recorded
    seconds_per_epoch: float | None  # mean training seconds per epoch
    epochs_to_baseline: int | None


def study_rows(
    cells: list[CellResult],
    report_epochs: list[int],
    baseline: str | None,
    densities: list[float] | None = None,
    methods: list[str] | None = None,
) -> list[StudyRow]:
    """One row per (density, method) with at least one finished seed, in the order of `densities`
    and `methods` (first seen when not given). `epochs_to_baseline`: the first epoch at which the
    row's mean accuracy curve reaches the `baseline` method's final mean accuracy at that density."""
    groups: dict[tuple[float, str], list[CellResult]] = defaultdict(list)
    for cell in cells:
        groups[(cell.density, cell.method)].append(cell)
    densities = list(densities) if densities is not None else list(dict.fromkeys(c.density for c in cells))
    methods = list(methods) if methods is not None else list(dict.fromkeys(c.method for c in cells))
    rows = []
    for density in densities:
        target = None
        if baseline is not None and groups.get((density, baseline)):
            target = statistics.mean(c.test_accuracy[-1] for c in groups[(density, baseline)])
        for method in methods:
            group = sorted(groups.get((density, method), []), key=lambda c: c.seed)
            if not group:
                continue
            accuracy = {}
            for epoch in report_epochs:
                values = [c.test_accuracy[c.epochs.index(epoch)] for c in group if epoch in c.epochs]
                accuracy[epoch] = _stat(values)
            survival = [s for c in group for s in c.survival]
            train_seconds = [s for c in group for s in c.train_seconds]
            curve = [(epoch, stat.mean) for epoch, stat in mean_curve(group)]
            rows.append(
                StudyRow(
                    density=density,
                    method=method,
                    seeds=len(group),
                    accuracy=accuracy,
                    final=_stat([c.test_accuracy[-1] for c in group]),  # type: ignore[arg-type]
                    r_s=statistics.mean(c.r_s for c in group),
                    survival=statistics.mean(survival) if survival else None,
                    seconds_per_epoch=statistics.mean(train_seconds) if train_seconds else None,
                    epochs_to_baseline=epochs_to_reach(curve, target),
                )
            )
    return rows


def _percent(stat: Stat | None) -> str:
    if stat is None:
        return "—"
    if stat.n == 1:
        return f"{100 * stat.mean:.2f}"
    return f"{100 * stat.mean:.2f} ± {100 * stat.std:.2f}"


def sparsity_label(density: float) -> str:
    """0.05 -> '95%'."""
    return f"{round(100 * (1 - density), 4):g}%"


def _study_columns(report_epochs: list[int], baseline: str | None) -> list[str]:
    columns = ["sparsity", "method", "seeds", *(f"acc@{e} (%)" for e in report_epochs), "final acc (%)"]
    columns += ["R_s", "survival", "s/epoch"]
    if baseline is not None:
        columns.append(f"epochs to {baseline}")
    return columns


def _study_cells(row: StudyRow, report_epochs: list[int], baseline: str | None) -> list[str]:
    cells = [sparsity_label(row.density), row.method, str(row.seeds)]
    cells += [_percent(row.accuracy.get(e)) for e in report_epochs]
    cells += [
        _percent(row.final),
        f"{row.r_s:.3f}",
        "—" if row.survival is None else f"{row.survival:.3f}",
        "—" if row.seconds_per_epoch is None else f"{row.seconds_per_epoch:.2f}",
    ]
    if baseline is not None:
        cells.append("—" if row.epochs_to_baseline is None else str(row.epochs_to_baseline))
    return cells


def study_markdown(rows: list[StudyRow], report_epochs: list[int], baseline: str | None) -> str:
    """The rows as a Markdown table (accuracies as mean ± sample std over seeds, in %)."""
    columns = _study_columns(report_epochs, baseline)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_study_cells(r, report_epochs, baseline)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def print_study_table(rows: list[StudyRow], report_epochs: list[int], baseline: str | None, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in _study_columns(report_epochs, baseline):
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=True)
    for row in rows:
        table.add_row(*_study_cells(row, report_epochs, baseline))
    console = Console()
    if not console.is_terminal:  # a log file: no terminal width to fit
        console = Console(width=max(console.width, 200))
    console.print(table)


def plot_study_curves(
    cells: list[CellResult],
    path: str | Path,
    title: str,
    densities: list[float] | None = None,
    methods: list[str] | None = None,
) -> Path:
    """One panel per density: mean test accuracy per epoch for each method, band = ± sample std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    densities = list(densities) if densities is not None else list(dict.fromkeys(c.density for c in cells))
    methods = list(methods) if methods is not None else list(dict.fromkeys(c.method for c in cells))
    styles = {m: (f"C{i % 10}", ("-", "--", ":", "-.")[(i // 10) % 4]) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(
        1, len(densities), figsize=(3.6 * len(densities) + 0.6, 4.2), dpi=120, sharey=True, layout="constrained"
    )
    axes = [axes] if len(densities) == 1 else list(axes)
    handles: dict[str, object] = {}
    for ax, density in zip(axes, densities):
        for method in methods:
            group = [c for c in cells if c.density == density and c.method == method]
            curve = mean_curve(group)
            if not curve:
                continue
            epochs = [e for e, _ in curve]
            mean = [100 * s.mean for _, s in curve]
            color, linestyle = styles[method]
            (line,) = ax.plot(epochs, mean, color=color, linestyle=linestyle, marker="o", markersize=2.5)
            handles.setdefault(method, line)
            if len(group) > 1:
                std = [100 * s.std for _, s in curve]
                low = [m - s for m, s in zip(mean, std)]
                high = [m + s for m, s in zip(mean, std)]
                ax.fill_between(epochs, low, high, color=color, alpha=0.15, linewidth=0)
        ax.set_title(f"{sparsity_label(density)} sparsity (density {density:g})", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=min(len(handles), 8))
    fig.suptitle(title, fontsize=9)
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def input_connectivity(tensors: dict, in_features: int, layers: list[str] | None = None):
    """Live connections per input feature of the first sparse layer that reads the input, from a
    checkpoint's tensors (model tensors under "model.<state_dict key>"); None if there is none.

    layers: the sparse layer names in model order (a checkpoint's tensors may be stored in another
        order); default: the order of `tensors`.
    """
    from neuroplast.sparse import connections_per_input

    state = {key.removeprefix("model."): value for key, value in tensors.items() if key.startswith("model.")}
    counts = connections_per_input(state, in_features)
    return next((counts[name] for name in (layers if layers is not None else counts) if name in counts), None)


def connectivity_image(counts, image_shape: tuple[int, ...] | None = None):
    """Per-feature counts as an (H, W) image: summed over channels for a (C, H, W) `image_shape`;
    without one, a square of side sqrt(features) when that is whole, else a single row."""
    import math

    n = counts.numel()
    if image_shape is not None and math.prod(image_shape) == n:
        shape = tuple(image_shape)
        return counts.reshape(shape).sum(0) if len(shape) == 3 else counts.reshape(shape)
    side = math.isqrt(n)
    return counts.reshape(side, side) if side * side == n else counts.reshape(1, n)


def plot_connectivity(maps: list[tuple[str, object]], path: str | Path, title: str) -> Path:
    """Heatmaps (title, 2-D counts) side by side on one color scale, with one colorbar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vmax = max(float(image.max()) for _, image in maps)
    fig, axes = plt.subplots(1, len(maps), figsize=(3.2 * len(maps) + 1.0, 3.6), dpi=120, layout="constrained")
    axes = [axes] if len(maps) == 1 else list(axes)
    image = None
    for ax, (name, counts) in zip(axes, maps):
        image = ax.imshow(counts.numpy(), cmap="viridis", vmin=0, vmax=max(vmax, 1.0), interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=axes, shrink=0.85, label="live connections per input pixel")
    fig.suptitle(textwrap.fill(title, width=int(14 * (3.2 * len(maps) + 1.0))), fontsize=9)
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
