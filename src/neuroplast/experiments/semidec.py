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

import json
import os
from dataclasses import dataclass
from pathlib import Path

from neuroplast.experiments.runner import cached_dataset, run_cells
from neuroplast.federated.config import ALGORITHMS, FederatedConfig
from neuroplast.federated.run import federate
from neuroplast.federated.topology import TOPOLOGIES
from neuroplast.train.checkpoint import find_checkpoint
from neuroplast.train.config import ConfigError, load_toml

STUDY_KEYS = ("algorithms", "topologies", "sampled", "periods", "seeds", "workers", "out")
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


def _list(table: dict, key: str, kind: type, example: str) -> list:
    values = table.get(key)
    if not isinstance(values, list) or not values:
        raise ConfigError(f"[study] {key} must be a non-empty list, e.g. {key} = {example}")
    for value in values:
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ConfigError(f"[study] {key} holds {value!r}; e.g. {key} = {example}")
    if len(set(values)) < len(values):
        raise ConfigError(f"[study] {key} lists a value more than once: {values!r}")
    return values


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
    for key, value in values.items():
        if key not in ("study", "regimes", "run"):
            raise ConfigError(f"unknown table or key {key!r} in {source}; valid tables: [study], [regimes.NAME], [run]")
    table = values.get("study")
    if not isinstance(table, dict):
        raise ConfigError(f"{source} has no [study] table; it needs algorithms, topologies, sampled, periods, seeds")
    unknown = sorted(set(table) - set(STUDY_KEYS))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in [study]; valid keys: {', '.join(STUDY_KEYS)}")
    algorithms = _list(table, "algorithms", str, '["s2s", "s2a"]')
    for a in algorithms:
        if a not in ALGORITHMS:
            raise ConfigError(f"unknown algorithm {a!r} in [study] algorithms; choose from: {', '.join(ALGORITHMS)}")
    topologies = _list(table, "topologies", str, '["ring", "complete"]')
    for t in topologies:
        if t not in TOPOLOGIES:
            raise ConfigError(f"unknown topology {t!r} in [study] topologies; choose from: {', '.join(TOPOLOGIES)}")
    sampled = _list(table, "sampled", int, "[10, 20, 50, 100]")
    periods = _list(table, "periods", int, "[1, 5, 20]")
    seeds = _list(table, "seeds", int, "[0, 1, 2]")
    regimes = values.get("regimes", {"default": {}})
    if not isinstance(regimes, dict) or not regimes:
        raise ConfigError("[regimes] must hold at least one [regimes.NAME] table")
    run = _run_values(values.get("run", {}), "[run]")
    for name, regime in regimes.items():
        _run_values(regime, f"[regimes.{name}]")
    workers_value = workers if workers is not None else table.get("workers", max(1, min(2, os.cpu_count() or 1)))
    if not isinstance(workers_value, int) or isinstance(workers_value, bool) or workers_value < 1:
        raise ConfigError(f"workers {workers_value!r} must be a positive integer (1 runs the cells in this process)")
    out_path = Path(out if out is not None else table.get("out", DEFAULT_OUT))
    cells = []
    for seed in seeds:  # seed-major: a study stopped early has every configuration at the first seeds
        for regime, regime_values in regimes.items():
            for topology in topologies:
                for k in sampled:
                    for h in periods:
                        for algorithm in algorithms:
                            folder = Path(regime) / topology / f"K{k}-H{h}" / algorithm / f"seed{seed}"
                            values_ = {
                                **run,
                                **regime_values,
                                "algorithm": algorithm,
                                "topology": topology,
                                "sampled": k,
                                "period": h,
                                "seed": seed,
                            }
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
        log(f"{len(study.cells) - len(todo)} of {len(study.cells)} cells already finished in {study.out}; skipping them")
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
