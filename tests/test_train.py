"""The trainer: run folder contents, checkpoints, kill-and-resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from neuroplast.train import ConfigError, RunConfig, train
from neuroplast.train import checkpoint as ckpt
from neuroplast.train.checkpoint import find_checkpoint, load_checkpoint


def small(method="set", **overrides) -> RunConfig:
    values = dict(dataset="digits", method=method, hidden=[64, 64], epochs=4, batch_size=64, density=0.1, lr=0.05)
    values.update(overrides)
    return RunConfig.from_dict(values)  # DST knobs given flat move into the [dst] table


def metrics(folder: Path) -> list[dict]:
    records = [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines()]
    for r in records:  # wall-clock times differ between any two runs
        r.pop("seconds")
        r.pop("train_seconds")
    return records


def test_run_folder_contents(tmp_path):
    summary = train(small(), tmp_path, progress=False, log=None)
    assert (tmp_path / "config.toml").is_file() and (tmp_path / "summary.json").is_file()
    records = metrics(tmp_path)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["train_loss"] > 0 and r["test_loss"] > 0
        assert r["density"] == pytest.approx(0.1, abs=1e-3)
        assert {"name", "density", "nnz"} <= set(r["layers"][0])
        assert 0 < r["r_s"] <= 1
    assert sum(len(r["updates"]) for r in records) == 3  # SET: after each epoch but the last
    update = records[0]["updates"][0]["layers"][0]
    assert {"live", "dropped", "grown", "r_s"} <= set(update)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["final_test_accuracy"] == records[-1]["test_accuracy"] == summary["final_test_accuracy"]
    assert saved["best_test_accuracy"] == max(r["test_accuracy"] for r in records)
    assert saved["config"]["method"] == "set" and saved["seconds"] > 0


def test_progress_bar_renders(capsys, monkeypatch):
    """The rich progress bar, rendered as on a terminal, from the first batch on."""
    import rich

    monkeypatch.setenv("FORCE_COLOR", "1")  # rich treats the captured stdout as a terminal
    monkeypatch.setattr(rich, "_console", None)  # ... once its cached console, made by earlier tests, is gone
    train(small(epochs=2, batch_size=8), None, progress=True, log=None)
    out = capsys.readouterr().out
    assert "epoch 2/2" in out and "density 0.1" in out


def test_digits_learns():
    summary = train(small("rigl", epochs=8, update_every=5), None, progress=False, log=None)
    assert summary["final_test_accuracy"] > 0.85


@pytest.mark.parametrize("backend", ["masked", "csr"])
def test_bfloat16_precision_learns_as_float32_does(backend):
    """--precision bfloat16 trains under autocast (weights stay float32) to float32's accuracy."""
    accuracies = {}
    for precision in ("float32", "bfloat16"):
        config = small("rigl", epochs=6, update_every=5, backend=backend, precision=precision)
        accuracies[precision] = train(config, None, progress=False, log=None)["final_test_accuracy"]
    assert accuracies["bfloat16"] > 0.85 and abs(accuracies["bfloat16"] - accuracies["float32"]) < 0.03
    with pytest.raises(ConfigError, match="unknown precision 'float16'; choose from: float32, bfloat16"):
        small(precision="float16").validate()


@pytest.mark.parametrize(
    "method,extra",
    [
        ("set", {}),
        ("rigl", {"update_every": 7}),
        ("dense", {"optimizer": "adamw", "lr": 0.003}),
        # the research methods carry signals across epochs: momentum, importance, activations, a plateau
        ("snfs", {}),
        ("mest", {"drop_lambda": 0.5}),
        ("ctre-seq", {"switch_patience": 1, "activation_samples": 100}),
        ("wast", {"update_every": 5}),
        ("dast", {"update_every": 7}),
    ],
)
def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path, method, extra):
    config = small(method, dropout=0.2, **extra)  # dropout: the global RNG must be restored too
    train(config, tmp_path / "straight", progress=False, log=None)

    class Killed(Exception):
        pass

    def crash_after_epoch_2(record):
        if record["epoch"] == 2:
            raise Killed

    with pytest.raises(Killed):
        train(config, tmp_path / "resumed", progress=False, log=None, on_epoch_end=crash_after_epoch_2)
    assert not (tmp_path / "resumed" / "summary.json").exists()
    train(config, tmp_path / "resumed", resume=True, progress=False, log=None)
    assert metrics(tmp_path / "resumed") == metrics(tmp_path / "straight")


def test_resume_refuses_a_changed_config_and_fresh_run_refuses_an_existing_folder(tmp_path):
    train(small(epochs=1), tmp_path, progress=False, log=None)
    with pytest.raises(ConfigError, match="different configuration \\(changed: epochs\\)"):
        train(small(epochs=2), tmp_path, resume=True, progress=False, log=None)
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        train(small(epochs=1), tmp_path, progress=False, log=None)


def test_resume_survives_a_line_cut_off_mid_append(tmp_path):
    config = small(epochs=3)

    def crash_after_epoch_1(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "r", progress=False, log=None, on_epoch_end=crash_after_epoch_1)
    with open(tmp_path / "r" / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "train_lo')  # a SIGKILL during the append
    train(config, tmp_path / "r", resume=True, progress=False, log=None)
    train(config, tmp_path / "straight", progress=False, log=None)
    assert metrics(tmp_path / "r") == metrics(tmp_path / "straight")


def test_checkpoint_swap_never_loses_the_only_good_checkpoint(tmp_path):
    """A crash left only `checkpoint.old` (mid-swap); the next save must not delete it first."""
    ckpt.save_checkpoint(tmp_path, {"x": torch.ones(2)}, {"epoch": 1})
    os.replace(tmp_path / "checkpoint", tmp_path / "checkpoint.old")
    assert load_checkpoint(find_checkpoint(tmp_path))[1] == {"epoch": 1}
    ckpt.save_checkpoint(tmp_path, {"x": torch.zeros(2)}, {"epoch": 2})
    assert load_checkpoint(find_checkpoint(tmp_path))[1] == {"epoch": 2}
    assert not (tmp_path / "checkpoint.old").exists()


def test_a_corrupt_checkpoint_is_a_clear_error(tmp_path):
    train(small(epochs=1), tmp_path, progress=False, log=None)
    (tmp_path / "checkpoint" / "tensors.safetensors").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="checkpoint .* is unreadable"):
        train(small(epochs=1), tmp_path, resume=True, progress=False, log=None)


def test_a_crash_while_checkpointing_leaves_the_last_good_one(tmp_path, monkeypatch):
    train(small(epochs=1), tmp_path, progress=False, log=None)
    good_tensors, good_state = load_checkpoint(find_checkpoint(tmp_path))
    calls = {"n": 0}
    real_replace = os.replace

    def failing_replace(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:  # after the old checkpoint was moved aside, before the new one lands
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, {"x": torch.zeros(3)}, {"epoch": 99})
    found = find_checkpoint(tmp_path)
    assert found is not None
    tensors, state = load_checkpoint(found)
    assert state == good_state and set(tensors) == set(good_tensors)


def test_killed_process_resumes_to_the_same_metrics(tmp_path):
    """A real SIGKILL mid-run (not a polite exception), then `--resume`."""
    args = [
        sys.executable,
        "-m",
        "neuroplast",
        "train",
        "--dataset",
        "digits",
        "--method",
        "rigl",
        "--hidden",
        "256,256",
        "--epochs",
        "12",
        "--batch-size",
        "16",
        "--update-every",
        "20",
        "--density",
        "0.1",
        "--quiet",
    ]
    subprocess.run([*args, "--out", str(tmp_path / "straight")], check=True, capture_output=True)
    victim = subprocess.Popen(
        [*args, "--out", str(tmp_path / "killed")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    metrics_file = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and victim.poll() is None:
        if metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "killed" / "summary.json").exists(), "the run finished before it could be killed"
    subprocess.run([*args, "--out", str(tmp_path / "killed"), "--resume"], check=True, capture_output=True)
    assert metrics(tmp_path / "killed") == metrics(tmp_path / "straight")


def test_cnn_trains_sparse(tmp_path):
    summary = train(small("set", model="cnn", epochs=2, density=0.3), tmp_path, progress=False, log=None)
    assert summary["final_density"] == pytest.approx(0.3, abs=1e-3)
    layers = metrics(tmp_path)[-1]["layers"]
    assert {l["name"] for l in layers} == {"features.0", "features.3", "classifier.1", "classifier.4"}


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="Fashion-MNIST not installed")
def test_real_fashion_mnist_one_epoch_sparse(tmp_path):
    config = RunConfig(dataset="fashion-mnist", method="rigl", hidden=[256, 256], epochs=1, density=0.1)
    summary = train(config, tmp_path, progress=False, log=None)
    assert summary["final_test_accuracy"] > 0.78
    assert summary["final_density"] == pytest.approx(0.1, abs=1e-4)


def test_validation_runs_score_the_held_out_training_samples_never_the_test_set(tmp_path):
    from neuroplast.data import load_dataset
    from neuroplast.train.trainer import Run

    data = load_dataset("digits", flatten=True)
    config = RunConfig(dataset="digits", method="rigl", hidden=[32], epochs=1, validation=200)
    run = Run(config)
    assert torch.equal(run.data.x_test, data.x_train[-200:]) and len(run.data.y_train) == len(data.y_train) - 200
    lines = []
    train(config, tmp_path / "run", progress=False, log=lines.append)
    assert "val_acc" in lines[-1] and "test_acc" not in lines[-1]
    with pytest.raises(ConfigError, match="validation -1 must be >= 0"):
        RunConfig(validation=-1).validate()
    with pytest.raises(ConfigError, match="validation 5000 must be between 1 and"):
        Run(RunConfig(dataset="digits", hidden=[32], validation=5000))
