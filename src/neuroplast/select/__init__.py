"""Feature selection by sparse training (QuickSelection, WAST, DAST, NeuroFS-style), baselines
(scikit-learn, LassoNet), a scikit-learn selector and the evaluation protocol."""

from neuroplast.select import sparse_training  # noqa: F401  (registers the sparse-training methods)
from neuroplast.select.methods import (
    METHODS,
    Method,
    Selection,
    SelectionError,
    register_method,
    select_features,
)
from neuroplast.select.selector import SparseFeatureSelector

__all__ = [
    "METHODS",
    "Method",
    "Selection",
    "SelectionError",
    "SparseFeatureSelector",
    "register_method",
    "select_features",
]
