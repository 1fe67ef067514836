"""A scikit-learn selector over every selection method, usable in a `Pipeline`."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.feature_selection import SelectorMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from neuroplast.select.methods import METHODS, select_features


class SparseFeatureSelector(SelectorMixin, BaseEstimator):
    """Keep the `k` features a selection method ranks highest.

    Args:
        method: one of `neuroplast.select.METHODS` (e.g. "wast", "quickselection", "dast",
            "neurofs", "anova", "lassonet").
        k: features kept, in 1..n_features-1.
        seed: drives every random draw of the method.
        options: the method's own settings, e.g. {"epochs": 5}.

    After `fit`: `ranking_` (every feature, best first), `scores_`, `seconds_` (selection time),
    `n_features_in_`. `transform` keeps the selected columns in their original order;
    `get_support()` is their boolean mask.

    Example:
        `make_pipeline(SparseFeatureSelector("wast", k=50), SVC()).fit(x, y)`
    """

    def __init__(self, method: str = "wast", k: int = 50, seed: int = 0, options: dict | None = None):
        self.method = method
        self.k = k
        self.seed = seed
        self.options = options

    def fit(self, X, y=None) -> SparseFeatureSelector:
        """Rank the features of `X` (labels `y` for the supervised methods)."""
        supervised = self.method in METHODS and METHODS[self.method].supervised
        if supervised or y is not None:
            X, y = validate_data(self, X, y, dtype=np.float64)
        else:
            X = validate_data(self, X, dtype=np.float64)
        selection = select_features(X, y, self.method, self.k, self.seed, **(self.options or {}))
        self.ranking_, self.scores_, self.seconds_ = selection.ranking, selection.scores, selection.seconds
        return self

    def _get_support_mask(self) -> np.ndarray:
        check_is_fitted(self, "ranking_")
        mask = np.zeros(self.n_features_in_, dtype=bool)
        mask[self.ranking_[: self.k]] = True
        return mask

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = bool(self.method in METHODS and METHODS[self.method].supervised)
        return tags
