"""Checkpoints: tensors in safetensors, everything else in JSON, written atomically.

A checkpoint is a folder `checkpoint/` holding `tensors.safetensors` and `state.json`. It is
written in full under a temporary name and then swapped in by renames, so a crash at any moment
leaves the last complete checkpoint (as `checkpoint/` or, mid-swap, `checkpoint.old/`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CURRENT, PREVIOUS, PARTIAL = "checkpoint", "checkpoint.old", "checkpoint.partial"


def _fsync_write(path: Path, write) -> None:
    write(path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], state: dict) -> Path:
    folder = Path(folder)
    partial, current, previous = folder / PARTIAL, folder / CURRENT, folder / PREVIOUS
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    _fsync_write(partial / "tensors.safetensors", lambda p: save_file(tensors, str(p)))
    _fsync_write(partial / "state.json", lambda p: p.write_text(json.dumps(state)))
    # Only set the old checkpoint aside when there is a current one: if a crash left just
    # `checkpoint.old`, it stays until the new checkpoint has landed.
    if current.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(current, previous)
    os.replace(partial, current)
    _fsync_dir(folder)
    shutil.rmtree(previous, ignore_errors=True)
    return current


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def find_checkpoint(folder: Path) -> Path | None:
    for name in (CURRENT, PREVIOUS):
        path = Path(folder) / name
        if (path / "state.json").is_file() and (path / "tensors.safetensors").is_file():
            return path
    return None


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read; the message names it."""


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    try:
        return load_file(str(path / "tensors.safetensors")), json.loads((path / "state.json").read_text())
    except Exception as exc:  # safetensors raises its own error type; report any failure the same way
        raise CheckpointError(f"checkpoint {path} is unreadable ({exc}); remove it to start over") from exc


def split_optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as (tensors, JSON-able rest)."""
    state = optimizer.state_dict()
    tensors, rest = {}, {}
    for index, values in state["state"].items():
        rest[str(index)] = {}
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                rest[str(index)][key] = value
    return tensors, {"state": rest, "param_groups": state["param_groups"]}


def join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state = {int(index): dict(values) for index, values in rest["state"].items()}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def load_for_resume(out: Path, config, resume: bool) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The checkpoint in run folder `out` to continue `config` from (None: start afresh).

    Refuses, with a one-line ConfigError, a folder that holds a run when `resume` is off, an
    unreadable checkpoint, and a checkpoint of another configuration (`config.changed_from`)."""
    from neuroplast.train.config import ConfigError

    found = find_checkpoint(out)
    if found is None:
        return None
    if not resume:
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    try:
        tensors, state = load_checkpoint(found)
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from exc
    changed = config.changed_from(state["config"])
    if changed:
        raise ConfigError(
            f"{out} holds a run with a different configuration (changed: {', '.join(changed)}); use another --out"
        )
    return tensors, state
