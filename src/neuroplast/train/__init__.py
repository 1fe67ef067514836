"""Training: configuration, the Trainer loop, metrics, checkpoint/resume."""

from neuroplast.train.config import ConfigError, RunConfig, load_toml
from neuroplast.train.trainer import Run, evaluate, train

__all__ = ["ConfigError", "Run", "RunConfig", "evaluate", "load_toml", "train"]
