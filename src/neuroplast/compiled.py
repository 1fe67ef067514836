"""The numba runtime shared by the compiled kernels (sparse products, MoBA): whether they are
used, and how they are launched. numba is imported on first use (a kernel call, or a question
to `backend()`), not with the package: it costs more to import than the rest of neuroplast."""

from __future__ import annotations

import functools
import os
import threading
from types import ModuleType

import torch


@functools.cache
def load_numba() -> ModuleType | None:
    """The numba module, imported once; None where it cannot be imported (numba is a dependency,
    but the package must still work without it)."""
    try:
        import numba
    except ImportError:  # pragma: no cover
        return None
    return numba


def backend() -> str:
    """'numba' if the compiled kernels are in use, else 'torch' (set NEUROPLAST_KERNELS=torch to force)."""
    if os.environ.get("NEUROPLAST_KERNELS", "numba") == "torch" or load_numba() is None:
        return "torch"
    return "numba"


_synced = threading.local()  # numba's thread count is per calling thread


def launch(kernel, *args) -> None:
    """Run a compiled kernel on torch's thread count. numba's OpenMP layer shares the OpenMP
    runtime with torch and can leave torch's count changed: put it back."""
    threads = torch.get_num_threads()
    if getattr(_synced, "threads", None) != threads:  # numba.get_num_threads() costs as much as a small kernel
        numba = load_numba()
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        _synced.threads = threads
    try:
        kernel(*args)
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


__all__ = ["backend", "launch", "load_numba"]
