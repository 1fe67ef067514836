"""Grids of runs (studies; `compare` is a study of one density), their tables and figures."""

from neuroplast.experiments.report import load_cell, plot_study_curves, study_markdown, study_rows
from neuroplast.experiments.study import compare_study, load_study, run_study, write_report

__all__ = [
    "compare_study",
    "load_cell",
    "load_study",
    "plot_study_curves",
    "run_study",
    "study_markdown",
    "study_rows",
    "write_report",
]
