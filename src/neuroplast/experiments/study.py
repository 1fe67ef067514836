"""Studies: methods x densities x seeds (and an optional ablation grid), the one way to run a grid
of training runs: from a TOML file (`neuroplast study`), or as a one-density study of methods x
seeds (`neuroplast compare`, `neuroplast demo`).

Every cell trains in its own folder, `<out>/<method>/d<density>/seed<seed>` (ablation cells under
`<out>/ablation/`). A finished cell is never re-run and an interrupted one resumes from its last
checkpoint, so a study can be stopped (Ctrl-C) and started again at any time. Cells run in
parallel worker processes; the report (`study.md`, `curves.png`, `connectivity.png`,
`ablation.md`) is made from whatever cells are finished.

Config format:

    [study]
    methods = ["set", "rigl"]          # DST presets
    densities = [0.05, 0.01]           # fractions of live weights, in (0, 1]
    seeds = [0, 1, 2]
    workers = 2                        # parallel cells (default: 2 on CPU, 1 on CUDA)
    out = "runs/study"                 # default "runs/study"
    report_epochs = [1, 3]             # accuracy columns besides the final one (default none)
    heatmap_methods = ["rigl"]         # input-layer connectivity figure (default none)
    heatmap_density = 0.05             # default: the first density
    baseline = "set"                   # "epochs to reach its final accuracy" (default: first method)

    [ablation]                         # optional: methods, densities, seeds, baseline
    [run]                              # RunConfig keys shared by every cell
    [method.rigl]                      # RunConfig keys for one method's cells
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from neuroplast.data import DataError, is_available_offline, load_dataset
from neuroplast.dst import METHODS
from neuroplast.experiments.runner import cached_dataset, check_keys, run_cells, workers_setting
from neuroplast.train.checkpoint import find_checkpoint, load_checkpoint
from neuroplast.train.config import ConfigError, RunConfig, load_toml
from neuroplast.train.trainer import train

Log = Callable[[str], None] | None

TABLES = ("study", "ablation", "run", "method")
STUDY_KEYS = (
    "methods",
    "densities",
    "seeds",
    "workers",
    "out",
    "report_epochs",
    "heatmap_methods",
    "heatmap_density",
    "baseline",
)
ABLATION_KEYS = ("methods", "densities", "seeds", "baseline")
CELL_KEYS = ("method", "density", "seed")  # set per cell, never in [run] or [method.*]
DEFAULT_OUT = "runs/study"


@dataclass
class Cell:
    grid: str  # its grid's name
    method: str
    density: float
    seed: int
    config: RunConfig
    folder: Path
    name: str  # the folder relative to the study's out


@dataclass
class Grid:
    name: str  # "study" or "ablation" ("compare" for a study made by `compare_study`)
    methods: list[str]
    densities: list[float]
    seeds: list[int]
    baseline: str
    table: str  # the report's file name for this grid's table
    cells: list[Cell] = field(default_factory=list)


@dataclass
class Study:
    out: Path
    workers: int
    grids: list[Grid]  # the study grid, then the ablation grid if configured
    report_epochs: list[int]
    heatmap_methods: list[str]
    heatmap_density: float | None
    source: str = "config"
    curves: str = "curves.png"  # the report's file name for the first grid's learning curves

    @property
    def cells(self) -> list[Cell]:
        return [cell for grid in self.grids for cell in grid.cells]


def density_folder(density: float) -> str:
    """0.05 -> 'd0.05' (the shortest text that reads back as the same float)."""
    return f"d{float(density)!r}"


def is_finished(folder: Path, config: RunConfig) -> bool:
    """True if `folder` holds a finished run of exactly `config` (a changed config is re-run,
    or refused by `train` if the folder holds a partial run of another config)."""
    path = folder / "summary.json"
    if not path.is_file():
        return False
    summary = json.loads(path.read_text())
    saved = summary.get("config")
    return isinstance(saved, dict) and not config.changed_from(saved) and summary.get("epochs") == config.epochs


def _add_cells(grid: Grid, out: Path, root: Path, config_for: Callable[[str, float, int], RunConfig]) -> None:
    """Fill `grid.cells`: one per (method, density, seed), in `root/<method>/d<density>/seed<seed>`."""
    for seed in grid.seeds:  # seed-major: a study stopped early has every method at the first seeds
        for method in grid.methods:
            for density in grid.densities:
                folder = root / method / density_folder(density) / f"seed{seed}"
                config = config_for(method, density, seed)
                grid.cells.append(
                    Cell(grid.name, method, density, seed, config, folder, folder.relative_to(out).as_posix())
                )


# -- config -----------------------------------------------------------------------------------


def _type_name(value) -> str:
    return type(value).__name__


def list_setting(table: dict, key: str, where: str, kind: type, example: str, required: bool = True) -> list | None:
    """table[key] checked as a list of `kind` without repeats (the error shows `example`)."""
    if key not in table:
        if required:
            raise ConfigError(f"{where} needs {key}, e.g. {key} = {example}")
        return None
    values = table[key]
    if not isinstance(values, list):
        raise ConfigError(f"{where} {key} {values!r} must be a list, e.g. {key} = {example}")
    for value in values:
        ok = isinstance(value, kind) and not isinstance(value, bool)
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise ConfigError(f"{where} {key} holds {value!r} ({_type_name(value)}); e.g. {key} = {example}")
    if required and not values:
        raise ConfigError(f"{where} {key} is empty; give at least one, e.g. {key} = {example}")
    duplicates = sorted({v for v in values if values.count(v) > 1}, key=str)
    if duplicates:
        raise ConfigError(f"{where} {key} lists {duplicates[0]!r} more than once")
    return values


def _methods(table: dict, where: str) -> list[str]:
    methods = list_setting(table, "methods", where, str, '["set", "rigl"]')
    for method in methods:
        if method not in METHODS:
            raise ConfigError(f"unknown method {method!r} in {where} methods; choose from: {', '.join(METHODS)}")
    return methods


def _densities(table: dict, where: str) -> list[float]:
    densities = [float(d) for d in list_setting(table, "densities", where, float, "[0.05, 0.01]")]
    for density in densities:
        if not 0.0 < density <= 1.0:
            raise ConfigError(f"density {density!r} in {where} densities is outside (0, 1]; e.g. 0.05 for 95% sparsity")
    return densities


def _seeds(table: dict, where: str) -> list[int]:
    seeds = list_setting(table, "seeds", where, int, "[0, 1, 2]")
    for seed in seeds:
        if not 0 <= seed < 2**32:
            raise ConfigError(f"seed {seed!r} in {where} seeds must be in [0, 2**32)")
    return seeds


def _baseline(table: dict, where: str, methods: list[str]) -> str:
    baseline = table.get("baseline", methods[0])
    if baseline not in methods:
        raise ConfigError(f"baseline {baseline!r} in {where} is not one of its methods: {', '.join(methods)}")
    return baseline


def _run_values(table, where: str) -> dict:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table of RunConfig keys, not {table!r}")
    for key in CELL_KEYS:
        if key in table:
            raise ConfigError(
                f"{where} sets {key!r}; a study sets method, density and seed per cell from [study] "
                "methods, densities and seeds"
            )
    RunConfig.from_dict(table, where)  # unknown keys, with the valid ones listed
    return table


def default_workers(device: str) -> int:
    """Cells at a time when none is configured: 1 on CUDA, else 2 (or 1 on a single core)."""
    cuda = device == "cuda"
    if device == "auto":
        import torch

        cuda = torch.cuda.is_available()
    return 1 if cuda else max(1, min(2, os.cpu_count() or 1))


def parse_study(
    values: dict, source: str = "config", out: str | Path | None = None, workers: int | None = None
) -> Study:
    """A validated `Study` from the tables of a study config; `out` and `workers` override it."""
    for key, value in values.items():
        if key not in TABLES or not isinstance(value, dict):
            kind = "table [" + key + "]" if isinstance(value, dict) else f"top-level key {key!r}"
            raise ConfigError(f"unknown {kind} in {source}; valid tables: [study], [ablation], [run], [method.NAME]")
    if "study" not in values:
        raise ConfigError(f"{source} has no [study] table; it needs at least methods, densities and seeds")
    table = check_keys(values["study"], "[study]", STUDY_KEYS)
    methods = _methods(table, "[study]")
    densities, seeds = _densities(table, "[study]"), _seeds(table, "[study]")
    grids = [Grid("study", methods, densities, seeds, _baseline(table, "[study]", methods), "study.md")]
    if "ablation" in values:
        ablation = check_keys(values["ablation"], "[ablation]", ABLATION_KEYS)
        ablation_methods = _methods(ablation, "[ablation]")
        grids.append(
            Grid(
                "ablation",
                ablation_methods,
                _densities(ablation, "[ablation]"),
                _seeds(ablation, "[ablation]"),
                _baseline(ablation, "[ablation]", ablation_methods),
                "ablation.md",
            )
        )
    run = _run_values(values.get("run", {}), "[run]")
    overrides = values.get("method", {})
    all_methods = list(dict.fromkeys(m for grid in grids for m in grid.methods))
    for method, method_table in overrides.items():
        if method not in all_methods:
            raise ConfigError(
                f"[method.{method}] names a method in neither grid; methods of the study: {', '.join(all_methods)}"
            )
        _run_values(method_table, f"[method.{method}]")

    workers_value = workers_setting(table, workers, default_workers(run.get("device", RunConfig.device)))
    out_value = out if out is not None else table.get("out", DEFAULT_OUT)
    if not isinstance(out_value, (str, Path)) or not str(out_value):
        raise ConfigError(f'out {out_value!r} in [study] must be a folder name, e.g. out = "runs/study"')
    out_path = Path(out_value)

    def config_for(method: str, density: float, seed: int) -> RunConfig:
        values_ = {**run, **overrides.get(method, {}), "method": method, "density": density, "seed": seed}
        return RunConfig.from_dict(values_, f"cell {method}/{density_folder(density)}/seed{seed}").validate()

    for grid in grids:
        _add_cells(grid, out_path, out_path if grid.name == "study" else out_path / "ablation", config_for)

    report_epochs = list_setting(table, "report_epochs", "[study]", int, "[1, 3, 10]", required=False) or []
    last = min(cell.config.epochs for cell in grids[0].cells)
    for epoch in report_epochs:
        if not 1 <= epoch <= last:
            raise ConfigError(f"report_epochs {epoch!r} in [study] is not an epoch of every cell (1 to {last})")
    heatmap_methods = list_setting(table, "heatmap_methods", "[study]", str, '["set"]', required=False) or []
    for method in heatmap_methods:
        if method not in methods:
            raise ConfigError(f"heatmap method {method!r} in [study] is not one of its methods: {', '.join(methods)}")
    heatmap_density = table.get("heatmap_density")
    if heatmap_density is None:
        heatmap_density = grids[0].densities[0] if heatmap_methods else None
    elif isinstance(heatmap_density, bool) or not isinstance(heatmap_density, (int, float)):
        raise ConfigError(f"heatmap_density {heatmap_density!r} in [study] must be one of the densities")
    elif float(heatmap_density) not in grids[0].densities:
        raise ConfigError(
            f"heatmap_density {heatmap_density!r} in [study] is not one of the densities: "
            + ", ".join(f"{d:g}" for d in grids[0].densities)
        )
    return Study(
        out=out_path,
        workers=workers_value,
        grids=grids,
        report_epochs=list(report_epochs),
        heatmap_methods=list(heatmap_methods),
        heatmap_density=None if heatmap_density is None else float(heatmap_density),
        source=source,
    )


def load_study(path: str | Path, out: str | Path | None = None, workers: int | None = None) -> Study:
    """The study configured in the TOML file `path` (see the module docstring)."""
    return parse_study(load_toml(path), f"config file {str(path)!r}", out, workers)


def compare_study(
    base: RunConfig, methods: Sequence[str], seeds: Sequence[int], out: str | Path, workers: int | None = None
) -> Study:
    """A study of one density: every method of `methods` with `base`'s settings, for every seed
    (what `neuroplast compare` runs). Its report is `results.md` and `learning_curves.png`.

    workers: cells at a time (default: as for a study, 2 on CPU and 1 on CUDA)."""
    methods = _methods({"methods": list(methods)}, "compare")
    seeds = _seeds({"seeds": list(seeds)}, "compare")
    out_path = Path(out)
    grid = Grid("compare", methods, [base.density], seeds, methods[0], "results.md")
    _add_cells(
        grid,
        out_path,
        out_path,
        lambda method, density, seed: replace(base, method=method, density=density, seed=seed).validate(),
    )
    return Study(
        out=out_path,
        workers=workers_setting({}, workers, default_workers(base.device)),
        grids=[grid],
        report_epochs=[],
        heatmap_methods=[],
        heatmap_density=None,
        source="command line",
        curves="learning_curves.png",
    )


# -- running ----------------------------------------------------------------------------------


def run_cell(config: RunConfig, folder: str | Path) -> dict:
    """Train (or resume) one cell quietly; return its summary."""
    dataset = cached_dataset(config.dataset, config.model == "mlp", **config.dataset_options())
    return train(config, folder, resume=True, progress=False, log=None, dataset=dataset)


def _fetch_datasets(cells: list[Cell], progress: bool) -> None:
    """Download missing datasets once, here, rather than in every worker at the same time."""
    for name in dict.fromkeys(cell.config.dataset for cell in cells):
        if not is_available_offline(name):
            load_dataset(name, progress=progress)


def run_study(study: Study, progress: bool = True, log: Log = print) -> list[Cell]:
    """Train every unfinished cell of `study` (`study.workers` at a time); return those trained.

    A progress bar counts the cells; `log` gets a line per finished cell (name, final accuracy,
    seconds). Ctrl-C stops every cell at once: finished cells stay finished and the others resume
    from their last checkpoint next time.
    """
    cells = study.cells
    # seed by seed: a study stopped early still has every method at the first seeds
    order = {id(cell): i for i, cell in enumerate(cells)}
    todo = sorted(
        (cell for cell in cells if not is_finished(cell.folder, cell.config)),
        key=lambda cell: (cell.seed, order[id(cell)]),
    )
    if log and len(todo) < len(cells):
        log(f"{len(cells) - len(todo)} of {len(cells)} cells already finished in {study.out}; skipping them")
    if not todo:
        return []
    _fetch_datasets(todo, progress)
    resumed = {cell.name for cell in todo if find_checkpoint(cell.folder) is not None}
    workers = min(study.workers, len(todo))
    if log:
        where = "in this process" if study.workers == 1 else f"in {workers} worker processes"
        log(f"training {len(todo)} cells {where}" + (f" ({len(resumed)} resume)" if resumed else ""))
    width = max(len(cell.name) for cell in todo)

    def done(cell: Cell, summary: dict) -> None:
        if log:
            note = "  (resumed)" if cell.name in resumed else ""
            log(
                f"{cell.name:<{width}}  final test accuracy {100 * summary['final_test_accuracy']:.2f}%  "
                f"{summary['seconds']:.1f}s{note}"
            )

    run_cells(todo, run_cell, study.workers, len(cells), progress, done)
    return todo


# -- report -----------------------------------------------------------------------------------


def _setting(grid: Grid) -> str:
    """What every cell of `grid` shares, e.g. 'fashion-mnist, mlp 1000-1000-1000, erk, 10 epochs'."""
    config = grid.cells[0].config
    hidden = f" {'-'.join(map(str, config.hidden))}" if config.model == "mlp" else ""
    return f"{config.dataset}, {config.model}{hidden}, {config.distribution}, {config.epochs} epochs"


def _image_shape(config: RunConfig) -> tuple[int, ...] | None:
    try:
        return cached_dataset(config.dataset, config.model == "mlp").image_shape
    except DataError:
        return None


def connectivity_maps(study: Study, log: Log = print) -> list[tuple[str, object]]:
    """(title, H x W live-connection counts) for each heatmap method's first-seed cell at the
    heatmap density, from its final checkpoint; cells that are missing are skipped with a note."""
    from neuroplast.experiments.report import connectivity_image, input_connectivity, load_cell

    grid = study.grids[0]
    seed = min(grid.seeds)
    maps = []
    for method in study.heatmap_methods:
        cell = next(
            c for c in grid.cells if c.method == method and c.density == study.heatmap_density and c.seed == seed
        )
        checkpoint = find_checkpoint(cell.folder)
        if not is_finished(cell.folder, cell.config) or checkpoint is None:
            if log:
                log(f"connectivity: skipping {method} ({cell.name} is not finished)")
            continue
        shape = _image_shape(cell.config)
        if shape is None:
            if log:
                log(f"connectivity: skipping {method} (dataset {cell.config.dataset!r} is not available)")
            continue
        tensors, _ = load_checkpoint(checkpoint)
        counts = input_connectivity(tensors, math.prod(shape), load_cell(cell.folder).layers or None)
        if counts is None:
            if log:
                log(f"connectivity: skipping {method} (no sparse layer reads the input features)")
            continue
        maps.append((method, connectivity_image(counts, shape)))
    return maps


def write_report(study: Study, show: bool = True, log: Log = print) -> list[Path]:
    """Write each grid's table (study.md, ablation.md), the first grid's curves (curves.png) and
    connectivity.png into `study.out` from the finished cells; print the tables when `show`.
    Returns the files written."""
    from neuroplast.experiments.report import (
        load_cell,
        plot_connectivity,
        plot_study_curves,
        print_study_table,
        study_markdown,
        study_rows,
    )

    study.out.mkdir(parents=True, exist_ok=True)
    written = []
    for grid in study.grids:
        finished = [cell for cell in grid.cells if is_finished(cell.folder, cell.config)]
        results = [load_cell(cell.folder) for cell in finished]
        rows = study_rows(results, study.report_epochs, grid.baseline, grid.densities, grid.methods)
        title = f"{grid.name}: {_setting(grid)}, seeds {','.join(map(str, grid.seeds))}"
        counted = f"{len(finished)} of {len(grid.cells)} cells finished"
        columns = (
            f"Test accuracy in % (mean ± sample std over seeds); R_s: final fraction of weights ever live; "
            f"survival: mean fraction of the regrown connections kept by the next update; s/epoch: training "
            f"seconds per epoch; epochs to {grid.baseline}: first epoch at which the mean accuracy reaches "
            f"{grid.baseline}'s final mean accuracy at the same sparsity."
        )
        path = study.out / grid.table
        table = study_markdown(rows, study.report_epochs, grid.baseline)
        path.write_text(f"# {title}\n\n{counted}. {columns}\n\n{table}")
        written.append(path)
        if show:
            print_study_table(rows, study.report_epochs, grid.baseline, f"{title} ({counted})")
        if grid is study.grids[0]:
            if results:
                written.append(
                    plot_study_curves(results, study.out / study.curves, title, grid.densities, grid.methods)
                )
            elif log:
                log("curves: no finished cells yet")
    if study.heatmap_methods:
        maps = connectivity_maps(study, log)
        if maps:
            title = (
                f"live connections per input pixel, first sparse layer: {_setting(study.grids[0])}, "
                f"density {study.heatmap_density:g}, seed {min(study.grids[0].seeds)}"
            )
            written.append(plot_connectivity(maps, study.out / "connectivity.png", title))
    if log:
        log("wrote " + ", ".join(str(p) for p in written))
    return written
