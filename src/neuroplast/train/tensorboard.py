"""TensorBoard scalars of a run, beside its `metrics.jsonl` (the optional extra `tensorboard`).

Each epoch's record becomes scalars at step = epoch: its numbers (losses, accuracies, density,
R_s, learning rate, seconds) under their own names, and each sparse layer's density under
`layer_density/<layer>`. A resumed run appends to the same folder, which TensorBoard reads as one
run.
"""

from __future__ import annotations

from pathlib import Path

from neuroplast.train.config import ConfigError

INSTALL = 'pip install "neuroplast[tensorboard]"'


class TensorBoardLog:
    """Writes each epoch's metrics record to TensorBoard event files in `folder` (from the first
    record on: a run that fails to start leaves no event file). Pass it to `train` as
    `on_epoch_end`, and close it after."""

    def __init__(self, folder: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(f"--log tensorboard needs TensorBoard, which is not installed: {INSTALL}") from None
        self.folder = Path(folder)
        self.summary_writer = SummaryWriter
        self.writer = None

    def __call__(self, record: dict) -> None:
        """Write one metrics record (a line of metrics.jsonl) as scalars at step = its epoch."""
        if self.writer is None:
            self.writer = self.summary_writer(log_dir=str(self.folder))
        step = record["epoch"]
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
        for layer in record.get("layers", []):
            self.writer.add_scalar(f"layer_density/{layer['name']}", layer["density"], step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
