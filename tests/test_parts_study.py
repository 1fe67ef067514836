"""The part-query encoder inside neuroplast: config, trainer, CLI, the parts study and its pivot
estimate."""

import json

import numpy as np
import pytest
import torch

from neuroplast.cli import main
from neuroplast.data.articulated import generate
from neuroplast.experiments.parts import estimate_pivots, parse_parts_study, run_parts_study, write_parts_report
from neuroplast.models import build_model
from neuroplast.models.parts import pose_descriptors
from neuroplast.train import ConfigError, RunConfig, train


@pytest.fixture(autouse=True)
def data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROPLAST_DATA", str(tmp_path / "data"))


def test_pivots_from_true_masks_are_exact():
    """With the true masks and rotation, the rigid-motion estimate finds the moved joint's pivot:
    every part below the joint turns about it; parts that only look different because another
    part hides less or more of them (scissors' blades, a stick figure's limbs) are left out."""
    p = generate(400, seed=3, size=28, pairs=True, split="test")
    single = np.flatnonzero(p["moved"].sum(1) == 1)
    joint = p["moved"][single].argmax(1)
    rows = np.arange(len(single))
    truth = torch.from_numpy(p["joint_pos_a"][single][rows, joint])
    da = pose_descriptors(torch.from_numpy(p["part_masks_a"][single]))
    db = pose_descriptors(torch.from_numpy(p["part_masks_b"][single]))
    delta = torch.from_numpy(p["delta_q"][single][rows, joint])
    estimate, moved = estimate_pivots(da, db, delta, 28)
    error = (estimate - truth).norm(dim=-1)
    assert len(single) > 200
    assert error.nanmedian() < 0.2
    # found unless every moving part is short and turned little (its centroid moved < 1 pixel)
    assert estimate[:, 0].isfinite().double().mean() > 0.9
    assert moved.any(1).equal(estimate[:, 0].isfinite())
    # a wrong rotation puts the pivot elsewhere
    wrong, _ = estimate_pivots(da, db, -delta, 28)
    assert (wrong - truth).norm(dim=-1).nanmedian() > 2


def test_config_defaults_follow_the_model():
    assert RunConfig(model="vit").validate().patch_size == 4
    assert RunConfig(model="vit").validate().vit_depth == 4
    assert RunConfig(model="parts").validate().vit_depth == 2
    assert RunConfig(model="moba-parts").validate().patch_size == 1
    model = build_model("moba-parts", (1, 16, 16), 5, parts={"block_size": 16, "top_k": 2})
    assert model.patch_size == 1 and model.position is None


@pytest.mark.parametrize(
    "values, words",
    [
        (dict(model="parts", dataset="digits", part_supervision=True), "needs a parts model on the articulated"),
        (dict(model="cnn", dataset="articulated", joint_head=True), "needs a parts model"),
        (dict(dataset="articulated", articulated_families="arm2,wheel"), "unknown articulated family 'wheel'"),
        (dict(dataset="articulated", articulated_size=30), "articulated_size 30"),
        (dict(dataset="articulated", articulated_split="odd"), "unknown articulated_split 'odd'"),
        (dict(model="parts", parts=1), "parts 1"),
        (dict(dataset="articulated", articulated_families="arm2,arm2"), "lists 'arm2' more than once"),
        (dict(model="parts", dataset="articulated", part_supervision=True, parts=6), "parts >= 7"),
        (dict(model="parts", attention="moba", routing="block"), "routing 'block' is a vit setting"),
    ],
)
def test_bad_parts_settings(values, words):
    with pytest.raises(ConfigError, match=words):
        RunConfig(**values).validate()


def test_cli_one_line_errors(capsys, tmp_path):
    out = ["--out", str(tmp_path / "run"), "--quiet"]
    code = main(["train", "--dataset", "articulated", "--articulated-families", "arm2,wheel", *out])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "wheel" in err and "arm3" in err
    code = main(["train", "--dataset", "digits", "--model", "parts", "--patch-size", "3", "--epochs", "1", *out])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "patch_size 3" in err and "choose from" in err


def test_mask_supervision_needs_enough_queries(tmp_path):
    config = RunConfig(
        dataset="articulated",
        model="parts",
        parts=4,
        part_supervision=True,
        articulated_size=28,
        articulated_train=64,
        articulated_test=32,
        epochs=1,
        method="dense",
    )
    with pytest.raises(ConfigError, match="parts >= 7"):
        train(config, tmp_path / "run", progress=False, log=None)


def test_supervised_parts_learn_the_masks(tmp_path):
    """A few hundred steps of mask supervision beat the untrained encoder's part mIoU."""
    from neuroplast.experiments.parts import part_scores, trained_run

    common = dict(
        dataset="articulated",
        model="parts",
        articulated_size=28,
        articulated_families="arm2,scissors",
        articulated_train=1024,
        articulated_test=128,
        method="dense",
        optimizer="adamw",
        weight_decay=0.0,
        batch_size=32,
        part_supervision=True,
        joint_head=True,
    )
    trained = RunConfig(**common, epochs=6, lr=0.003).validate()
    untrained = RunConfig(**common, epochs=1, lr=0.0).validate()
    scores = {}
    for name, config in (("trained", trained), ("untrained", untrained)):
        train(config, tmp_path / name, progress=False, log=None)
        scores[name] = part_scores(
            trained_run(config, tmp_path / name), trained_run(config, tmp_path / name).data, True
        )
    assert scores["trained"]["part_miou"] > scores["untrained"]["part_miou"] + 0.15
    assert scores["trained"]["angle_error_degrees"] < scores["untrained"]["angle_error_degrees"]


def test_joint_targets_leave_out_hidden_joints_and_carry_each_samples_relabellings():
    from neuroplast.data import FAMILIES, load_articulated
    from neuroplast.train.trainer import supervision_targets

    config = RunConfig(dataset="articulated", model="parts", joint_head=True, articulated_train=64).validate()
    data = load_articulated(size=32, train=64, test=16)
    targets = supervision_targets(config, data)
    labels = data.y_train
    assert targets["joint_perms"].shape == (64, 4, 4)
    arms = (labels == FAMILIES.index("arm2")) | (labels == FAMILIES.index("arm3"))
    assert arms.any() and not targets["joint_valid"][arms, 0].any()
    assert torch.equal(targets["joint_valid"][~arms], data.extras["train_joint_valid"][~arms])
    stick = labels == FAMILIES.index("stick")
    assert stick.any() and (targets["joint_perms"][stick, 3] == torch.tensor([1, 0, 3, 2])).all()
    assert (targets["joint_perms"][~stick] == torch.arange(4)).all()


STUDY = {
    "study": {"variants": ["cnn", "sup"], "datasets": ["articulated", "digits"], "seeds": [0]},
    "variants": {
        "cnn": {"model": "cnn", "cnn_hidden": 8},
        "sup": {"model": "parts", "part_supervision": True, "joint_head": True, "datasets": ["articulated"]},
    },
    "datasets": {"articulated": {"articulated_size": 28, "articulated_train": 96, "articulated_test": 48}},
    "run": {"method": "dense", "epochs": 1, "optimizer": "adamw", "lr": 0.002, "batch_size": 32},
}


def test_parts_study_runs_scores_and_reports(tmp_path):
    study = parse_parts_study(STUDY, out=tmp_path / "study")
    assert [c.name for c in study.cells] == ["articulated/cnn/seed0", "articulated/sup/seed0", "digits/cnn/seed0"]
    assert len(run_parts_study(study, progress=False, log=None)) == 3
    metrics = json.loads((tmp_path / "study/articulated/sup/seed0/parts_metrics.json").read_text())
    for key in ("test_accuracy", "ood_accuracy", "part_miou", "foreground_ari", "angle_error_degrees"):
        assert 0 <= metrics[key] <= 180, key
    for key in ("pivot_error_px", "equivariance_rot90", "equivariance_hflip", "parameters"):
        assert key in metrics
    assert "part_miou" not in json.loads((tmp_path / "study/articulated/cnn/seed0/parts_metrics.json").read_text())
    assert run_parts_study(study, progress=False, log=None) == []  # finished cells are not re-run
    written = write_parts_report(study, log=None)
    names = {p.name for p in written}
    assert {"parts.md", "parts.json", "masks_sup.png", "pairs_sup.png"} <= names
    assert "| sup | parts |" in (tmp_path / "study/parts.md").read_text()


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda s: s["study"].update(variants=["cnn", "nope"]), "no \\[variants.nope\\] table"),
        (lambda s: s["variants"]["cnn"].update(dataset="digits"), "sets 'dataset'"),
        (lambda s: s["variants"]["cnn"].update(wings=2), "unknown key 'wings'"),
        (lambda s: s.update(extra={}), "unknown table or key 'extra'"),
        (lambda s: s["variants"]["sup"].update(datasets="articulated"), "must be a list"),
        (lambda s: s["variants"]["sup"].update(datasets=["mnist"]), "\\[study\\] datasets does not list"),
        (lambda s: s["datasets"].update(fashion_mnist={"epochs": 2}), "\\[datasets.fashion_mnist\\] is not one of"),
        (
            lambda s: s["variants"]["cnn"].update(model="vit", attention="moba", block_size=7),
            "cell digits/cnn/seed0: block_size 7 cannot be a tile of the 2x2",
        ),
    ],
)
def test_parts_study_config_errors(change, words):
    values = json.loads(json.dumps(STUDY))
    change(values)
    with pytest.raises(ConfigError, match=words):
        parse_parts_study(values)


def test_configs_saved_before_model_dependent_defaults_still_match():
    """A config saved without patch_size / vit_depth takes the defaults of its own model."""
    from dataclasses import asdict

    for model, patch, depth in (("vit", 4, 4), ("parts", 4, 2), ("moba-parts", 1, 2), ("mlp", 4, 4)):
        config = RunConfig(model=model).validate()
        saved = {k: v for k, v in asdict(config).items() if k not in ("patch_size", "vit_depth")}
        assert config.changed_from(saved) == [], model
        assert (config.patch_size, config.vit_depth) == (patch, depth)
        assert RunConfig(model=model, vit_depth=3).validate().changed_from(saved) == ["vit_depth"]
