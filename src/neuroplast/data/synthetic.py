"""Generated feature-selection tasks where the answer is known.

- `synthetic`: scikit-learn's `make_classification` with its informative, redundant and noise
  columns shuffled to random positions; `Dataset.extras["informative"]` holds the positions of
  the informative columns (and `extras["redundant"]` those of their linear combinations).
- `fashion-mnist-noise`: Fashion-MNIST (flattened, 784 pixels) with as many pure-noise columns,
  N(0, 1) like a standardised pixel, appended after the pixels; `extras["informative"]` holds the
  pixel positions 0..783, `extras["noise"]` the appended ones.

Both are standardised per feature with the training split's statistics (a column that never
varies becomes 0): feature selection compares columns, so each gets unit variance.
"""

from __future__ import annotations

import numpy as np
import torch

from neuroplast.data.dataset import Dataset
from neuroplast.data.sources import DataError

SYNTHETIC_DEFAULTS = {
    "samples": 6000,
    "test_fraction": 0.25,
    "features": 500,
    "informative": 20,
    "redundant": 0,
    "classes": 2,
    "class_sep": 1.0,
    "seed": 0,
}
NOISE_DEFAULTS = {"noise_features": 784, "seed": 0}


def check_options(kind: str, options: dict, defaults: dict) -> dict:
    """`defaults` updated with `options`, every key known and every value a number."""
    for key, value in options.items():
        if key not in defaults:
            raise DataError(f"unknown {kind} option {key!r}; choose from: {', '.join(defaults)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataError(f"{kind} option {key} must be a number, not {value!r}")
    return {**defaults, **options}


def standardise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature standardisation with the training split's mean and std (a constant column -> 0)."""
    mean = x_train.mean(0)
    std = x_train.std(0)
    std[std == 0] = 1.0
    return (x_train - mean) / std, (x_test - mean) / std


def _tabular(name: str, x_train, y_train, x_test, y_test, origin: str, extras: dict) -> Dataset:
    x_train, x_test = standardise(x_train.astype(np.float64), x_test.astype(np.float64))
    classes = int(max(y_train.max(), y_test.max())) + 1
    return Dataset(
        name,
        torch.as_tensor(x_train, dtype=torch.float32),
        torch.as_tensor(y_train, dtype=torch.int64),
        torch.as_tensor(x_test, dtype=torch.float32),
        torch.as_tensor(y_test, dtype=torch.int64),
        (1, 1, x_train.shape[1]),
        classes,
        origin,
        {key: torch.as_tensor(value, dtype=torch.int64) for key, value in extras.items()},
    )


def make_synthetic(**options) -> Dataset:
    """A `make_classification` task with known informative columns (options: `SYNTHETIC_DEFAULTS`).

    The informative columns (and the redundant ones, linear combinations of them) are placed at
    positions drawn with the seed; the rest are N(0, 1) noise."""
    o = check_options("synthetic", options, SYNTHETIC_DEFAULTS)
    features, informative, redundant = int(o["features"]), int(o["informative"]), int(o["redundant"])
    if informative < 1 or informative + redundant > features:
        raise DataError(
            f"synthetic: informative ({informative}) + redundant ({redundant}) must be in 1..features ({features})"
        )
    if not 0.0 < o["test_fraction"] < 1.0:
        raise DataError(f"synthetic test_fraction {o['test_fraction']!r} must be in (0, 1)")
    from sklearn.datasets import make_classification

    seed = int(o["seed"])
    x, y = make_classification(
        n_samples=int(o["samples"]),
        n_features=features,
        n_informative=informative,
        n_redundant=redundant,
        n_repeated=0,
        n_classes=int(o["classes"]),
        class_sep=float(o["class_sep"]),
        shuffle=False,  # columns: informative, redundant, noise; permuted below with known positions
        random_state=seed,
    )
    rng = np.random.default_rng(seed)
    order = rng.permutation(features)  # new column j holds old column order[j]
    position = np.argsort(order)  # old column c sits at new position position[c]
    x = x[:, order]
    rows = rng.permutation(len(x))
    n_test = int(round(o["test_fraction"] * len(x)))
    test, train = rows[:n_test], rows[n_test:]
    extras = {
        "informative": np.sort(position[:informative]),
        "redundant": np.sort(position[informative : informative + redundant]),
    }
    return _tabular("synthetic", x[train], y[train], x[test], y[test], "scikit-learn make_classification", extras)


def with_noise_features(images: Dataset, **options) -> Dataset:
    """`images` flattened, with `noise_features` N(0, 1) columns appended (options: `NOISE_DEFAULTS`)."""
    o = check_options("noise", options, NOISE_DEFAULTS)
    count = int(o["noise_features"])
    if count < 1:
        raise DataError(f"noise_features {count!r} must be a positive integer")
    generator = torch.Generator().manual_seed(int(o["seed"]))
    pixels = images.num_features
    x_train, x_test = images.x_train.flatten(1), images.x_test.flatten(1)
    noise_train = torch.randn(len(x_train), count, generator=generator)
    noise_test = torch.randn(len(x_test), count, generator=generator)
    extras = {"informative": np.arange(pixels), "noise": np.arange(pixels, pixels + count)}
    return _tabular(
        f"{images.name}-noise",
        torch.cat([x_train, noise_train], 1).numpy(),
        images.y_train.numpy(),
        torch.cat([x_test, noise_test], 1).numpy(),
        images.y_test.numpy(),
        f"{images.origin} + {count} N(0, 1) noise columns",
        extras,
    )
