"""The command line: bad input gets exit code 2 and one line naming the value and the choices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib

import pytest

from neuroplast import cli


def run(capsys, *argv):
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse exits for --help and parse errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'; choose from: digits, mnist, fashion-mnist, cifar10"),
        (["--model", "resnet"], "unknown model 'resnet'; choose from: linear, mlp, cnn"),
        (["--method", "magic"], "unknown method 'magic'; choose from: dense, static, set, rigl, snfs, "),
        (["--density", "0"], "density 0.0 is outside (0, 1]"),
        (["--density", "1.5"], "density 1.5 is outside (0, 1]"),
        (["--epochs", "-3"], "epochs -3 must be a positive integer"),
        (["--epochs", "many"], "argument --epochs: invalid int value: 'many'"),
        (["--optimizer", "lion"], "unknown optimizer 'lion'; choose from: sgd, adamw"),
        (["--distribution", "gauss"], "unknown distribution 'gauss'; choose from: uniform, er, erk"),
        (["--device", "tpu"], "unknown device 'tpu'; choose from: cpu, cuda, auto"),
        (["--seed", "-1"], "seed -1 must be in [0, 2**32)"),
        (["--lr", "nan"], "lr nan must be a finite number"),
        (["--distribution", "er", "--epsilon", "-5"], "epsilon -5.0 must be > 0"),
        (["--epsilon", "5"], "epsilon is only used with distribution 'er'"),
        (["--dense-first", "--dense-last", "--hidden", "16"], "no layer left to sparsify"),
    ],
)
def test_bad_values_exit_2_with_one_line(capsys, tmp_path, argv, expected):
    code, out, err = run(capsys, "train", "--out", str(tmp_path / "r"), *argv)
    assert code == 2
    assert expected in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_out_is_a_file(capsys, tmp_path):
    (tmp_path / "f").write_text("")
    code, _, err = run(capsys, "train", "--out", str(tmp_path / "f"), "--epochs", "1")
    assert code == 2 and "is a file, not a folder" in err


def test_bad_config_files(capsys, tmp_path):
    code, _, err = run(capsys, "train", "--out", str(tmp_path / "r"), "--config", str(tmp_path / "missing.toml"))
    assert code == 2 and "cannot read config file" in err and "missing.toml" in err
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = = 3\n")
    code, _, err = run(capsys, "train", "--out", str(tmp_path / "r"), "--config", str(bad))
    assert code == 2 and "is not valid TOML" in err and len(err.strip().splitlines()) == 1
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('dataset = "digits"\nlearning_rate = 0.1\n')
    code, _, err = run(capsys, "train", "--out", str(tmp_path / "r"), "--config", str(unknown))
    assert code == 2 and "unknown key 'learning_rate'" in err and "valid keys: dataset, model" in err
    typed = tmp_path / "typed.toml"
    typed.write_text("hidden = [16, true]\n")
    code, _, err = run(capsys, "train", "--out", str(tmp_path / "r"), "--config", str(typed))
    assert code == 2 and "hidden [16, True] must be a non-empty list of positive integers" in err


def test_config_file_with_cli_override(capsys, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('dataset = "digits"\nmethod = "static"\nepochs = 5\nhidden = [32]\ndensity = 0.2\n')
    code, out, err = run(
        capsys, "train", "--config", str(config), "--epochs", "2", "--out", str(tmp_path / "r"), "--quiet"
    )
    assert code == 0, err
    written = tomllib.loads((tmp_path / "r" / "config.toml").read_text())
    assert written["epochs"] == 2 and written["method"] == "static" and written["hidden"] == [32]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["final_density"] == pytest.approx(0.2, abs=1e-3)


def test_help_reads_well(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "train" in out and "compare" in out and "demo" in out
    code, out, _ = run(capsys, "train", "--help")
    assert code == 0 and "--density" in out and "95% sparsity" in out
    flat = " ".join(out.split())  # argparse wraps the lines
    assert "default: None" not in flat and "(default: the method's)" in flat  # None: the preset's value
    assert flat.count("1000,1000,1000") == 1  # each default said once


def test_compare_is_a_study_of_one_density(capsys, tmp_path):
    argv = [
        "compare",
        "--dataset",
        "digits",
        "--methods",
        "dense,set",
        "--seeds",
        "0,1",
        "--epochs",
        "2",
        "--hidden",
        "32",
        "--density",
        "0.2",
        "--out",
        str(tmp_path),
        "--workers",
        "1",
        "--quiet",
    ]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    table = (tmp_path / "results.md").read_text()
    assert "| 80% | dense | 2 |" in table and "| 80% | set | 2 |" in table and "epochs to dense" in table
    assert (tmp_path / "learning_curves.png").stat().st_size > 1000
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("*/*/*/summary.json")) == [
        f"{method}/d0.2/seed{seed}/summary.json" for method in ("dense", "set") for seed in (0, 1)
    ]
    code, out, err = run(capsys, *argv)
    assert code == 0 and "4 of 4 cells already finished" in out
    code, out, err = run(capsys, *argv, "--lr", "0.2")  # a changed config is not a finished cell: refused
    assert code == 2 and "different configuration (changed: lr)" in err
    assert "| 80% | set | 2 |" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--methods", "set,nope"], "unknown method 'nope' in compare methods; choose from: dense, static, set"),
        (["--methods", "set,set"], "compare methods lists 'set' more than once"),
        (["--methods", ","], "compare methods is empty"),
        (["--seeds", "0,0"], "compare seeds lists 0 more than once"),
        (["--workers", "0"], "workers 0 must be a positive integer"),
    ],
)
def test_bad_compare_grids(capsys, tmp_path, argv, expected):
    code, _, err = run(capsys, "compare", "--out", str(tmp_path / "x"), *argv)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_demo_falls_back_to_digits(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "is_available_offline", lambda name: False)
    code, out, err = run(capsys, "demo", "--out", str(tmp_path), "--epochs", "3", "--quiet")
    assert code == 0, err
    assert "training on scikit-learn's 8x8 digits" in out
    for method in ("dense", "static", "set", "rigl", "dast"):
        assert f"{method}/d0.05/seed0" in out
    assert (tmp_path / "digits" / "learning_curves.png").is_file()
    assert "| 95% | dast | 1 |" in (tmp_path / "digits" / "results.md").read_text()
    assert "docs/dst.md" in out.strip().splitlines()[-1] and "README.md" in out.strip().splitlines()[-1]


def test_import_leaves_the_process_environment_alone():
    # a library import must not change how the user's process allocates memory (it once set
    # PyTorch's THP_MEM_ALLOC_ENABLE, which made ViT training slower on some hosts)
    env = {key: value for key, value in os.environ.items() if key != "THP_MEM_ALLOC_ENABLE"}
    script = (
        "import os, torch; before = dict(os.environ); import neuroplast.cli, neuroplast.models, neuroplast.attention; "
        "print(sorted(set(os.environ.items()) ^ set(before.items())))"
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


TRAIN_SMALL = ["--dataset", "digits", "--epochs", "2", "--hidden", "16", "--method", "set", "--density", "0.3"]


def test_log_tensorboard_writes_the_metrics_as_scalars(capsys, tmp_path):
    pytest.importorskip("tensorboard", reason='the tensorboard extra is not installed: pip install -e ".[tensorboard]"')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    code, _, err = run(capsys, "train", *TRAIN_SMALL, "--out", str(tmp_path), "--log", "tensorboard", "--quiet")
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = events.Tags()["scalars"]
    for key in ("train_loss", "test_accuracy", "density", "r_s", "lr"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [1, 2]
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in records])
    layers = [layer["name"] for layer in records[-1]["layers"]]
    assert layers and all(f"layer_density/{name}" in tags for name in layers)
    final = events.Scalars(f"layer_density/{layers[0]}")[-1].value
    assert final == pytest.approx(records[-1]["layers"][0]["density"])


def test_log_tensorboard_without_the_extra_says_how_to_install_it(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    code, _, err = run(capsys, "train", *TRAIN_SMALL, "--out", str(tmp_path / "r"), "--log", "tensorboard")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert 'pip install "neuroplast[tensorboard]"' in err
    assert not (tmp_path / "r").exists()
    code, _, err = run(capsys, "train", *TRAIN_SMALL, "--out", str(tmp_path / "r"), "--log", "wandb")
    assert code == 2 and "invalid choice: 'wandb'" in err and "tensorboard" in err
