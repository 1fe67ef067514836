"""Datasets (MNIST, Fashion-MNIST, CIFAR-10, scikit-learn digits, generated articulated shapes) as
in-memory tensors."""

from neuroplast.data.articulated import (
    ALL_FAMILIES,
    FAMILIES,
    SPLITS,
    FamilyInfo,
    family_info,
    generate,
    joint_permutations,
    joint_symmetries,
    load_articulated,
    visible_joints,
)
from neuroplast.data.dataset import validation_split
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
    "ALL_FAMILIES",
    "DATASETS",
    "FAMILIES",
    "SPLITS",
    "BatchIterator",
    "DataError",
    "Dataset",
    "FamilyInfo",
    "data_root",
    "family_info",
    "generate",
    "is_available_offline",
    "joint_permutations",
    "joint_symmetries",
    "load_articulated",
    "load_dataset",
    "parse_idx",
    "read_cifar10_tarball",
    "validation_split",
    "visible_joints",
]
