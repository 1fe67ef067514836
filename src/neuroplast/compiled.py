"""The numba runtime shared by the compiled kernels (sparse products, MoBA): whether they are
used, and how they are launched."""

from __future__ import annotations

import os
import threading

import torch

try:  # numba is a dependency, but the package must still work where it cannot be imported
    import numba
except ImportError:  # pragma: no cover
    numba = None


def backend() -> str:
    """'numba' if the compiled kernels are in use, else 'torch' (set NEUROPLAST_KERNELS=torch to force)."""
    if numba is None or os.environ.get("NEUROPLAST_KERNELS", "numba") == "torch":
        return "torch"
    return "numba"


_synced = threading.local()  # numba's thread count is per calling thread


def launch(kernel, *args) -> None:
    """Run a compiled kernel on torch's thread count. numba's OpenMP layer shares the OpenMP
    runtime with torch and can leave torch's count changed: put it back."""
    threads = torch.get_num_threads()
    if getattr(_synced, "threads", None) != threads:  # numba.get_num_threads() costs as much as a small kernel
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        _synced.threads = threads
    try:
        kernel(*args)
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


__all__ = ["backend", "launch", "numba"]
