"""The training loop: data, model, sparsity, DST engine, optimizer; metrics and checkpoints.

`train(config, out)` runs one configuration and writes into `out`:
config.toml, metrics.jsonl (one JSON object per epoch), summary.json and `checkpoint/`.
With `resume=True` it continues from the last checkpoint in `out` and ends with the same
metrics as an uninterrupted run of the same seed.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from neuroplast.data import BatchIterator, Dataset, load_dataset, validation_split
from neuroplast.dst import DSTEngine, preset
from neuroplast.models import build_model
from neuroplast.sparse import Topology, select_layers, sparsify
from neuroplast.train.checkpoint import (
    join_optimizer_state,
    load_for_resume,
    save_checkpoint,
    split_optimizer_state,
)
from neuroplast.train.config import ConfigError, RunConfig

EpochCallback = Callable[[dict], None]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_for(config: RunConfig, image_shape: tuple[int, int, int], num_classes: int, joints: int = 0) -> nn.Module:
    """The model a run config describes, for images of `image_shape` (ValueError if it cannot be
    built for them, e.g. a patch size or MoBA block that does not fit)."""
    attention = dict(
        patch_size=config.patch_size,
        dim=config.vit_dim,
        depth=config.vit_depth,
        heads=config.vit_heads,
        block_size=config.block_size,
        top_k=config.top_k,
    )
    vit = dict(
        attention,
        attention=config.attention,
        own_block=config.own_block,
        full_layers=config.full_layers,
        key_conv=config.key_conv,
        routing=config.routing,
    )
    parts = dict(attention, parts=config.parts, iterations=config.part_iterations, joints=joints)
    if config.model == "parts":  # moba-parts is MoBA by definition
        parts["attention"] = config.attention
    return build_model(
        config.model,
        image_shape,
        num_classes,
        config.hidden,
        config.dropout,
        vit,
        cnn_hidden=config.cnn_hidden,
        parts=parts,
    )


def supervision_targets(config: RunConfig, data: Dataset) -> dict[str, torch.Tensor]:
    """The training targets beyond the label that the config asks the model to learn."""
    targets = {}
    if config.part_supervision:
        targets["part_masks"] = data.extras["train_part_masks"]
    if config.joint_head:
        from neuroplast.data.articulated import joint_permutations, visible_joints

        # only the joints an image shows, each up to the relabellings it cannot tell apart
        families = config.families()
        targets["joint_angles"] = data.extras["train_joint_angles"]
        targets["joint_valid"] = visible_joints(data.extras["train_joint_valid"], data.y_train, families)
        targets["joint_perms"] = joint_permutations(families)[data.y_train]
    return targets


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available; choose from: cpu, auto")
    return torch.device(name)


def build_optimizer(config: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.nesterov and config.momentum > 0,
            weight_decay=config.weight_decay,
        )
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def build_lr_schedule(config: RunConfig, optimizer: torch.optim.Optimizer):
    """Stepped once per epoch."""
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    if config.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_step_size, gamma=config.lr_gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


def layer_report(model: nn.Module, topology: Topology | None) -> list[dict]:
    """Per-layer name, density, nnz of the sparse layers (all Linear/Conv2d layers when dense)."""
    if topology is not None:
        return [{"name": s.name, "density": s.density, "nnz": s.nnz} for s in topology.stats()]
    return [{"name": name, "density": 1.0, "nnz": m.weight.numel()} for name, m in select_layers(model).items()]


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The autocast context of a run's precision (a no-op for float32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
    batch_size: int = 1000,
    precision: str = "float32",
):
    model.eval()
    loss_sum, correct = 0.0, 0
    for xb, yb in BatchIterator(x, y, batch_size):
        xb, yb = xb.to(device), yb.to(device)
        with autocast(device, precision):
            logits = model(xb)
        loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum").item()
        correct += int((logits.argmax(1) == yb).sum())
    return loss_sum / len(y), correct / len(y)


class Run:
    """Everything a training run holds; built from a config, saved to and restored from a checkpoint."""

    def __init__(self, config: RunConfig, dataset: Dataset | None = None):
        config.validate()
        self.config = config
        self.device = resolve_device(config.device)
        seed_everything(config.seed)
        self.data = dataset or load_dataset(config.dataset, flatten=config.model == "mlp", **config.dataset_options())
        if config.validation:
            try:
                self.data = validation_split(self.data, config.validation)
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
        joints = self.data.extras["train_joint_angles"].shape[1] if config.joint_head else 0
        try:
            self.model = model_for(config, self.data.image_shape, self.data.num_classes, joints).to(self.device)
        except ValueError as exc:  # e.g. a patch size or MoBA block that does not fit the images
            raise ConfigError(str(exc)) from exc
        self.topology: Topology | None = None
        if config.method != "dense":
            try:
                self.topology = self._sparsify()
            except ValueError as exc:  # e.g. every layer kept dense by --dense-first/--dense-last
                raise ConfigError(str(exc)) from exc
        self.optimizer = build_optimizer(config, self.model)
        self.lr_schedule = build_lr_schedule(config, self.optimizer)
        self.shuffle = torch.Generator().manual_seed(config.seed + 1)
        # targets beyond the label (part masks, joint angles) travel as row indices into these
        self.targets = supervision_targets(config, self.data)
        labels = torch.arange(len(self.data.y_train)) if self.targets else self.data.y_train
        self.batches = BatchIterator(self.data.x_train, labels, config.batch_size, True, self.shuffle)
        self.engine: DSTEngine | None = None
        if self.topology is not None:
            self.topology.attach(self.optimizer)
            steps_per_epoch = len(self.batches)
            try:
                algorithm = preset(config.method, **config.dst)
                self.engine = DSTEngine(
                    self.topology, algorithm, config.epochs * steps_per_epoch, steps_per_epoch, seed=config.seed
                )
            except ValueError as exc:  # a knob out of range, or a method the backend cannot run
                raise ConfigError(str(exc)) from exc
        self.epoch = 0
        self.seconds = 0.0
        self.best_accuracy = 0.0

    def _sparsify(self) -> Topology:
        config = self.config
        return sparsify(
            self.model,
            density=config.density,
            distribution=config.distribution,
            dense_first=config.dense_first,
            dense_last=config.dense_last,
            epsilon=config.epsilon,
            backend=config.backend,
            generator=torch.Generator().manual_seed(config.seed),
        )

    # -- one epoch -------------------------------------------------------------------------------
    def train_epoch(self, progress=None) -> tuple[float, float]:
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        seen = 0
        task = None
        if progress is not None:
            task = progress.add_task(f"epoch {self.epoch + 1}/{self.config.epochs}", total=len(self.batches), info="")
        for i, (xb, yb) in enumerate(self.batches):
            targets = None
            if self.targets:
                targets = {key: value[yb].to(self.device) for key, value in self.targets.items()}
                yb = self.data.y_train[yb]
            xb, yb = xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)
            with autocast(self.device, self.config.precision):
                if hasattr(self.model, "training_loss"):  # models with objectives of their own
                    loss, logits = self.model.training_loss(xb, yb, targets)
                else:
                    logits = self.model(xb)
                    loss = F.cross_entropy(logits, yb)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            # free this step's graph before a topology update: a truly sparse layer whose live
            # count changes (growth shared across layers) must not meet it again
            loss, logits = loss.detach(), logits.detach()
            if self.engine is not None:
                self.engine.step()
            loss_sum += loss.detach() * len(yb)
            correct += (logits.detach().argmax(1) == yb).sum()
            seen += len(yb)
            if task is not None and (i % 20 == 0 or i == len(self.batches) - 1):
                progress.update(
                    task,
                    completed=i + 1,
                    info=f"loss {loss_sum.item() / seen:.4f}  acc {correct.item() / seen:.4f}  density {self.density():.4f}",
                    refresh=i == 0,  # drawn from an epoch's first batch, however short the epoch
                )
        if task is not None:
            progress.remove_task(task)
        self.lr_schedule.step()
        if self.engine is not None:
            self.engine.observe_epoch(correct.item() / seen)  # training accuracy: never a test score
        return loss_sum.item() / seen, correct.item() / seen

    def density(self) -> float:
        return self.topology.density() if self.topology is not None else 1.0

    def r_s(self) -> float:
        return self.topology.r_s() if self.topology is not None else 1.0

    def metrics(self, train_loss, train_acc, test_loss, test_acc, seconds, train_seconds, updates) -> dict:
        return {
            "epoch": self.epoch,
            "train_loss": train_loss,
            "train_accuracy": train_acc,
            "test_loss": test_loss,
            "test_accuracy": test_acc,
            "density": self.density(),
            "layers": layer_report(self.model, self.topology),
            "r_s": self.r_s(),
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": seconds,
            "train_seconds": train_seconds,
            "updates": updates,
        }

    # -- checkpoint ------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        optim_tensors, optim_rest = split_optimizer_state(self.optimizer)
        tensors.update(optim_tensors)
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.shuffle"] = self.shuffle.get_state()
        state = {
            "epoch": self.epoch,
            "seconds": self.seconds,
            "best_accuracy": self.best_accuracy,
            "config": asdict(self.config),
            "optimizer": optim_rest,
            "lr_schedule": self.lr_schedule.state_dict(),
            "rng_python": _jsonable(random.getstate()),
            "rng_numpy": _jsonable(np.random.get_state()),
        }
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        if self.engine is not None:
            engine_state = self.engine.state_dict()
            tensors["rng.engine"] = engine_state.pop("generator")
            tensors.update({f"engine.{k}": v for k, v in engine_state.pop("tensors").items()})
            state["engine"] = engine_state
        return tensors, state

    def restore(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.optimizer.load_state_dict(join_optimizer_state(tensors, state["optimizer"]))
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        self.shuffle.set_state(tensors["rng.shuffle"])
        random.setstate(_tuples(state["rng_python"]))
        np.random.set_state(_numpy_state(state["rng_numpy"]))
        if self.engine is not None:
            engine_tensors = {k[7:]: v for k, v in tensors.items() if k.startswith("engine.")}
            self.engine.load_state_dict(
                {**state["engine"], "generator": tensors["rng.engine"], "tensors": engine_tensors}
            )
        self.epoch = state["epoch"]
        self.seconds = state["seconds"]
        self.best_accuracy = state["best_accuracy"]


def _jsonable(value):
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _numpy_state(value):
    kind, keys, pos, has_gauss, cached = value
    return kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached


def progress_bar(enabled: bool, remaining: bool = False):
    """A transient rich bar: description, bar, done/total, elapsed (and remaining) time, and an
    `info` field for the latest metrics; None when disabled."""
    if not enabled:
        return None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    if remaining:
        columns.append(TimeRemainingColumn())
    return Progress(*columns, TextColumn("{task.fields[info]}"), transient=True)


def train(
    config: RunConfig,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    on_epoch_end: EpochCallback | None = None,
    dataset: Dataset | None = None,
) -> dict:
    """Train one configuration; return the summary (also written to `out/summary.json`).

    on_epoch_end(metrics) is called after each epoch's checkpoint is written (e.g. a
    `neuroplast.train.tensorboard.TensorBoardLog`, which `--log tensorboard` passes).
    """
    run = Run(config, dataset)
    out = Path(out) if out is not None else None
    if out is not None:
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {str(out)!r} is a file, not a folder")
        out.mkdir(parents=True, exist_ok=True)
        loaded = load_for_resume(out, config, resume)
        if loaded is not None:
            tensors, state = loaded
            run.restore(tensors, state)
            if log:
                log(f"resuming {out} after epoch {run.epoch}")
        _truncate_metrics(out / "metrics.jsonl", run.epoch)
        (out / "config.toml").write_text(config.to_toml())
    history = read_metrics(out / "metrics.jsonl") if out is not None else []
    if log and run.epoch == 0:
        log(f"{config.method} on {run.data.name} ({run.data.origin}): {config.model}, density {run.density():.4f}")
    split = "val" if config.validation else "test"  # the evaluation split's name in the log
    bar = progress_bar(progress)
    if bar is not None:
        bar.start()
    try:
        while run.epoch < config.epochs:
            start = time.perf_counter()
            updates_before = len(run.engine.history) if run.engine else 0
            train_loss, train_acc = run.train_epoch(bar)
            train_seconds = time.perf_counter() - start
            test_loss, test_acc = evaluate(
                run.model, run.data.x_test, run.data.y_test, run.device, precision=config.precision
            )
            seconds = time.perf_counter() - start
            run.epoch += 1
            run.seconds += seconds
            run.best_accuracy = max(run.best_accuracy, test_acc)
            updates = [asdict(r) for r in run.engine.history[updates_before:]] if run.engine else []
            record = run.metrics(train_loss, train_acc, test_loss, test_acc, seconds, train_seconds, updates)
            history.append(record)
            if out is not None:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                save_checkpoint(out, *run.state())
            if log:
                log(
                    f"epoch {run.epoch:>3}/{config.epochs}  train_loss {train_loss:.4f}  {split}_loss {test_loss:.4f}  "
                    f"{split}_acc {test_acc:.4f}  density {record['density']:.4f}  r_s {record['r_s']:.3f}  {seconds:.1f}s"
                )
            if on_epoch_end is not None:
                on_epoch_end(record)
    finally:
        if bar is not None:
            bar.stop()
    summary = {
        "config": asdict(config),
        "dataset_origin": run.data.origin,
        "final_test_accuracy": history[-1]["test_accuracy"] if history else None,
        "best_test_accuracy": max((r["test_accuracy"] for r in history), default=None),
        "final_density": run.density(),
        "final_r_s": run.r_s(),
        "epochs": run.epoch,
        "seconds": run.seconds,
    }
    if out is not None:
        write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def read_metrics(path: Path) -> list[dict]:
    """The records of `metrics.jsonl`; a last line cut off by a crash mid-append is ignored."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ConfigError(f"{path} line {i + 1} is not JSON; the run folder is damaged") from None
    return records


def _truncate_metrics(path: Path, epoch: int) -> None:
    """Keep only the records of epochs the checkpoint covers (a crash may have left one more)."""
    kept = [r for r in read_metrics(path) if r["epoch"] <= epoch]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
