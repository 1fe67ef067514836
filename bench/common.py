"""What the benchmarks share: the machine line of their headers, the table writer, the memory
setting. A benchmark runs as `python bench/<name>.py`, so it imports this as `common`."""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Sequence
from pathlib import Path

import torch


def machine(device: str | torch.device = "cpu") -> str:
    """The hardware that timings come from, in one line for a benchmark's header: for the CPU its
    model name, the widest vector instruction set PyTorch's kernels use on it, and its cores; for
    a CUDA device its name."""
    if torch.device(device).type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {model}, {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores"


class Report:
    """A benchmark's output: lines printed as they come (flushed, so a long run shows its rows)
    and kept, then written as markdown to `out` by `save()` when a path is given."""

    def __init__(self, out: str | Path | None = None):
        self.out = out
        self.lines: list[str] = []

    def add(self, *lines: str) -> None:
        for line in lines:
            print(line, flush=True)
        self.lines.extend(lines)

    def table(self, columns: Sequence[str]) -> None:
        """A markdown table's header and separator."""
        self.add("| " + " | ".join(columns) + " |", "|---" * len(columns) + "|")

    def row(self, *cells: object) -> None:
        self.add("| " + " | ".join(map(str, cells)) + " |")

    def save(self) -> None:
        if self.out:
            Path(self.out).write_text("\n".join(self.lines) + "\n")


def keep_freed_memory() -> bool:
    """glibc: serve blocks under 1 GiB from the heap and never trim it, so freed memory stays in
    the process for the next allocation (as jemalloc or tcmalloc would) instead of being faulted
    in afresh by each implementation in turn; for the rest of the process. False where the C
    library is not glibc. (`neuroplast.sparse.retain_freed_memory` does the same for a block of
    training code.)"""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


__all__ = ["Report", "keep_freed_memory", "machine"]
