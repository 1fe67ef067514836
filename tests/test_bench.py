"""The benchmarks' shared pieces (bench/common.py), and that every benchmark script starts."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
# a benchmark imports bench/common.py as `common` (its folder is on its path); load it by file
_spec = importlib.util.spec_from_file_location("bench_common", BENCH / "common.py")
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)
Report, machine = common.Report, common.machine


def test_machine_line_names_the_instruction_set_and_cores():
    line = machine()  # benchmarks print it in their headers: timings depend on the CPU
    assert line.startswith("CPU: ") and "\n" not in line
    assert f", {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores" in line


def test_report_prints_rows_as_they_come_and_writes_the_table(tmp_path, capsys):
    report = Report(tmp_path / "table.md")
    report.add("header line", "")
    report.table(["model", "ms"])
    report.row("dense", f"{1.5:.2f}")
    assert capsys.readouterr().out == "header line\n\n| model | ms |\n|---|---|\n| dense | 1.50 |\n"
    report.save()
    assert (tmp_path / "table.md").read_text() == "header line\n\n| model | ms |\n|---|---|\n| dense | 1.50 |\n"
    Report().save()  # no path: nothing is written


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py") if p.name != "common.py"))
def test_every_benchmark_starts(script):
    result = subprocess.run(
        [sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
