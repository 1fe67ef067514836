"""Feature-selection methods by name: each a function `(x, y, k, seed, **options) -> scores`, one
score per feature, higher = more important. The sparse-training methods live in
`select/sparse_training.py`; the baselines (scikit-learn, LassoNet) here.

`select_features` is the entry point: it checks the input, standardises every feature with the
statistics of the data it is given (a constant column becomes 0), calls the method, and ranks.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from neuroplast.train.config import ConfigError

Scorer = Callable[..., np.ndarray]


class SelectionError(ConfigError):
    """Bad input to a feature selection; the message names the bad value and the valid range or choices."""


@dataclass(frozen=True)
class Method:
    """A registered selection method: its scoring function and whether it needs labels."""

    name: str
    score: Scorer
    supervised: bool
    summary: str

    @property
    def options(self) -> list[str]:
        """The keyword options its scoring function takes (beyond x, y, k, seed)."""
        return [p for p in inspect.signature(self.score).parameters if p not in ("x", "y", "k", "seed")]


METHODS: dict[str, Method] = {}


def register_method(name: str, supervised: bool, summary: str) -> Callable[[Scorer], Scorer]:
    """Function decorator: make a scoring function `(x, y, k, seed, **options) -> scores` a
    selection method known by `name`."""

    def register(score: Scorer) -> Scorer:
        METHODS[name] = Method(name, score, supervised, summary)
        return score

    return register


@dataclass
class Selection:
    """A ranking of the features: `ranking[:k]` are the k selected, best first."""

    method: str
    ranking: np.ndarray  # every feature index, most important first
    scores: np.ndarray  # the method's score per feature (higher = more important)
    seconds: float  # wall time of the selection

    def top(self, k: int) -> np.ndarray:
        return self.ranking[:k]


def get_method(name: str) -> Method:
    """The method called `name`, or a one-line error naming the choices."""
    if name not in METHODS:
        raise SelectionError(f"unknown method {name!r}; choose from: {', '.join(METHODS)}")
    return METHODS[name]


def rank(scores: np.ndarray, seed: int) -> np.ndarray:
    """Feature indices by decreasing score, ties broken by a seeded random permutation."""
    shuffle = np.random.default_rng(seed).permutation(len(scores))
    order = np.argsort(-scores[shuffle], kind="stable")
    return shuffle[order]


def standardise_features(x: np.ndarray) -> np.ndarray:
    """Each column to mean 0, std 1 over the rows given (a constant column becomes 0)."""
    x = np.asarray(x, dtype=np.float64)
    std = x.std(0)
    std[std == 0] = 1.0
    return ((x - x.mean(0)) / std).astype(np.float32)


def check_input(x, y, name: str, k: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The checked (x, y) as arrays, or a one-line error naming the bad value and the valid range."""
    chosen = get_method(name)
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] < 2:
        rows = x.shape[0] if x.ndim else 0
        raise SelectionError(
            f"x must be a 2-D array (samples, features) with at least 2 rows; got shape {x.shape} (n_samples = {rows})"
        )
    if not np.isfinite(x).all():
        raise SelectionError("x holds NaN or infinite values; impute or drop them first")
    features = x.shape[1]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k < features:
        raise SelectionError(f"k {k!r} must be an integer in 1..{features - 1} (n_features = {features})")
    if y is None:
        if chosen.supervised:
            unsupervised = ", ".join(m.name for m in METHODS.values() if not m.supervised)
            raise SelectionError(f"method {name!r} needs labels (y); without labels choose from: {unsupervised}")
        return x, None
    y = np.asarray(y)
    if y.shape != (x.shape[0],):
        raise SelectionError(f"y must hold one label per row of x ({x.shape[0]}), got shape {y.shape}")
    return x, y


def select_features(
    x: ArrayLike, y: ArrayLike | None = None, method: str = "wast", k: int = 50, seed: int = 0, **options: object
) -> Selection:
    """Rank the features of `x` (samples x features) with a selection method.

    Args:
        x: the training data, one row per sample; standardised per feature here.
        y: integer class labels, needed by the supervised methods (None for the unsupervised).
        method: one of `METHODS` (`neuroplast.select.METHODS`).
        k: how many features are wanted, in 1..features-1 (NeuroFS removes inputs down to k;
            the other methods score every feature whatever k is).
        seed: drives every random draw of the method.
        **options: the method's own settings, e.g. `epochs=5` (see `METHODS[name].options`).

    Returns:
        A `Selection`: `ranking` (every feature, best first; `selection.top(k)` is the
        selected set), the method's `scores` and the wall time.
    """
    x, y = check_input(x, y, method, k)
    chosen = METHODS[method]
    unknown = sorted(set(options) - set(chosen.options))
    if unknown:
        raise SelectionError(
            f"unknown option {unknown[0]!r} for method {method!r}; choose from: {', '.join(chosen.options) or 'none'}"
        )
    start = time.perf_counter()
    scores = np.asarray(chosen.score(standardise_features(x), y, int(k), int(seed), **options), dtype=np.float64)
    seconds = time.perf_counter() - start
    scores = np.nan_to_num(scores, nan=-np.inf)
    return Selection(method, rank(scores, seed), scores, seconds)


# -- baselines ------------------------------------------------------------------------------------
@register_method("anova", supervised=True, summary="ANOVA F statistic per feature (scikit-learn f_classif)")
def anova_scores(x, y, k, seed):
    import warnings

    from sklearn.feature_selection import f_classif

    with warnings.catch_warnings():  # a constant column has no F statistic: it scores -inf
        warnings.simplefilter("ignore")
        scores, _ = f_classif(x, y)
    return np.nan_to_num(scores, nan=-np.inf)


@register_method("mutual-info", supervised=True, summary="mutual information with the label (scikit-learn)")
def mutual_info_scores(x, y, k, seed, neighbors: int = 3):
    from sklearn.feature_selection import mutual_info_classif

    return mutual_info_classif(x, y, n_neighbors=neighbors, random_state=seed)


@register_method("l1-logistic", supervised=True, summary="|coefficient| of an L1-regularised logistic regression")
def l1_logistic_scores(x, y, k, seed, c: float = 0.05, max_iter: int = 200):
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(l1_ratio=1.0, C=c, solver="saga", max_iter=max_iter, tol=1e-3, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    return np.abs(model.coef_).max(0)


@register_method("extra-trees", supervised=True, summary="impurity importance of ExtraTrees (50 trees)")
def extra_trees_scores(x, y, k, seed, trees: int = 50):
    from sklearn.ensemble import ExtraTreesClassifier

    return ExtraTreesClassifier(n_estimators=trees, random_state=seed).fit(x, y).feature_importances_


@register_method("random", supervised=False, summary="a uniformly random ranking (the floor)")
def random_scores(x, y, k, seed):
    return np.random.default_rng(seed).random(x.shape[1])


@register_method("lassonet", supervised=True, summary="LassoNet's path (the lassonet package): when a feature leaves")
def lassonet_scores(
    x,
    y,
    k,
    seed,
    hidden: tuple[int, ...] = (100,),
    path_multiplier: float = 1.02,
    batch_size: int = 256,
    epochs: tuple[int, int] = (100, 10),
    patience: tuple[int, int] = (10, 5),
    m: float = 10.0,
    max_samples: int = 0,
):
    """LassoNet (Lemhadri et al., JMLR 2021) with its reference package: the dense network is
    trained, then the penalty grows along the path; a feature's importance is the penalty at
    which it leaves the model (`feature_importances_`). `max_samples` > 0 fits it on that many
    rows drawn with the seed (its path is long: one training per penalty)."""
    try:
        from lassonet import LassoNetClassifier
    except ImportError:
        raise SelectionError(
            "method 'lassonet' needs the lassonet package: pip install 'neuroplast[lassonet]'"
        ) from None
    import torch

    model = LassoNetClassifier(
        hidden_dims=tuple(hidden),
        path_multiplier=path_multiplier,
        M=m,
        batch_size=batch_size,
        n_iters=tuple(epochs),
        patience=tuple(patience),
        verbose=0,
        random_state=seed,
        torch_seed=seed,
        device=torch.device("cpu"),
    )
    if 0 < max_samples < len(x):
        rows = np.random.default_rng(seed).choice(len(x), max_samples, replace=False)
        x, y = x[rows], y[rows]
    model.path(x, y, return_state_dicts=False)
    return np.asarray(model.feature_importances_, dtype=np.float64)
