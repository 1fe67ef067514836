"""Run a grid of configurations (methods x seeds), each in its own folder, resumably.

A cell whose `summary.json` says it finished is never re-run; a cell that was interrupted
resumes from its checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from neuroplast.data import load_dataset
from neuroplast.train.config import RunConfig
from neuroplast.train.trainer import train


def cell_name(method: str, seed: int) -> str:
    return f"{method}-seed{seed}"


def is_finished(folder: Path, config: RunConfig) -> bool:
    """True if `folder` holds a finished run of exactly `config` (a changed config is re-run,
    or refused by `train` if the folder holds a partial run of another config)."""
    path = folder / "summary.json"
    if not path.is_file():
        return False
    summary = json.loads(path.read_text())
    saved = summary.get("config")
    return isinstance(saved, dict) and not config.changed_from(saved) and summary.get("epochs") == config.epochs


def run_grid(
    base: RunConfig,
    methods: Sequence[str],
    seeds: Sequence[int],
    out: str | Path,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    log_epochs: bool = True,
) -> list[Path]:
    """Train every (method, seed) cell of `base`; return the cell folders in grid order.

    log_epochs: a line per epoch (else one line per finished cell)."""
    out = Path(out)
    configs = [replace(base, method=m, seed=s).validate() for m in methods for s in seeds]
    folders = [out / cell_name(c.method, c.seed) for c in configs]
    todo = [(c, f) for c, f in zip(configs, folders) if not is_finished(f, c)]
    if log and len(todo) < len(configs):
        log(f"{len(configs) - len(todo)} of {len(configs)} cells already finished in {out}; skipping them")
    dataset = load_dataset(base.dataset, flatten=base.model == "mlp", **base.dataset_options()) if todo else None
    for i, (config, folder) in enumerate(todo, 1):
        if log:
            log(f"[{i}/{len(todo)}] {folder.name}")
        summary = train(
            config, folder, resume=True, progress=progress, log=log if log_epochs else None, dataset=dataset
        )
        if log and not log_epochs:
            log(f"      final test accuracy {summary['final_test_accuracy']:.4f} in {summary['seconds']:.0f}s")
    return folders
