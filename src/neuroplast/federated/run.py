"""A semi-decentralized run: rounds, metrics every `eval_every` rounds, atomic checkpoints, resume.

The run folder is like `train`'s: `config.toml`, `metrics.jsonl` (one JSON object per
evaluation round), `summary.json`, `partition.json` (the split's diagnostics) and `checkpoint/`
(X and the byte counters). Only rank 0 writes; under the distributed engine the other ranks
compute their devices' share of every metric.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from neuroplast.data import Dataset, load_dataset
from neuroplast.federated.comm import LocalComm
from neuroplast.federated.config import FederatedConfig
from neuroplast.federated.simulator import Federation
from neuroplast.federated.sparse import SparseFederation
from neuroplast.train.checkpoint import load_for_resume, save_checkpoint
from neuroplast.train.config import ConfigError
from neuroplast.train.trainer import progress_bar, read_metrics, resolve_device, write_atomic

Log = Callable[[str], None] | None


def _restore(fed: Federation, out: Path | None, config: FederatedConfig, resume: bool, log: Log) -> tuple[int, float]:
    """Load the checkpoint of `out` into `fed` (every rank); return (rounds done, seconds so far)."""
    flag = torch.tensor([0.0, 0.0])
    state = None
    loaded = load_for_resume(out, config, resume) if out is not None and fed.comm.rank == 0 else None
    if loaded is not None:
        tensors, state = loaded
        flag = torch.tensor([1.0, float(state["round"])])
    flag = fed.comm.broadcast(flag)
    if flag[0] == 0:
        return 0, 0.0
    rows = {}
    for name, mine in fed.row_state().items():
        full = tensors[name] if fed.comm.rank == 0 else torch.empty(fed.config.devices, *mine.shape[1:])
        rows[name] = fed.comm.broadcast(full.to(mine))
    fed.load_row_state(rows)
    keys = [*fed.byte_counters(), "seconds"]
    counters = torch.zeros(len(keys), dtype=torch.float64)
    if state is not None:
        counters = torch.tensor([state[k] for k in keys], dtype=torch.float64)
    counters = fed.comm.broadcast(counters)
    fed.set_byte_counters({k: int(v) for k, v in zip(keys[:-1], counters[:-1].tolist())})
    if log and fed.comm.rank == 0:
        log(f"resuming {out} after round {int(flag[1])}")
    return int(flag[1]), float(counters[-1])


def federate(
    config: FederatedConfig,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Log = print,
    comm=None,
    dataset: Dataset | None = None,
    on_round: Callable[[int], None] | None = None,
) -> dict:
    """Run `config` for all its rounds (or the rest, with `resume`); return the summary.

    on_round(r) is called after round r (1-based) is done and, if due, checkpointed.
    """
    config = config.validate()
    comm = comm or LocalComm()
    main = comm.rank == 0
    out = Path(out) if out is not None else None
    if out is not None and main:
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {str(out)!r} is a file, not a folder")
        out.mkdir(parents=True, exist_ok=True)
    data = dataset or load_dataset(config.dataset, progress=progress and main)
    kind = SparseFederation if config.sparse else Federation
    fed = kind(config, data, comm, resolve_device(config.device))
    done, seconds = _restore(fed, out, config, resume, log)
    if done == 0:
        diagnostics = fed.heterogeneity()
        if main:
            _describe(config, data, fed, diagnostics, log)
            if out is not None:
                write_atomic(out / "partition.json", json.dumps(diagnostics))
    history = []
    if out is not None and main:
        history = [r for r in read_metrics(out / "metrics.jsonl") if r["round"] <= done]
        write_atomic(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
        (out / "config.toml").write_text(config.to_toml())
    bar = progress_bar(progress and main, remaining=True)
    task = bar.add_task("rounds", total=config.rounds, completed=done, info="") if bar else None
    if bar:
        bar.start()
    try:
        for r in range(done, config.rounds):
            start = time.perf_counter()
            fed.round(r)
            finished = r + 1
            last = finished == config.rounds
            if finished % config.eval_every == 0 or last:
                metrics = fed.evaluate()
                seconds += time.perf_counter() - start
                record = {
                    "round": finished,
                    **asdict(metrics),
                    **fed.byte_counters(),
                    "server_round": fed.is_server_round(r),
                    "seconds": seconds,
                }
                if main:
                    history.append(record)
                    if out is not None:
                        with open(out / "metrics.jsonl", "a") as f:
                            f.write(json.dumps(record) + "\n")
                    if bar:
                        bar.update(
                            task,
                            info=f"avg {100 * metrics.avg_test_accuracy:.2f}%  local {100 * metrics.local_test_accuracy:.2f}%",
                        )
            else:
                seconds += time.perf_counter() - start
            if out is not None and (finished % config.checkpoint_every == 0 or last):
                rows = {name: comm.gather_rows(t) for name, t in fed.row_state().items()}
                if main:
                    state = {"config": asdict(config), "round": finished, **fed.byte_counters(), "seconds": seconds}
                    save_checkpoint(out, rows, state)
            if bar:
                bar.update(task, completed=finished)
            if on_round is not None:
                on_round(finished)
    finally:
        if bar:
            bar.stop()
    sent = torch.zeros(comm.world, dtype=torch.float64)
    sent[comm.rank] = comm.bytes_sent
    sent = comm.all_reduce(sent)
    summary = {
        "config": asdict(config),
        "dataset_origin": data.origin,
        "rounds": config.rounds,
        "parameters": fed.parameters,
        "final": history[-1] if history else None,
        "best_avg_test_accuracy": max((r["avg_test_accuracy"] for r in history), default=None),
        "seconds": seconds,
        "processes": comm.world,
        "bytes_sent_per_process": [int(b) for b in sent.tolist()],  # handed to collectives, this session
    }
    if config.sparse:
        summary["sparse"] = fed.describe_sparsity()
    if config.sparse and comm.world > 1:
        # device-to-device and device-to-server messages as the engine handed them over, this session:
        # [d2d between processes, d2s between processes, d2d within a process, d2s within a process]
        handed = torch.zeros(comm.world, 4, dtype=torch.float64)
        handed[comm.rank] = torch.tensor(comm.message_bytes, dtype=torch.float64)
        summary["message_bytes_per_process"] = [[int(b) for b in row] for row in comm.all_reduce(handed).tolist()]
    if out is not None and main:
        write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    if log and main and history:
        final = history[-1]
        log(
            f"round {final['round']}: average model {100 * final['avg_test_accuracy']:.2f}%, devices on the global "
            f"test set {100 * final['device_test_accuracy']:.2f}%, on their local test sets "
            f"{100 * final['local_test_accuracy']:.2f}%  ({seconds:.1f}s)"
        )
    return summary


def _describe(config: FederatedConfig, data: Dataset, fed: Federation, diagnostics: dict, log: Log) -> None:
    if not log:
        return
    sizes = diagnostics["device_train_sizes"]
    log(
        f"{config.algorithm} on {data.name} ({data.origin}): {config.model} ({fed.parameters:,} parameters), "
        f"{config.devices} devices in {config.components} components, topology {config.topology if config.uses_d2d else 'none'}"
        + (f", K={config.sampled} every H={config.period} rounds" if config.uses_server else "")
    )
    log(
        f"split: α_inter {config.alpha_inter:g}, α_intra {config.alpha_intra:g}; device training sizes "
        f"{min(sizes)}..{max(sizes)} ({diagnostics['partition_draws']} draw(s)); "
        f"ζ²_inter {diagnostics['zeta2_inter']:.4g}, ζ²_intra {diagnostics['zeta2_intra']:.4g} at the initial model"
    )
    for k, row in enumerate(diagnostics["component_label_histograms"]):
        log(f"  component {k} labels: {' '.join(str(v) for v in row)}")
    if config.sparse:
        sparse = fed.describe_sparsity()
        who = "each device" if config.masks == "per-device" else "the server"
        log(
            f"sparse devices: density {config.density:g} ({config.sparse_distribution}), {config.masks} masks rewired "
            f"by {who} with {config.dst_method}; one model on the wire {sparse['model_bytes']:,} B "
            f"({sparse['index_encoding']} indices) against {sparse['dense_model_bytes']:,} B dense"
        )
    if diagnostics["spectral_gaps"] is not None:
        log("  spectral gap p per component: " + ", ".join(f"{p:.4f}" for p in diagnostics["spectral_gaps"]))
