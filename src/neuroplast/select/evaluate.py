"""The evaluation protocol of the feature-selection papers: classifiers trained on the K selected
columns only, a scaler fitted on the training split only, and, where the informative features
are known, the share of them recovered."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

CLASSIFIERS: dict[str, Callable[[int], object]] = {}


def _svm(seed: int):
    from sklearn.svm import SVC

    return SVC()  # scikit-learn defaults: RBF kernel, C = 1 (WAST, NeuroFS)


def _one_nn(seed: int):
    from sklearn.neighbors import KNeighborsClassifier

    return KNeighborsClassifier(n_neighbors=1)


def _extra_trees(seed: int):
    from sklearn.ensemble import ExtraTreesClassifier

    return ExtraTreesClassifier(n_estimators=50, random_state=seed)


CLASSIFIERS.update({"svm": _svm, "knn": _one_nn, "extra-trees": _extra_trees})


def accuracy_on_features(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    features: Sequence[int],
    classifier: str,
    seed: int = 0,
) -> float:
    """Test accuracy of `classifier` trained on the columns `features`, standardised with the
    training split's statistics only."""
    from sklearn.preprocessing import StandardScaler

    columns = np.asarray(features)
    scaler = StandardScaler().fit(x_train[:, columns])
    model = CLASSIFIERS[classifier](seed).fit(scaler.transform(x_train[:, columns]), y_train)
    return float((model.predict(scaler.transform(x_test[:, columns])) == y_test).mean())


def recovery(selected: Sequence[int], informative: Sequence[int]) -> float:
    """The share of the informative features among the selected ones, out of as many as could
    be: |selected & informative| / min(|selected|, |informative|)."""
    selected, informative = set(map(int, selected)), set(map(int, informative))
    return len(selected & informative) / min(len(selected), len(informative))
