"""Datasets (MNIST, Fashion-MNIST, CIFAR-10, scikit-learn digits) as in-memory tensors."""

from neuroplast.data.datasets import (
    DATASETS,
    Dataset,
    is_available_offline,
    load_dataset,
    parse_idx,
    read_cifar10_tarball,
)
from neuroplast.data.loader import BatchIterator
from neuroplast.data.sources import DataError, data_root

__all__ = [
    "DATASETS",
    "BatchIterator",
    "DataError",
    "Dataset",
    "data_root",
    "is_available_offline",
    "load_dataset",
    "parse_idx",
    "read_cifar10_tarball",
]
