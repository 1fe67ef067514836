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


def test_compare_writes_table_and_figure_and_skips_finished_cells(capsys, tmp_path):
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
        "--quiet",
    ]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    table = (tmp_path / "results.md").read_text()
    assert "| dense | 1.000 | 2 |" in table and "| set | 0.200 | 2 |" in table
    assert (tmp_path / "learning_curves.png").stat().st_size > 1000
    code, out, err = run(capsys, *argv)
    assert code == 0 and "4 of 4 cells already finished" in out
    changed = [a if a != "0.2" else "0.5" for a in argv]
    code, out, err = run(capsys, *changed)  # a changed config is not a finished cell: refused, nothing lost
    assert code == 2 and "different configuration (changed: density)" in err
    assert "| set | 0.200 | 2 |" in (tmp_path / "results.md").read_text()
    code, _, err = run(capsys, "compare", "--methods", "set,nope", "--out", str(tmp_path / "x"))
    assert code == 2 and "unknown method 'nope'" in err


def test_demo_falls_back_to_digits(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "is_available_offline", lambda name: False)
    code, out, err = run(capsys, "demo", "--out", str(tmp_path), "--epochs", "3", "--quiet")
    assert code == 0, err
    assert "training on scikit-learn's 8x8 digits" in out
    for method in ("dense", "static", "set", "rigl"):
        assert method in out
    assert (tmp_path / "digits" / "learning_curves.png").is_file()


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
