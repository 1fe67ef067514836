"""A feature-selection study: methods x seeds on one dataset, every cell in its own folder
`<out>/<dataset>/<method>/seed<seed>/result.json` (a finished cell is skipped), then a report
`select.md` with accuracy tables (mean ± std over seeds), selection times, recovery of the
informative features where they are known, and figures (accuracy vs K, selected pixels).

The same split serves every method: the selectors see the first `select_samples` rows of a fixed
permutation of the training set, the classifiers are fitted on the first `eval_samples` rows of
it and tested on the whole test set.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from neuroplast.data import DATASETS, load_dataset
from neuroplast.select.evaluate import CLASSIFIERS, accuracy_on_features, recovery
from neuroplast.select.methods import METHODS, SelectionError, select_features

IMAGE_DATASETS = ("digits", "mnist", "fashion-mnist", "fashion-mnist-noise")
PUBLISHED_KS = (25, 50, 75, 100, 150, 200)
RESULT = "result.json"


@dataclass
class SelectStudy:
    """What to run: `methods` x `seeds` on `dataset`, evaluated at every K of `ks`."""

    out: str = "runs/select"
    dataset: str = "fashion-mnist"
    methods: list[str] = field(default_factory=lambda: ["wast"])
    ks: list[int] = field(default_factory=lambda: [50])
    seeds: list[int] = field(default_factory=lambda: [0])
    classifiers: list[str] = field(default_factory=lambda: ["svm", "knn", "extra-trees"])
    select_samples: int = 0  # training rows the selectors see (0: all)
    eval_samples: int = 0  # training rows the classifiers are fitted on (0: all); the test set is whole
    validation: int = 0  # training rows held out and scored instead of the test set (0: the test set)
    workers: int = 1
    data: dict = field(default_factory=dict)  # dataset options (synthetic sets)
    options: dict = field(default_factory=dict)  # per method: {"wast": {"epochs": 1}, ...}

    def validate(self) -> SelectStudy:
        """This study, or a one-line error naming the bad value and the valid choices."""
        if self.dataset not in DATASETS:
            raise SelectionError(f"unknown dataset {self.dataset!r}; choose from: {', '.join(DATASETS)}")
        for name in self.methods:
            if name not in METHODS:
                raise SelectionError(f"unknown method {name!r}; choose from: {', '.join(METHODS)}")
        for name in self.classifiers:
            if name not in CLASSIFIERS:
                raise SelectionError(f"unknown classifier {name!r}; choose from: {', '.join(CLASSIFIERS)}")
        for name in self.options:
            if name not in METHODS:
                raise SelectionError(f"options for unknown method {name!r}; choose from: {', '.join(METHODS)}")
        if not self.methods or not self.seeds or not self.ks:
            raise SelectionError("a study needs at least one method, one seed and one K")
        for key in ("select_samples", "eval_samples", "validation"):
            if getattr(self, key) < 0:
                raise SelectionError(f"{key} {getattr(self, key)!r} must be >= 0 (0: the whole training set)")
        if self.workers < 1:
            raise SelectionError(f"workers {self.workers!r} must be a positive integer")
        return self

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> SelectStudy:
        """A study from a TOML file: a [select] table of the fields above, [data] for the dataset
        options, [options.METHOD] per method; `overrides` (not None) win."""
        try:
            values = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SelectionError(f"cannot read study config {path!r}: {exc}") from None
        unknown = sorted(set(values) - {"select", "data", "options"})
        if unknown:
            raise SelectionError(
                f"unknown table {unknown[0]!r} in {path}; valid tables: [select], [data], [options.METHOD]"
            )
        table = dict(values.get("select", {}))
        valid = [f.name for f in fields(cls) if f.name not in ("data", "options")]
        bad = sorted(set(table) - set(valid))
        if bad:
            raise SelectionError(f"unknown key {bad[0]!r} in [select] of {path}; valid keys: {', '.join(valid)}")
        table.update(data=values.get("data", {}), options=values.get("options", {}))
        table.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**table)


@dataclass
class Cell:
    """One (dataset, method, seed) of a study, in its own folder."""

    method: str
    seed: int
    folder: Path
    config: dict


def cells(study: SelectStudy) -> list[Cell]:
    """Every cell of the study, in order."""
    root = Path(study.out) / study.dataset
    return [
        Cell(m, s, root / m / f"seed{s}", {**asdict(study), "method": m, "seed": s})
        for m in study.methods
        for s in study.seeds
    ]


def is_finished(cell: Cell) -> bool:
    """A result is there and covers the study's K values and classifiers."""
    path = cell.folder / RESULT
    if not path.exists():
        return False
    result = json.loads(path.read_text())
    return set(map(str, cell.config["ks"])) <= set(result["accuracy"]) and all(
        set(cell.config["classifiers"]) <= set(row) for row in result["accuracy"].values()
    )


_LOADED: dict[str, tuple] = {}


def study_split(dataset: str, data: dict, select_samples: int, eval_samples: int, validation: int = 0) -> dict:
    """The arrays every method of a study sees (cached per process). With `validation` > 0 that
    many training rows are held out and scored instead of the test set (selectors and classifiers
    never see them): tune on them, then score the chosen settings once on the test set."""
    key = json.dumps([dataset, data, select_samples, eval_samples, validation], sort_keys=True)
    if key not in _LOADED:
        options = {"synthetic": data} if data else {}
        d = load_dataset(dataset, flatten=True, progress=False, **options)
        x, y = d.x_train.numpy(), d.y_train.numpy()
        if validation >= len(x):
            raise SelectionError(
                f"validation {validation!r} must be in 0..{len(x) - 1} ({dataset} has {len(x)} training rows)"
            )
        order = np.random.default_rng(0).permutation(len(x))  # one split for every method and seed
        held, order = order[len(order) - validation :], order[: len(order) - validation]
        pick = order[:select_samples] if select_samples else order
        fit = order[:eval_samples] if eval_samples else order
        test_x, test_y = (x[held], y[held]) if validation else (d.x_test.numpy(), d.y_test.numpy())
        _LOADED[key] = {
            "select_x": x[pick],
            "select_y": y[pick],
            "fit_x": x[fit],
            "fit_y": y[fit],
            "test_x": test_x,
            "test_y": test_y,
            "informative": d.extras["informative"].numpy() if "informative" in d.extras else None,
        }
    return _LOADED[key]


def run_cell(config: dict, folder: str | Path) -> dict:
    """Select with one method and seed, evaluate at every K, write `result.json`; return it."""
    split = study_split(
        config["dataset"], config["data"], config["select_samples"], config["eval_samples"], config["validation"]
    )
    method, seed, ks = config["method"], config["seed"], sorted(config["ks"])
    options = dict(config["options"].get(method, {}))
    if method == "wast" and config["dataset"] in IMAGE_DATASETS:
        options.setdefault("data_kind", "image")
    labels = split["select_y"] if METHODS[method].supervised else None
    selection = select_features(split["select_x"], labels, method, max(ks), seed, **options)
    accuracy = {
        str(k): {
            c: accuracy_on_features(
                split["fit_x"], split["fit_y"], split["test_x"], split["test_y"], selection.top(k), c, seed
            )
            for c in config["classifiers"]
        }
        for k in ks
    }
    result = {
        "dataset": config["dataset"],
        "method": method,
        "seed": seed,
        "seconds": selection.seconds,
        "select_samples": len(split["select_x"]),
        "eval_samples": len(split["fit_x"]),
        "test_samples": len(split["test_x"]),
        "scored_on": "validation" if config["validation"] else "test",
        "options": options,
        "accuracy": accuracy,
        "ranking": selection.ranking[: max(max(ks), 200)].tolist(),
    }
    if split["informative"] is not None:
        informative = split["informative"]
        result["recovery"] = {str(k): recovery(selection.top(k), informative) for k in ks}
        result["recovery"]["informative"] = recovery(selection.top(len(informative)), informative)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RESULT).write_text(json.dumps(result, indent=1))
    return result


def load_results(study: SelectStudy) -> list[dict]:
    """The results of the study's finished cells."""
    return [json.loads((c.folder / RESULT).read_text()) for c in cells(study) if (c.folder / RESULT).exists()]


def _mean_std(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    if not values:
        return "–"
    a = np.asarray(values) * scale
    return f"{a.mean():.{digits}f} ± {a.std():.{digits}f}" if len(a) > 1 else f"{a.mean():.{digits}f}"


def write_report(study: SelectStudy) -> Path:
    """Write `select.md`, `accuracy_vs_k.png` and (image data) `masks.png` into `<out>/<dataset>`."""
    results = load_results(study)
    folder = Path(study.out) / study.dataset
    folder.mkdir(parents=True, exist_ok=True)
    by_method: dict[str, list[dict]] = {}
    for r in results:
        by_method.setdefault(r["method"], []).append(r)
    ks = sorted({int(k) for r in results for k in r["accuracy"]})
    lines = [f"# Feature selection on {study.dataset}", ""]
    if results:
        r0 = results[0]
        lines += [
            f"Selectors saw {r0['select_samples']} training rows; the classifiers were fitted on "
            f"{r0['eval_samples']} and tested on {r0['test_samples']}"
            + (" held-out training rows (validation)" if r0.get("scored_on") == "validation" else "")
            + ". Mean ± std over seeds (n per row).",
            "",
        ]
    for classifier in study.classifiers:
        lines += [
            f"## {classifier}, test accuracy (%)",
            "",
            "| method | n | " + " | ".join(f"K={k}" for k in ks) + " |",
        ]
        lines.append("|---|---|" + "---|" * len(ks))
        for name, rows in by_method.items():
            cells_ = [
                _mean_std([r["accuracy"][str(k)][classifier] for r in rows if str(k) in r["accuracy"]]) for k in ks
            ]
            lines.append(f"| {name} | {len(rows)} | " + " | ".join(cells_) + " |")
        lines.append("")
    lines += ["## Selection time (s)", "", "| method | seconds |", "|---|---|"]
    lines += [f"| {name} | {_mean_std([r['seconds'] for r in rows], 1.0, 1)} |" for name, rows in by_method.items()]
    lines.append("")
    if any("recovery" in r for r in results):
        lines += [
            "## Recovery of the informative features (%)",
            "",
            "| method | K = n informative | " + " | ".join(f"K={k}" for k in ks) + " |",
            "|---|---|" + "---|" * len(ks),
        ]
        for name, rows in by_method.items():
            row = [_mean_std([r["recovery"]["informative"] for r in rows])]
            row += [_mean_std([r["recovery"][str(k)] for r in rows if str(k) in r["recovery"]]) for k in ks]
            lines.append(f"| {name} | " + " | ".join(row) + " |")
        lines.append("")
    (folder / "select.md").write_text("\n".join(lines))
    if results:
        _plot_accuracy(by_method, ks, study.classifiers, folder / "accuracy_vs_k.png")
        if study.dataset in IMAGE_DATASETS:
            side = 8 if study.dataset == "digits" else 28
            _plot_masks(by_method, 50 if 50 in ks else ks[0], side, folder / "masks.png")
    return folder / "select.md"


def _plot_accuracy(by_method: dict, ks: list[int], classifiers: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(classifiers), figsize=(4.5 * len(classifiers), 3.5), squeeze=False)
    for ax, classifier in zip(axes[0], classifiers):
        for name, rows in by_method.items():
            means = [
                np.mean([r["accuracy"][str(k)][classifier] for r in rows if str(k) in r["accuracy"]]) * 100 for k in ks
            ]
            ax.plot(ks, means, marker="o", label=name)
        ax.set(title=classifier, xlabel="K selected features", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_masks(by_method: dict, k: int, side: int, path: Path) -> None:
    """The first seed's K selected pixels of each method on the side x side grid (appended
    noise features, if any, are counted in the title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(by_method)
    fig, axes = plt.subplots(1, len(names), figsize=(2.2 * len(names), 2.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        top = np.asarray(min(by_method[name], key=lambda r: r["seed"])["ranking"][:k])
        mask = np.zeros(side * side)
        pixels = top[top < side * side]
        mask[pixels] = 1
        ax.imshow(mask.reshape(side, side), cmap="gray_r")
        noise = len(top) - len(pixels)
        ax.set_title(f"{name}" + (f"\n{noise} noise" if noise else ""), fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"selected pixels, K={k}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
