"""The in-memory `Dataset`, and how decoded arrays become one: scaled to [0, 1], standardised with
the training set's statistics (per channel, or per feature: `STANDARDIZE`), as tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from neuroplast.data.cache import Stats


@dataclass
class Dataset:
    """A dataset held in memory: standardised images (flattened for MLPs) and integer labels,
    train and test, with the image shape, the number of classes and where the files came from."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    image_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    origin: str  # where the data was read from, for the user's information
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # other targets, e.g. "train_part_masks"

    @property
    def num_features(self) -> int:
        """Inputs per sample: C x H x W."""
        c, h, w = self.image_shape
        return c * h * w


def validation_split(data: Dataset, samples: int) -> Dataset:
    """`data` with its last `samples` training samples as the evaluation split and the rest as
    the training split: the test set is left out entirely, for choosing settings without ever
    scoring on it. Extras named `train_*` are split the same way (their `test_*` counterparts
    become the held-out rows); other extras are kept. The standardisation statistics stay those of
    the whole training set (inputs only, no labels)."""
    n = len(data.y_train)
    if not 0 < samples < n:
        raise ValueError(f"validation {samples!r} must be between 1 and {n - 1} (the training samples are {n})")
    extras = {k: v for k, v in data.extras.items() if not k.startswith(("train_", "test_"))}
    for key, value in data.extras.items():
        if key.startswith("train_"):
            extras[key] = value[:-samples]
            extras["test_" + key[len("train_") :]] = value[-samples:]
    return Dataset(
        f"{data.name} (validation: last {samples} training samples)",
        data.x_train[:-samples],
        data.y_train[:-samples],
        data.x_train[-samples:],
        data.y_train[-samples:],
        data.image_shape,
        data.num_classes,
        data.origin,
        extras,
    )


def reduction_setting() -> str:
    """What the rounding of a float reduction depends on in this process."""
    return f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"


def _as_float(x: np.ndarray) -> torch.Tensor:
    """A float32 copy of `x` (parsed arrays are read-only: torch gets a writable view)."""
    return torch.from_numpy(x if x.flags.writeable else x.copy()).to(torch.float32, copy=True)


# How images are standardised with the training set's statistics: "channel" (one mean and std per
# colour channel; a pixel that never varies becomes a constant, e.g. about -0.81 for an empty
# Fashion-MNIST border pixel) or "feature" (per pixel and channel, as scikit-learn's
# StandardScaler: a pixel that never varies becomes exactly 0).
STANDARDIZE = ("channel", "feature")


def to_dataset(
    name: str,
    arrays: tuple[np.ndarray, ...],
    origin: str,
    flatten: bool,
    stats: Stats | None = None,
    standardize: str = "channel",
) -> Dataset:
    """Scale to [0,1], standardise with train-set statistics (`standardize`: one of
    `STANDARDIZE`), convert to tensors.

    stats: cached statistics by `reduction_setting()` (and standardisation); statistics computed
    here are added to it."""
    if standardize not in STANDARDIZE:
        raise ValueError(f"unknown standardize {standardize!r}; choose from: {', '.join(STANDARDIZE)}")
    x_train, y_train, x_test, y_test = arrays
    if x_train.ndim == 3:  # grayscale: add the channel axis
        x_train, x_test = x_train[:, None], x_test[:, None]
    scale = 255.0 if x_train.dtype == np.uint8 else 1.0
    x_train = _as_float(x_train).div_(scale)
    x_test = _as_float(x_test).div_(scale)
    per_feature = standardize == "feature"
    setting = reduction_setting() + (", per feature" if per_feature else "")
    stat_shape = (1, *x_train.shape[1:]) if per_feature else (1, -1, 1, 1)
    if stats is not None and setting in stats:
        mean, std = (torch.tensor(values, dtype=torch.float32).reshape(stat_shape) for values in stats[setting])
    else:
        dims = (0,) if per_feature else (0, 2, 3)
        mean = x_train.mean(dim=dims, keepdim=True)
        std = x_train.std(dim=dims, keepdim=True)
        # a feature that never varies is only centred (to exactly 0); a constant channel likewise
        std = torch.where(std > 1e-6, std, torch.ones_like(std)) if per_feature else std.clamp_min(1e-6)
        if stats is not None:
            stats[setting] = [mean.flatten().tolist(), std.flatten().tolist()]
    x_train = x_train.sub_(mean).div_(std)
    x_test = x_test.sub_(mean).div_(std)
    shape = tuple(x_train.shape[1:])
    if flatten:
        x_train, x_test = x_train.flatten(1), x_test.flatten(1)
    y_train = torch.as_tensor(np.asarray(y_train, dtype=np.int64))
    y_test = torch.as_tensor(np.asarray(y_test, dtype=np.int64))
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    return Dataset(name, x_train, y_train, x_test, y_test, shape, num_classes, origin)
