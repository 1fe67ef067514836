"""Feature selection: defining behaviour of the sparse-training selectors, the API, the
scikit-learn selector, the study command and its errors."""

import json
import math

import numpy as np
import pytest
import torch

from neuroplast.cli import main
from neuroplast.data import load_dataset
from neuroplast.dst import AttentionGrow
from neuroplast.select import METHODS, SelectionError, SparseFeatureSelector, select_features
from neuroplast.select.evaluate import recovery
from neuroplast.select.methods import standardise_features
from neuroplast.select.sparse_training import ReconstructionImportance, attention_autoencoder, input_strength
from neuroplast.sparse import sparsify

FAST = {
    "quickselection": {"epochs": 2, "hidden": 32},
    "wast": {"epochs": 1, "hidden": 32},
    "dast": {"epochs": 2, "hidden": (32,)},
    "neurofs": {"epochs": 3, "hidden": (32, 32)},
}


@pytest.fixture(scope="module")
def easy():
    """A generated task: 60 columns, 6 of them informative."""
    data = load_dataset("synthetic", synthetic={"samples": 800, "features": 60, "informative": 6, "class_sep": 2.0})
    return data.x_train.numpy(), data.y_train.numpy(), data.extras["informative"].numpy()


def test_quickselection_strength_is_sum_of_live_abs_weights():
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 7)
    topology = sparsify(layer, density=0.3, distribution="uniform", generator=torch.Generator().manual_seed(1))
    sparse = topology.layers["model"]
    dense = layer.weight.detach().clone()
    mask = layer.weight_mask
    by_hand = [sum(abs(float(dense[h, i])) for h in range(7) if mask[h, i]) for i in range(12)]
    assert torch.allclose(input_strength(sparse), torch.tensor(by_hand), atol=1e-6)


def test_wast_importance_follows_its_formula():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 5))
    topology = sparsify(model, density=0.5, distribution="uniform", generator=torch.Generator().manual_seed(0))
    encoder, decoder = topology.layers["0"], topology.layers["2"]
    importance = ReconstructionImportance(encoder, decoder, lam=0.4)
    x, x_hat = torch.randn(4, 5), torch.randn(4, 5)
    w1 = (model[0].weight * model[0].weight_mask).detach().abs()
    w2 = (model[2].weight * model[2].weight_mask).detach().abs()
    error = (x - x_hat).abs().mean(0)
    for batch in range(2):
        importance.observe(x, x_hat)
        importance.update()
        expected_in = (batch + 1) * (0.4 * error + 0.6 * w1.sum(0))
        expected_out = (batch + 1) * (0.4 * error + 0.6 * w2.sum(1))
        assert torch.allclose(importance.feature_in, expected_in, atol=1e-5)
        assert torch.allclose(importance.feature_out, expected_out, atol=1e-5)
    # the drop factor is the feature-side neuron's importance; hidden neurons all weigh 1
    _, flat = encoder.live()
    assert torch.equal(importance.per_weight_src("0", flat), importance.feature_in[flat % 5])
    _, flat = decoder.live()
    assert torch.equal(importance.per_weight_src("2", flat), importance.feature_out[flat // 3])
    assert torch.equal(importance.dst["0"], torch.ones(3))


def test_wast_keeps_density_and_scores_by_importance():
    x = standardise_features(np.random.default_rng(0).normal(size=(300, 20)))
    importance = attention_autoencoder(
        x, 0, AttentionGrow(importance_lambda=0.9), 1, 8, 0.25, 0.3, 0.1, 32, 0.2, "t", False
    )
    assert importance.encoder.nnz == round(0.25 * 20 * 8) and importance.decoder.nnz == round(0.25 * 20 * 8)
    scores = select_features(x, None, "wast", k=5, seed=0, epochs=1, hidden=8, density=0.25, batch_size=32)
    assert np.allclose(scores.scores, importance.feature_in.numpy())


@pytest.mark.parametrize("name", ["quickselection", "wast", "dast", "neurofs", "anova", "random", "extra-trees"])
def test_selection_is_deterministic_by_seed(easy, name):
    x, y, _ = easy
    labels = y if METHODS[name].supervised else None
    first = select_features(x, labels, name, k=6, seed=3, **FAST.get(name, {}))
    again = select_features(x, labels, name, k=6, seed=3, **FAST.get(name, {}))
    assert np.array_equal(first.ranking, again.ranking)
    assert sorted(first.ranking) == list(range(x.shape[1]))


def _neurofs_active_count(features: int, k: int, epochs: int, zeta: float = 0.2) -> int:
    """The active inputs at the end of NeuroFS's schedule, counted by hand: removal down to k
    by 65% of training, newcomers protected for one round and tried before the weakest go."""
    start = max(k, int((1 - zeta) * features))
    to_remove, removed, epoch_remove = start - k, 0, max(1, int(0.65 * epochs))
    active, newcomers = start, 0
    for t in range(epochs - 1):  # after every epoch but the last
        if t < epoch_remove and removed < to_remove:
            removed += math.ceil((to_remove - removed) / (epoch_remove - t))
        active -= min(max(0, active - (start - removed)), active - newcomers)
        newcomers = int(removed * zeta * (1 - t / epochs))
        active += newcomers
    return active


@pytest.mark.parametrize("epochs", [2, 3, 6])
def test_neurofs_ends_with_k_inputs_plus_the_last_newcomers(easy, epochs):
    x, y, _ = easy
    selection = select_features(x, y, "neurofs", k=6, seed=0, epochs=epochs, hidden=(32,))
    active = selection.scores >= 0  # the active inputs score by strength, removed ones below 0
    assert active.sum() == _neurofs_active_count(60, 6, epochs)
    assert active[selection.top(6)].all()


@pytest.mark.parametrize("name", ["dast", "extra-trees"])
def test_recovers_the_informative_features_of_an_easy_task(easy, name):
    x, y, informative = easy
    options = {"epochs": 20, "hidden": (64,), "batch_size": 32, "update_every": 5} if name == "dast" else {}
    selection = select_features(x, y, name, k=12, seed=0, **options)
    assert recovery(selection.top(12), informative) >= 5 / 6  # 5 of the 6 within the top 12


def test_sklearn_selector_in_a_pipeline(easy):
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import SVC

    x, y, informative = easy
    selector = SparseFeatureSelector("anova", k=6)
    reduced = selector.fit(x, y).transform(x)
    assert reduced.shape == (len(x), 6)
    support = selector.get_support()
    assert support.shape == (x.shape[1],) and support.sum() == 6
    assert np.array_equal(np.flatnonzero(support), np.sort(selector.ranking_[:6]))
    assert np.array_equal(reduced, x[:, support])
    pipeline = make_pipeline(SparseFeatureSelector("wast", k=6, options={"epochs": 1, "hidden": 16}), SVC()).fit(x, y)
    assert pipeline.score(x, y) > 0.5


def test_sklearn_check_estimator():
    from sklearn.utils.estimator_checks import check_estimator

    results = check_estimator(SparseFeatureSelector("anova", k=1), on_fail=None)
    failed = [r["check_name"] for r in results if r["status"] == "failed"]
    assert len(results) > 40 and failed == []


@pytest.mark.parametrize(
    ("k", "method", "labels", "message"),
    [
        (60, "anova", True, "k 60 must be an integer in 1..59"),
        (0, "anova", True, "k 0 must be an integer in 1..59"),
        (5, "magic", True, "unknown method 'magic'; choose from: anova"),
        (5, "anova", False, "method 'anova' needs labels (y); without labels choose from:"),
    ],
)
def test_bad_input_is_one_line(easy, k, method, labels, message):
    x, y, _ = easy
    with pytest.raises(SelectionError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        select_features(x, y if labels else None, method, k=k)
    assert "\n" not in str(error.value)


def test_cli_writes_results_and_report(tmp_path, capsys):
    out = tmp_path / "fs"
    args = ["select", "--dataset", "digits", "--method", "anova,random", "--k", "5,10", "--out", str(out), "--quiet"]
    assert main(args + ["--classifiers", "svm,knn"]) == 0
    result = json.loads((out / "digits" / "anova" / "seed0" / "result.json").read_text())
    assert set(result["accuracy"]) == {"5", "10"} and set(result["accuracy"]["10"]) == {"svm", "knn"}
    assert result["accuracy"]["10"]["svm"] > 0.5
    assert (out / "digits" / "select.md").exists() and (out / "digits" / "masks.png").exists()
    assert main(args + ["--classifiers", "svm,knn", "--workers", "2"]) == 0  # nothing left to run
    assert "2 of 2 cells finished; running 0" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--method", "magic"], "unknown method 'magic'; choose from:"),
        (["--k", "64"], "k 64 must be an integer in 1..63"),
        (["--dataset", "nope"], "unknown dataset 'nope'; choose from:"),
        (["--option", "wast.lr"], "must read METHOD.KEY=VALUE"),
        (["--option", "magic.lr=1"], "unknown method 'magic'; choose from:"),
        (["--method", "wast", "--option", "wast.depth=2"], "unknown option 'depth' for wast; choose from: epochs"),
        (["--validation", "5000"], "validation 5000 must be in 0.."),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, capsys, flags, message):
    code = main(["select", "--dataset", "digits", "--out", str(tmp_path), "--quiet", *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_validation_rows_are_held_out_from_selection_and_fitting():
    from neuroplast.select.study import study_split

    split = study_split("digits", {}, 0, 0, validation=300)
    data = load_dataset("digits", flatten=True, progress=False)
    train = data.x_train.numpy()
    assert len(split["test_x"]) == 300 and len(split["fit_x"]) == len(split["select_x"]) == len(train) - 300
    rows = {row.tobytes(): i for i, row in enumerate(train)}
    held = {rows[r.tobytes()] for r in split["test_x"]}
    seen = {rows[r.tobytes()] for r in split["fit_x"]} | {rows[r.tobytes()] for r in split["select_x"]}
    assert len(held) == 300 and not held & seen  # never selected on nor fitted on


def test_cli_options_and_validation_reach_the_cell(tmp_path):
    out = tmp_path / "fs"
    args = ["select", "--dataset", "digits", "--method", "wast", "--k", "5", "--out", str(out), "--quiet"]
    assert (
        main(
            args
            + ["--classifiers", "knn", "--validation", "300", "--option", "wast.hidden=16", "--option", "wast.epochs=1"]
        )
        == 0
    )
    result = json.loads((out / "digits" / "wast" / "seed0" / "result.json").read_text())
    assert result["options"]["hidden"] == 16 and result["options"]["epochs"] == 1
    assert result["scored_on"] == "validation" and result["test_samples"] == 300
    assert "held-out training rows (validation)" in (out / "digits" / "select.md").read_text()


def test_synthetic_data_marks_its_informative_features():
    data = load_dataset("synthetic", synthetic={"samples": 400, "features": 30, "informative": 4, "seed": 2})
    informative = data.extras["informative"].numpy()
    assert len(informative) == 4 and data.x_train.shape[1] == 30
    from sklearn.feature_selection import f_classif

    scores, _ = f_classif(data.x_train.numpy(), data.y_train.numpy())
    assert set(np.argsort(-scores)[:2]) <= set(informative)  # the strongest columns are informative ones
