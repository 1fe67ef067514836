"""Training behaviour is pinned: for seed 0, `neuroplast train` with every DST preset, on every
backend the preset runs on, writes the stored `metrics.jsonl` (every field but the times).

A change to the DST engine, its parts or the way settings reach them that moves any number
fails here. Each case also passes knobs through the command line, so the path from a flag to
the part that uses it is pinned too. To record the fixtures again (only for an intended change
of behaviour, said in the commit): `python tests/test_behaviour_unchanged.py`.
"""

from __future__ import annotations

import gzip
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from neuroplast.cli import main

FIXTURES = Path(__file__).parent / "fixtures"
TIME_FIELDS = ("seconds", "train_seconds")
BACKENDS = ("masked", "csr")
CSR_UNSUPPORTED = {"snfs"}  # a dense gradient momentum at every position needs the masked backend

# (case name, method, extra flags): every preset with its own settings, then every knob set from
# the command line (each exercising several topology updates on this small run)
CASES = [
    ("dense", "dense", ""),
    ("static", "static", ""),
    ("set", "set", ""),
    ("rigl", "rigl", ""),
    ("snfs", "snfs", ""),
    ("mest", "mest", ""),
    ("ctre", "ctre", ""),
    ("ctre-seq", "ctre-seq", ""),
    ("wast", "wast", ""),
    ("dast", "dast", ""),
    ("dast-no-anneal", "dast-no-anneal", ""),
    ("set-schedule", "set", "--drop-fraction 0.2 --drop-anneal cosine --update-every 20 --end-fraction 0.6"),
    ("rigl-often", "rigl", "--update-every 25"),
    ("mest-gradient", "mest", "--drop-lambda 0.5"),
    ("ctre-seq-switch", "ctre-seq", "--switch-patience 1 --activation-samples 64"),
    ("wast-knobs", "wast", "--importance-lambda 0.7 --importance-decay 0.9 --update-every 10"),
    ("dast-knobs", "dast", "--tau-start 2.0 --tau-end 0.5 --random-start 0.3 --random-end 0.1 --update-every 30"),
]
DIGITS = "--dataset digits --hidden 64,32 --density 0.2 --epochs 4 --batch-size 32"
FASHION_MNIST = "--dataset fashion-mnist --hidden 256,128 --density 0.1 --epochs 2 --batch-size 128"
FASHION_CASES = [case for case in CASES if case[0] == case[1]]  # the presets as they are


def runs_on(method: str, backend: str) -> bool:
    return backend == "masked" or method not in CSR_UNSUPPORTED


def record(method: str, backend: str, flags: str, data: str, out: Path) -> list[dict]:
    """metrics.jsonl of one seed-0 `neuroplast train` run, without its time fields."""
    torch.set_num_threads(1)
    argv = ["train", "--method", method, "--backend", backend, "--seed", "0", "--out", str(out), "--quiet"]
    assert main(argv + data.split() + flags.split()) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIME_FIELDS} for line in lines]


def assert_same(got, want, where: str = "metrics") -> None:
    """Equal structure, ints and strings exactly, floats to a relative 1e-6."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for key in want:
            assert_same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert isinstance(got, (int, float)) and math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9), (
            f"{where}: {got!r} != {want!r}"
        )
    else:
        assert type(got) is type(want) and got == want, f"{where}: {got!r} != {want!r}"


def cases(table: list) -> list:
    return [
        pytest.param(name, method, flags, backend, id=f"{name}-{backend}")
        for name, method, flags in table
        for backend in BACKENDS
        if runs_on(method, backend)
    ]


def check(fixture: str, data: str, name: str, method: str, flags: str, backend: str, tmp_path: Path):
    want = json.loads(gzip.decompress((FIXTURES / fixture).read_bytes()))[f"{name}-{backend}"]
    assert_same(record(method, backend, flags, data, tmp_path), want)


@pytest.mark.parametrize(("name", "method", "flags", "backend"), cases(CASES))
def test_digits_metrics_unchanged(name, method, flags, backend, tmp_path):
    check("behaviour_digits.json.gz", DIGITS, name, method, flags, backend, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "method", "flags", "backend"), cases(FASHION_CASES))
def test_fashion_mnist_metrics_unchanged(name, method, flags, backend, tmp_path):
    check("behaviour_fashion_mnist.json.gz", FASHION_MNIST, name, method, flags, backend, tmp_path)


def write_fixture(fixture: str, data: str, table: list) -> None:
    import tempfile

    recorded = {}
    for param in cases(table):
        name, method, flags, backend = param.values
        with tempfile.TemporaryDirectory() as out:
            recorded[f"{name}-{backend}"] = record(method, backend, flags, data, Path(out))
        print(f"recorded {name}-{backend}", flush=True)
    text = json.dumps(significant(recorded), separators=(",", ":")) + "\n"
    (FIXTURES / fixture).write_bytes(gzip.compress(text.encode(), mtime=0))


def significant(value):
    """Floats to 10 significant digits (the check is to 1e-6): a smaller fixture."""
    if isinstance(value, float):
        return float(f"{value:.10g}")
    if isinstance(value, dict):
        return {k: significant(v) for k, v in value.items()}
    if isinstance(value, list):
        return [significant(v) for v in value]
    return value


if __name__ == "__main__":
    which = sys.argv[1:] or ["digits", "fashion-mnist"]
    FIXTURES.mkdir(exist_ok=True)
    if "digits" in which:
        write_fixture("behaviour_digits.json.gz", DIGITS, CASES)
    if "fashion-mnist" in which:
        write_fixture("behaviour_fashion_mnist.json.gz", FASHION_MNIST, FASHION_CASES)
