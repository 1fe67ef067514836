"""Tables and figures from finished runs (reads run folders; never trains)."""

from neuroplast.experiments.report import (
    load_run,
    markdown_table,
    plot_learning_curves,
    print_table,
    summarize,
)

__all__ = ["load_run", "markdown_table", "plot_learning_curves", "print_table", "summarize"]
