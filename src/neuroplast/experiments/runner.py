"""The grid runner every study uses: cells in parallel worker processes, each in its own folder.

A cell is anything with a picklable `config` and a `folder`; `run` is a module-level function
`run(config, folder) -> summary dict` that trains or resumes the cell quietly. Cells run `workers`
at a time (1: in this process), a progress bar counts them, and Ctrl-C stops every cell at once:
finished cells stay finished and the others resume from their last checkpoint next time.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from pathlib import Path

from neuroplast.data import Dataset, load_dataset
from neuroplast.train.config import ConfigError

_DATASETS: dict[tuple, Dataset] = {}


def cached_dataset(name: str, flatten: bool = False, **options) -> Dataset:
    """Each process loads a dataset once (per set of `load_dataset` options)."""
    key = (name, flatten, json.dumps(options, sort_keys=True))
    if key not in _DATASETS:
        _DATASETS[key] = load_dataset(name, flatten=flatten, progress=False, **options)
    return _DATASETS[key]


def study_table(values: dict, source: str, tables: tuple[str, ...], keys: tuple[str, ...], needs: str) -> dict:
    """The [study] table of a study config, after checking the config's tables (`tables` as they
    are written, e.g. "regimes.NAME") and the [study] keys; `needs` lists what [study] must hold."""
    tops = [t.split(".")[0] for t in tables]
    for key in values:
        if key not in tops:
            valid = ", ".join(f"[{t}]" for t in tables)
            raise ConfigError(f"unknown table or key {key!r} in {source}; valid tables: {valid}")
    if not isinstance(values.get("study"), dict):
        raise ConfigError(f"{source} has no [study] table; it needs {needs}")
    return check_keys(values["study"], "[study]", keys)


def check_keys(table, where: str, valid: tuple[str, ...]) -> dict:
    """`table`, checked to be a table of `valid` keys only."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table, not {table!r}")
    unknown = sorted(set(table) - set(valid))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in {where}; valid keys: {', '.join(valid)}")
    return table


def workers_setting(table: dict, workers: int | None, default: int) -> int:
    """Cells at a time: the override, else [study] workers, else `default`."""
    value = workers if workers is not None else table.get("workers", default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"workers {value!r} must be a positive integer (1 runs the cells in this process)")
    return value


def _init_worker(threads: int) -> None:
    import torch

    # Ctrl-C reaches every process of the terminal's group: the parent alone handles it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)


def _stop(executor: ProcessPoolExecutor, futures: dict[Future, object]) -> None:
    """Cancel the queued cells and end the running ones now; their last checkpoints stay."""
    for future in futures:
        future.cancel()
    for process in list((getattr(executor, "_processes", None) or {}).values()):
        if process.is_alive():
            process.terminate()
    executor.shutdown(wait=True, cancel_futures=True)


def _run_pool(todo: Sequence, run: Callable, workers: int, done: Callable[[object, dict], None]) -> None:
    import multiprocessing

    threads = max(1, (os.cpu_count() or 1) // workers)
    executor = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(threads,),
    )
    futures = {executor.submit(run, cell.config, str(cell.folder)): cell for cell in todo}
    try:
        for future in as_completed(futures):
            done(futures[future], future.result())
    except BaseException:
        _stop(executor, futures)
        raise
    executor.shutdown(wait=True)


def _cell_progress(enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]cells"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
    )


def run_cells(
    todo: Sequence,
    run: Callable[[object, str | Path], dict],
    workers: int,
    total: int,
    progress: bool = True,
    done: Callable[[object, dict], None] | None = None,
) -> None:
    """Run every cell of `todo` (`total` counts the grid, finished cells included) and call
    done(cell, summary) as each finishes."""
    bar = _cell_progress(progress)
    task = bar.add_task("cells", total=total, completed=total - len(todo)) if bar else None

    def finished(cell, summary: dict) -> None:
        if bar is not None:
            bar.advance(task)
        if done is not None:
            done(cell, summary)

    if bar is not None:
        bar.start()
    try:
        if workers == 1:
            for cell in todo:
                finished(cell, run(cell.config, cell.folder))
        else:
            _run_pool(todo, run, min(workers, len(todo)), finished)
    finally:
        if bar is not None:
            bar.stop()
