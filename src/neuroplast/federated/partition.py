"""Two-level Dirichlet split of a labelled set over n devices in C components.

1. Across components: for each class c, q_c ~ Dir(α_inter · 1_C) splits the shuffled class-c
   samples over the C components.
2. Within component k: for each class c, r_kc ~ Dir(α_intra · 1_m) splits component k's class-c
   samples over its m devices.
3. Redrawn until every device holds at least `min_size` samples; deterministic given the seed.

A split of counts by proportions takes the floor and hands the remainder out by largest
fractional part, so every sample lands on exactly one device. Each device's part is then cut
into its own training part and its own local test part (same label skew), as the authors'
earlier code does: a device is scored on data that looks like its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neuroplast.train.config import ConfigError

MAX_TRIES = 1000


class PartitionError(ConfigError):
    """A split that cannot be made; the message names the bad value and the valid range."""


def split_counts(total: int, proportions: np.ndarray) -> np.ndarray:
    """Integer counts summing to `total`, proportional to `proportions` (largest remainder)."""
    exact = proportions / proportions.sum() * total
    counts = np.floor(exact).astype(np.int64)
    remainder = total - int(counts.sum())
    if remainder:
        order = np.argsort(-(exact - counts), kind="stable")
        counts[order[:remainder]] += 1
    return counts


def _split(indices: np.ndarray, proportions: np.ndarray) -> list[np.ndarray]:
    return np.split(indices, np.cumsum(split_counts(len(indices), proportions))[:-1])


@dataclass
class Partition:
    train: list[np.ndarray]  # per device: indices into the training set
    local_test: list[np.ndarray]  # per device: indices into the training set, held out
    components: int
    tries: int  # draws until every device met min_size

    @property
    def devices(self) -> int:
        return len(self.train)

    def component_histograms(self, labels: np.ndarray, num_classes: int) -> np.ndarray:
        """(C, num_classes) label counts of each component's training parts."""
        m = self.devices // self.components
        hist = np.zeros((self.components, num_classes), dtype=np.int64)
        for device, idx in enumerate(self.train):
            hist[device // m] += np.bincount(labels[idx], minlength=num_classes)
        return hist


def two_level_dirichlet(
    labels: np.ndarray,
    devices: int,
    components: int,
    alpha_inter: float,
    alpha_intra: float,
    min_size: int = 10,
    seed: int = 0,
    local_test_fraction: float = 0.2,
) -> Partition:
    """Split sample indices 0..len(labels)-1 over `devices` in `components` (see module doc).

    `min_size` counts a device's samples before the local test part is cut off.
    """
    labels = np.asarray(labels)
    if components < 1 or devices < 1 or devices % components:
        raise PartitionError(f"devices {devices} are not divisible into {components} equal components")
    for name, alpha in (("alpha_inter", alpha_inter), ("alpha_intra", alpha_intra)):
        if not alpha > 0:
            raise PartitionError(f"{name} {alpha!r} must be > 0 (small: skewed labels, large: IID)")
    if not 0.0 <= local_test_fraction < 1.0:
        raise PartitionError(f"local_test_fraction {local_test_fraction!r} must be in [0, 1)")
    if min_size < 1:
        raise PartitionError(f"min_size {min_size!r} must be a positive integer")
    if min_size * devices > len(labels):
        raise PartitionError(
            f"min_size {min_size} x {devices} devices needs {min_size * devices} samples but the dataset has "
            f"{len(labels)}; choose min_size <= {len(labels) // devices}"
        )
    m = devices // components
    classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    attempt = 0
    while attempt < MAX_TRIES:
        attempt += 1
        parts: list[list[np.ndarray]] = [[] for _ in range(devices)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            for k, comp_idx in enumerate(_split(idx, rng.dirichlet(np.full(components, alpha_inter)))):
                for j, dev_idx in enumerate(_split(comp_idx, rng.dirichlet(np.full(m, alpha_intra)))):
                    parts[k * m + j].append(dev_idx)
        merged = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in merged) >= min_size:
            break
    if min(len(p) for p in merged) < min_size:
        raise PartitionError(
            f"no split in {MAX_TRIES} draws gave every device min_size {min_size} samples; "
            "lower min_size or raise alpha_inter / alpha_intra"
        )
    train, local_test = [], []
    for device, idx in enumerate(merged):
        shuffled = np.random.default_rng([seed, device]).permutation(idx)
        n_test = min(int(round(local_test_fraction * len(idx))), len(idx) - 1)  # keep a training sample
        local_test.append(np.sort(shuffled[:n_test]))
        train.append(np.sort(shuffled[n_test:]))
    return Partition(train, local_test, components, attempt)
