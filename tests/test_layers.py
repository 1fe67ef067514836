"""The house's layers (DESIGN.md): the import-linter contracts in pyproject.toml hold, and they do
fail on an upward import or an import cycle; importing neuroplast (and its command line) leaves
the libraries that take long to import to the functions that use them."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

needs_import_linter = pytest.mark.skipif(
    importlib.util.find_spec("importlinter") is None,
    reason='import-linter is not installed (pip install -e ".[test]")',
)


def lint_imports(src: Path) -> subprocess.CompletedProcess:
    """`lint-imports` with the contracts of pyproject.toml, over the package found in `src`."""
    command = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run(
        [sys.executable, "-c", command, "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(src)},
        capture_output=True,
        text=True,
    )


@needs_import_linter
def test_the_contracts_hold():
    result = lint_imports(ROOT / "src")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_import_linter
@pytest.mark.parametrize(
    "files,broken",
    [
        ({"data/upward.py": "from neuroplast.train import RunConfig\n"}, "Layers"),
        ({"sparse/sideways.py": "from neuroplast.attention import moba_attention\n"}, "Layers"),
        (
            {
                "sparse/first.py": "from neuroplast.sparse import second\n",
                "sparse/second.py": "import neuroplast.sparse.first\n",
            },
            "No import cycles",
        ),
    ],
)
def test_the_contracts_fail_on_an_upward_import_or_a_cycle(tmp_path, files, broken):
    shutil.copytree(ROOT / "src" / "neuroplast", tmp_path / "neuroplast", ignore=shutil.ignore_patterns("__pycache__"))
    for name, text in files.items():
        (tmp_path / "neuroplast" / name).write_text(text)
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert broken in result.stdout.split("Broken contracts", 1)[1]


def test_import_neuroplast_leaves_slow_imports_to_the_functions_that_use_them():
    slow = ("matplotlib", "sklearn", "rich", "tensorboard", "numba", "scipy", "networkx")
    script = (
        "import sys, neuroplast, neuroplast.cli, neuroplast.experiments, neuroplast.train, neuroplast.data; "
        f"print(sorted(m for m in {slow!r} if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
