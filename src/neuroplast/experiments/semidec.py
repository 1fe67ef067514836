"""Semi-decentralized studies: regimes x topologies x K x H x algorithms x seeds from one TOML file.

Every cell is one `neuroplast federate` run in its own folder,
`<out>/<regime>/<topology>/K<k>-H<h>/<algorithm>/seed<seed>`, trained through the same grid
runner as the DST study: finished cells are never re-run, interrupted ones resume from their
last checkpoint, several run at a time.

Config format:

    [study]
    algorithms = ["s2s", "s2a"]
    topologies = ["ring", "grid", "complete", "dynamic"]
    sampled = [10, 20, 50, 100]        # K
    periods = [1, 5, 20]               # H
    seeds = [0, 1, 2]
    workers = 2                        # default: 2 on CPU
    out = "runs/semidec"

    [regimes.R1]                       # any FederatedConfig keys, usually the two alphas
    alpha_inter = 100.0
    alpha_intra = 100.0

    [run]                              # FederatedConfig keys shared by every cell
    rounds = 200
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path

from neuroplast.experiments.runner import cached_dataset, run_cells, study_table, workers_setting
from neuroplast.experiments.study import list_setting
from neuroplast.federated.config import ALGORITHMS, MASK_MODES, FederatedConfig
from neuroplast.federated.run import federate
from neuroplast.federated.topology import TOPOLOGIES
from neuroplast.train.checkpoint import find_checkpoint
from neuroplast.train.config import ConfigError, load_toml

STUDY_KEYS = ("algorithms", "topologies", "sampled", "periods", "seeds", "densities", "masks", "workers", "out")
CELL_KEYS = ("algorithm", "topology", "sampled", "period", "seed")
DEFAULT_OUT = "runs/semidec"


@dataclass
class Cell:
    regime: str
    config: FederatedConfig
    folder: Path
    name: str  # the folder relative to the study's out


@dataclass
class SemidecStudy:
    out: Path
    workers: int
    regimes: list[str]
    cells: list[Cell]
    source: str = "config"


def _run_values(table, where: str) -> dict:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table of FederatedConfig keys, not {table!r}")
    for key in CELL_KEYS:
        if key in table:
            raise ConfigError(f"{where} sets {key!r}; a study sets it per cell from [study]")
    FederatedConfig.from_dict(table, where)  # unknown keys, with the valid ones listed
    return table


def parse_semidec_study(
    values: dict, source: str = "config", out: str | Path | None = None, workers: int | None = None
) -> SemidecStudy:
    table = study_table(
        values, source, ("study", "regimes.NAME", "run"), STUDY_KEYS, "algorithms, topologies, sampled, periods, seeds"
    )
    algorithms = list_setting(table, "algorithms", "[study]", str, '["s2s", "s2a"]')
    for a in algorithms:
        if a not in ALGORITHMS:
            raise ConfigError(f"unknown algorithm {a!r} in [study] algorithms; choose from: {', '.join(ALGORITHMS)}")
    topologies = list_setting(table, "topologies", "[study]", str, '["ring", "complete"]')
    for t in topologies:
        if t not in TOPOLOGIES:
            raise ConfigError(f"unknown topology {t!r} in [study] topologies; choose from: {', '.join(TOPOLOGIES)}")
    sampled = list_setting(table, "sampled", "[study]", int, "[10, 20, 50, 100]")
    periods = list_setting(table, "periods", "[study]", int, "[1, 5, 20]")
    seeds = list_setting(table, "seeds", "[study]", int, "[0, 1, 2]")
    # sparse devices (optional): each density a cell of its own, compared with density 1 in the report
    densities = list_setting(table, "densities", "[study]", float, "[1.0, 0.1]", required=False) or [None]
    for d in densities:
        if d is not None and not 0 < d <= 1:
            raise ConfigError(f"[study] densities holds {d!r}; each must be in (0, 1], e.g. densities = [1.0, 0.1]")
    mask_modes = list_setting(table, "masks", "[study]", str, '["per-device", "shared"]', required=False) or [None]
    for mode in mask_modes:
        if mode is not None and mode not in MASK_MODES:
            raise ConfigError(f"unknown masks {mode!r} in [study] masks; choose from: {', '.join(MASK_MODES)}")
    regimes = values.get("regimes", {"default": {}})
    if not isinstance(regimes, dict) or not regimes:
        raise ConfigError("[regimes] must hold at least one [regimes.NAME] table")
    run = _run_values(values.get("run", {}), "[run]")
    for name, regime in regimes.items():
        _run_values(regime, f"[regimes.{name}]")
    workers_value = workers_setting(table, workers, max(1, min(2, os.cpu_count() or 1)))
    out_path = Path(out if out is not None else table.get("out", DEFAULT_OUT))
    cells = []
    for seed in seeds:  # seed-major: a study stopped early has every configuration at the first seeds
        for regime, regime_values in regimes.items():
            for topology in topologies:
                for k in sampled:
                    for h in periods:
                        for algorithm, density, mode in itertools.product(algorithms, densities, mask_modes):
                            # dense devices have no masks: one cell, whatever the modes
                            if mode is not None and (density is None or density >= 1.0):
                                if mode != mask_modes[0]:
                                    continue
                                mode = None
                            folder = Path(regime) / topology / f"K{k}-H{h}" / algorithm
                            if density is not None:
                                # the folder names a mask mode other than the default (per-device)
                                shared = mode is not None and mode != FederatedConfig.masks
                                folder = folder / (f"density{density:g}" + (f"-{mode}" if shared else ""))
                            values_ = {
                                **run,
                                **regime_values,
                                "algorithm": algorithm,
                                "topology": topology,
                                "sampled": k,
                                "period": h,
                                "seed": seed,
                                **({"density": float(density)} if density is not None else {}),
                                **({"masks": mode} if mode is not None else {}),
                            }
                            folder = folder / f"seed{seed}"
                            config = FederatedConfig.from_dict(values_, f"cell {folder.as_posix()}").validate()
                            cells.append(Cell(regime, config, out_path / folder, folder.as_posix()))
    return SemidecStudy(out_path, workers_value, list(regimes), cells, source)


def load_semidec_study(path: str | Path, out: str | Path | None = None, workers: int | None = None) -> SemidecStudy:
    return parse_semidec_study(load_toml(path), f"config file {str(path)!r}", out, workers)


def is_finished(folder: Path, config: FederatedConfig) -> bool:
    path = folder / "summary.json"
    if not path.is_file():
        return False
    summary = json.loads(path.read_text())
    saved = summary.get("config")
    return isinstance(saved, dict) and not config.changed_from(saved) and summary.get("final") is not None


def run_federated_cell(config: FederatedConfig, folder: str | Path) -> dict:
    """Run (or resume) one cell quietly; return its summary."""
    return federate(config, folder, resume=True, progress=False, log=None, dataset=cached_dataset(config.dataset))


def run_semidec_study(study: SemidecStudy, progress: bool = True, log=print) -> list[Cell]:
    todo = [cell for cell in study.cells if not is_finished(cell.folder, cell.config)]
    if log and len(todo) < len(study.cells):
        log(
            f"{len(study.cells) - len(todo)} of {len(study.cells)} cells already finished in {study.out}; skipping them"
        )
    if not todo:
        return []
    resumed = {cell.name for cell in todo if find_checkpoint(cell.folder) is not None}
    if log:
        where = "in this process" if study.workers == 1 else f"in {min(study.workers, len(todo))} worker processes"
        log(f"running {len(todo)} cells {where}" + (f" ({len(resumed)} resume)" if resumed else ""))
    width = max(len(cell.name) for cell in todo)

    def done(cell: Cell, summary: dict) -> None:
        if log:
            final = summary["final"]
            note = "  (resumed)" if cell.name in resumed else ""
            log(
                f"{cell.name:<{width}}  average model {100 * final['avg_test_accuracy']:.2f}%  "
                f"local {100 * final['local_test_accuracy']:.2f}%  {summary['seconds']:.1f}s{note}"
            )

    run_cells(todo, run_federated_cell, study.workers, len(study.cells), progress, done)
    return todo


# -- report -----------------------------------------------------------------------------------

METRICS = {
    "local": ("local_test_accuracy", "each device's own model on its own local test set (mean over devices)"),
    "global": ("avg_test_accuracy", "the average model on the global test set"),
}
LATE = 0.75  # "late accuracy": mean of the evaluations after this fraction of the rounds


def late_accuracy(records: list[dict], key: str, rounds: int) -> float:
    """Mean of `key` over the evaluations in the last quarter of the rounds; with evaluation
    rounds coprime with H they fall at every phase of the server period."""
    late = [r[key] for r in records if r["round"] > LATE * rounds]
    return sum(late) / len(late)


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _mean_std(values: list[float]) -> tuple[float, float]:
    import statistics

    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def gap_table(study: SemidecStudy, metric: str) -> list[dict]:
    """One row per (regime, topology, K, H) with both algorithms finished at the same seeds:
    mean ± std over seeds of each algorithm's late accuracy and of the paired S2S - S2A gap (pp)."""
    key = METRICS[metric][0]
    by_config: dict[tuple, dict[str, dict[int, float]]] = {}
    densest = max(cell.config.density for cell in study.cells)
    for cell in study.cells:
        if cell.config.density != densest or not is_finished(cell.folder, cell.config):
            continue
        c = cell.config
        config_key = (cell.regime, c.topology, c.sampled, c.period)
        value = 100 * late_accuracy(_records(cell.folder), key, c.rounds)
        by_config.setdefault(config_key, {}).setdefault(c.algorithm, {})[c.seed] = value
    rows = []
    for (regime, topology, k, h), algorithms in by_config.items():
        if "s2s" not in algorithms or "s2a" not in algorithms:
            continue
        seeds = sorted(set(algorithms["s2s"]) & set(algorithms["s2a"]))
        if not seeds:
            continue
        s2s = [algorithms["s2s"][s] for s in seeds]
        s2a = [algorithms["s2a"][s] for s in seeds]
        gap = [a - b for a, b in zip(s2s, s2a)]
        rows.append(
            {
                "regime": regime,
                "topology": topology,
                "sampled": k,
                "period": h,
                "seeds": len(seeds),
                "s2s": _mean_std(s2s),
                "s2a": _mean_std(s2a),
                "gap": _mean_std(gap),
            }
        )
    return rows


def _pm(stat: tuple[float, float], sign: bool = False) -> str:
    return f"{stat[0]:+.2f} ± {stat[1]:.2f}" if sign else f"{stat[0]:.2f} ± {stat[1]:.2f}"


TIE = 0.05  # pp: a mean gap smaller than this counts as a tie


def win_shares(rows: list[dict], devices: int) -> dict[str, tuple[int, int, int]]:
    """Per regime: (S2S wins, S2A wins, ties) over the configurations with K < n."""
    shares: dict[str, list[int]] = {}
    for row in rows:
        if row["sampled"] >= devices:
            continue
        counts = shares.setdefault(row["regime"], [0, 0, 0])
        gap = row["gap"][0]
        counts[0 if gap > TIE else 1 if gap < -TIE else 2] += 1
    return {regime: tuple(c) for regime, c in shares.items()}


def _group_mean(rows: list[dict], field: str, value_of) -> dict:
    groups: dict = {}
    for row in rows:
        groups.setdefault(row[field], []).append(value_of(row))
    return {k: sum(v) / len(v) for k, v in groups.items()}


def claims_table(rows: list[dict], regimes: list[str], devices: int) -> str:
    """The paper's claims next to the numbers that test them (mean gaps in pp, S2S - S2A)."""
    lines = ["| claim | measured |", "|---|---|"]
    shares = win_shares(rows, devices)
    for regime in regimes:
        if regime in shares:
            s2s, s2a, tie = shares[regime]
            total = s2s + s2a + tie
            mean_gap = sum(r["gap"][0] for r in rows if r["regime"] == regime and r["sampled"] < devices) / max(
                total, 1
            )
            lines.append(
                f"| {regime}: who wins (K < n) | S2S {s2s}/{total} ({100 * s2s / max(total, 1):.0f}%), S2A {s2a}/{total}, "
                f"ties {tie}; mean gap {mean_gap:+.2f} pp |"
            )
    by_k = _group_mean(rows, "sampled", lambda r: abs(r["gap"][0]))
    lines.append(
        "| the gap narrows as K/n grows and vanishes at K = n | mean abs gap by K: "
        + ", ".join(f"K={k}: {v:.2f}" for k, v in sorted(by_k.items()))
        + " |"
    )
    for algorithm in ("s2s", "s2a"):
        by_h = _group_mean(rows, "period", lambda r, a=algorithm: r[a][0])
        lines.append(
            f"| both degrade as H grows ({algorithm.upper()}) | mean accuracy by H: "
            + ", ".join(f"H={h}: {v:.2f}" for h, v in sorted(by_h.items()))
            + " |"
        )
    for regime in regimes:
        regime_rows = [r for r in rows if r["regime"] == regime and r["sampled"] < devices]
        by_topology = _group_mean(regime_rows, "topology", lambda r: r["gap"][0])
        if by_topology:
            lines.append(
                f"| {regime}: sparse graphs (ring) and dynamic graphs favour S2S | mean gap by topology: "
                + ", ".join(f"{t}: {v:+.2f}" for t, v in by_topology.items())
                + " |"
            )
    return "\n".join(lines) + "\n"


def gap_markdown(rows: list[dict]) -> str:
    lines = [
        "| regime | topology | K | H | seeds | S2S | S2A | S2S − S2A (pp) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["regime"], r["topology"], r["sampled"], r["period"])):
        lines.append(
            f"| {r['regime']} | {r['topology']} | {r['sampled']} | {r['period']} | {r['seeds']} | {_pm(r['s2s'])} | "
            f"{_pm(r['s2a'])} | {_pm(r['gap'], sign=True)} |"
        )
    return "\n".join(lines) + "\n"


def plot_gap_heatmaps(rows_by_metric: dict[str, list[dict]], regimes: list[str], devices: int, path: Path) -> Path:
    """Mean S2S - S2A gap over (K/n, H), averaged over topologies: one panel per regime and metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = list(rows_by_metric)
    fig, axes = plt.subplots(
        len(metrics),
        len(regimes),
        figsize=(3.6 * len(regimes), 3.0 * len(metrics)),
        squeeze=False,
        constrained_layout=True,
    )
    limit = max((abs(r["gap"][0]) for rows in rows_by_metric.values() for r in rows), default=1.0) or 1.0
    image = None
    for i, metric in enumerate(metrics):
        rows = rows_by_metric[metric]
        ks = sorted({r["sampled"] for r in rows})
        hs = sorted({r["period"] for r in rows})
        for j, regime in enumerate(regimes):
            ax = axes[i][j]
            grid = np.full((len(hs), len(ks)), np.nan)
            for a, h in enumerate(hs):
                for b, k in enumerate(ks):
                    gaps = [
                        r["gap"][0] for r in rows if r["regime"] == regime and r["sampled"] == k and r["period"] == h
                    ]
                    if gaps:
                        grid[a, b] = sum(gaps) / len(gaps)
            image = ax.imshow(grid, cmap="RdBu", vmin=-limit, vmax=limit, origin="lower", aspect="auto")
            for a in range(len(hs)):
                for b in range(len(ks)):
                    if not np.isnan(grid[a, b]):
                        ax.text(b, a, f"{grid[a, b]:+.1f}", ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(ks)), [f"{k / devices:g}" for k in ks])
            ax.set_yticks(range(len(hs)), [str(h) for h in hs])
            ax.set_xlabel("K/n")
            ax.set_ylabel("H")
            ax.set_title(f"{regime}, {metric} accuracy", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="S2S − S2A (pp; blue: S2S better)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_semidec_curves(study: SemidecStudy, path: Path) -> Path | None:
    """Accuracy per evaluation round, S2S against S2A (mean over finished seeds), for the first
    topology, the smallest K and the largest H of the study: one panel per regime."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = study.cells[0].config
    topology = first.topology
    k = min(c.config.sampled for c in study.cells)
    h = max(c.config.period for c in study.cells)
    fig, axes = plt.subplots(
        1, len(study.regimes), figsize=(4.2 * len(study.regimes), 3.2), squeeze=False, constrained_layout=True
    )
    drawn = False
    for j, regime in enumerate(study.regimes):
        ax = axes[0][j]
        for algorithm, color in (("s2s", "tab:blue"), ("s2a", "tab:red")):
            runs = [
                _records(cell.folder)
                for cell in study.cells
                if cell.regime == regime
                and cell.config.algorithm == algorithm
                and cell.config.topology == topology
                and cell.config.sampled == k
                and cell.config.period == h
                and is_finished(cell.folder, cell.config)
            ]
            if not runs:
                continue
            drawn = True
            rounds = [r["round"] for r in runs[0]]
            for key, style, label in (
                ("local_test_accuracy", "-", "local"),
                ("avg_test_accuracy", ":", "average model"),
            ):
                mean = [100 * sum(run[i][key] for run in runs) / len(runs) for i in range(len(rounds))]
                ax.plot(rounds, mean, style, color=color, lw=1.2, label=f"{algorithm.upper()} {label}")
        ax.set_title(f"{regime}: {topology}, K={k}, H={h}", fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    if not drawn:
        plt.close(fig)
        return None
    next(ax for ax in axes[0] if ax.lines).legend(fontsize=7, loc="lower right")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _total_bytes(record: dict) -> int:
    return record["bytes_d2d"] + record["bytes_d2s"]


def _late_within(records: list[dict], key: str, budget: int) -> tuple[float, int]:
    """Late accuracy of a run cut where its bytes on the wire reach `budget`: the mean of `key`
    over the evaluations in the last quarter of the rounds it had by then; and those rounds."""
    within = [r for r in records if _total_bytes(r) <= budget] or records[:1]
    rounds = within[-1]["round"]
    late = [r[key] for r in within if r["round"] > LATE * rounds] or [within[-1][key]]
    return sum(late) / len(late), rounds


def sparse_table(study: SemidecStudy) -> list[dict]:
    """Sparse devices against dense ones: one row per (regime, topology, K, H, algorithm,
    density < 1) with its dense partner (density 1, the same seeds) finished. Late accuracy at
    equal rounds (both metrics), bytes on the wire (sparse / dense), and the dense run's late
    accuracy when it had sent as many bytes as the sparse run sent in all its rounds."""
    done = {}
    for cell in study.cells:
        c = cell.config
        if is_finished(cell.folder, c):
            masks = c.masks if c.sparse else None
            done[(cell.regime, c.topology, c.sampled, c.period, c.algorithm, c.density, masks, c.seed)] = cell
    groups: dict[tuple, list[dict]] = {}
    for (regime, topology, k, h, algorithm, density, masks, seed), cell in done.items():
        dense = done.get((regime, topology, k, h, algorithm, 1.0, None, seed))
        if density >= 1.0 or dense is None:
            continue
        sparse_records, dense_records = _records(cell.folder), _records(dense.folder)
        sent = _total_bytes(sparse_records[-1])
        row = {"bytes": sent / _total_bytes(dense_records[-1])}
        for metric, (key, _) in METRICS.items():
            row[f"{metric}_sparse"] = 100 * late_accuracy(sparse_records, key, cell.config.rounds)
            row[f"{metric}_dense"] = 100 * late_accuracy(dense_records, key, dense.config.rounds)
            at_bytes, rounds = _late_within(dense_records, key, sent)
            row[f"{metric}_dense_at_bytes"] = 100 * at_bytes
            row["dense_rounds_at_bytes"] = rounds
        groups.setdefault((regime, topology, k, h, algorithm, density, masks), []).append(row)
    rows = []
    for (regime, topology, k, h, algorithm, density, masks), runs in sorted(groups.items()):
        row = {"regime": regime, "topology": topology, "sampled": k, "period": h, "algorithm": algorithm}
        row.update(density=density, masks=masks, seeds=len(runs))
        for field in runs[0]:
            row[field] = _mean_std([r[field] for r in runs])
        for metric in METRICS:
            row[f"{metric}_gap"] = _mean_std([r[f"{metric}_sparse"] - r[f"{metric}_dense"] for r in runs])
        rows.append(row)
    return rows


def sparse_markdown(rows: list[dict]) -> str:
    lines = [
        "| regime | algorithm | density | masks | seeds | bytes, sparse / dense | local: dense | local: sparse | "
        "local Δ (pp) | average model: dense | average model: sparse | Δ (pp) | dense at equal bytes: "
        "local / average model (rounds) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['regime']} | {r['algorithm'].upper()} | {r['density']:g} | {r['masks']} | {r['seeds']} | "
            f"{100 * r['bytes'][0]:.1f}% | {_pm(r['local_dense'])} | {_pm(r['local_sparse'])} | "
            f"{_pm(r['local_gap'], sign=True)} | {_pm(r['global_dense'])} | {_pm(r['global_sparse'])} | "
            f"{_pm(r['global_gap'], sign=True)} | {r['local_dense_at_bytes'][0]:.2f} / "
            f"{r['global_dense_at_bytes'][0]:.2f} ({r['dense_rounds_at_bytes'][0]:.0f}) |"
        )
    return "\n".join(lines) + "\n"


def write_semidec_report(study: SemidecStudy, log=print) -> list[Path]:
    """semidec.md (gap tables, win shares, the paper's claims), gaps.png and curves.png."""
    study.out.mkdir(parents=True, exist_ok=True)
    devices = study.cells[0].config.devices
    finished = sum(is_finished(cell.folder, cell.config) for cell in study.cells)
    rows_by_metric = {metric: gap_table(study, metric) for metric in METRICS}
    first = study.cells[0].config
    parts = [
        f"# S2S vs S2A: {first.dataset}, {first.model}, {devices} devices in {first.components} components, "
        f"{first.rounds} rounds\n",
        f"{finished} of {len(study.cells)} cells finished. Accuracy in %: the mean of the evaluations in the last "
        f"quarter of the rounds (late accuracy), mean ± std over seeds; the gap is paired by seed. A mean gap within "
        f"±{TIE} pp is a tie; K = n is left out of the win counts (S2S and S2A are then the same algorithm).\n",
    ]
    for metric, (_, what) in METRICS.items():
        rows = rows_by_metric[metric]
        parts.append(f"\n## {metric} accuracy: {what}\n\n")
        parts.append(claims_table(rows, study.regimes, devices))
        parts.append("\n<details><summary>every configuration</summary>\n\n" + gap_markdown(rows) + "\n</details>\n")
    if len({cell.config.density for cell in study.cells}) > 1:
        parts.append(
            "\n## Sparse devices against dense ones\n\nLate accuracy at equal rounds, mean ± std over seeds (Δ "
            "paired by seed); bytes are everything sent D2D and D2S, indices included; the last column is the "
            "dense run's late accuracy when it had sent the sparse run's bytes.\n\n"
            + sparse_markdown(sparse_table(study))
        )
    path = study.out / "semidec.md"
    path.write_text("".join(parts))
    written = [path]
    if any(rows_by_metric.values()):
        written.append(plot_gap_heatmaps(rows_by_metric, study.regimes, devices, study.out / "gaps.png"))
    curves = plot_semidec_curves(study, study.out / "curves.png")
    if curves is not None:
        written.append(curves)
    if log:
        for metric in METRICS:
            shares = win_shares(rows_by_metric[metric], devices)
            for regime, (s2s, s2a, tie) in shares.items():
                log(f"{metric:>6} accuracy, {regime}: S2S wins {s2s}, S2A wins {s2a}, ties {tie}")
        log("wrote " + ", ".join(str(p) for p in written))
    return written
