"""The csr backend's products: CPU kernels in numba (`sparse/numba_kernels.py`, imported when a
product first runs on them) and the torch.sparse reference they replace.

All three products of a sparse Linear are loops over the rows of a CSR pattern whose inner
work is a contiguous vector of the batch, when activations are laid out (features, batch):

    spmm(crow, col, vals, xt) -> out,   out[r] = sum_k vals[k] * xt[col[k]]       (y^T = W x^T)
    the same with W^T's pattern                                                 (dx^T = W^T g^T)
    sddmm(crow, col, gt, xt) -> vals,   vals[k] = gt[r] . xt[col[k]]             (dW at live positions)

Rows are independent, so they run in parallel; each nnz costs one batch-length SIMD
multiply-add, with no index search. When a layer needs both backward products, `backward_t`
computes them in one pass over W^T's rows (each live weight then reads one random gradient row
instead of a gradient row and an activation row), with the values gathered into W^T's order
first and the gradient gathered back after. In very wide layers the rows read are far
apart in matrices much larger than the caches, so the kernels request the row needed a few
nonzeros ahead (`_prefetch`). `torch.sparse` (MKL spmm + `sampled_addmm`) is the portable
fallback and the test oracle; `backend()` says which is used.

Activations and their gradients may be float32 or bfloat16 (what `torch.autocast` asks a
Linear for); the values and the weight gradient stay float32, and every sum is accumulated in
float32. The kernels are written once: `_load` widens an element of either type, and an output
row of bfloat16 is summed in a float32 row of the running thread (made by the caller: a
kernel that allocates fragments the heap), then rounded to nearest even.
bfloat16 halves the bytes of the random row reads that set the pace in wide layers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from neuroplast.compiled import backend, launch, load_numba

FEW_ROWS = 64  # layers with at most this many outputs use spmm_by_columns in the forward pass ...
FEW_ROWS_INPUT = 1 << 20  # ... when the input (features x batch) is this large (4 MiB): a smaller one
# stays in cache while each row streams it, and the row-parallel kernel has less overhead


@contextlib.contextmanager
def retain_freed_memory() -> Iterator[bool]:
    """Inside the block, the C allocator keeps freed memory for reuse instead of returning it to
    the system (glibc only; process-wide). Yields whether it took effect; on exit the defaults
    come back and the retained memory is released.

    glibc serves every allocation over 32 MiB with a fresh mapping and unmaps it when freed, so
    a model whose activations are hundreds of MB page-faults its way through every step: in a
    1M-neuron SET-MLP, 0.6 s of a 2.7 s step went to ReLU and its backward, 10 ms each inside
    this block. Wrap the training loop of very wide truly sparse models in it
    (`bench/scale_set_mlp.py` does); the process holds its peak heap until the block ends."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        yield False
        return
    m_trim_threshold, m_mmap_max = -1, -4
    active = bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
    try:
        yield active
    finally:
        mallopt(m_mmap_max, 65536)  # glibc's defaults
        mallopt(m_trim_threshold, 128 * 1024)
        malloc_trim(0)


def _kernels():
    """The numba kernels (`sparse/numba_kernels.py`), imported, and so compiled or read from
    numba's cache, when a product first runs on them."""
    from neuroplast.sparse import numba_kernels

    return numba_kernels


ACTIVATION_DTYPES = (torch.float32, torch.bfloat16)  # what the numba kernels take for activations and gradients


def _empty(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised CPU tensor (float32 or bfloat16) for a kernel's output. numpy's
    allocator backs large arrays with transparent huge pages where the kernel allows it
    (torch's does not by default), so a fresh 100 MB output costs a few dozen page faults
    instead of tens of thousands."""
    if dtype == torch.bfloat16:
        return torch.from_numpy(np.empty(shape, dtype=np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.empty(shape, dtype=np.float32))


def _sums(out: torch.Tensor) -> np.ndarray:
    """Where a kernel sums the rows of its activation output `out`: out itself (float32), or
    one float32 row per numba thread, rounded into out row by row (bfloat16)."""
    if out.dtype == torch.float32:
        return out.numpy()
    return np.empty((load_numba().config.NUMBA_NUM_THREADS, out.shape[1]), dtype=np.float32)


def _np(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as the numpy array the kernels take (bfloat16 as its uint16 bits)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _compiled(values_dtype: torch.dtype, *activations: torch.Tensor) -> bool:
    """Whether the numba kernels take these operands: float32 values, float32 or bfloat16
    activations, on the CPU."""
    return (
        backend() == "numba"
        and values_dtype == torch.float32
        and all(a.device.type == "cpu" and a.dtype in ACTIVATION_DTYPES for a in activations)
    )


def transposed(a: torch.Tensor) -> torch.Tensor:
    """a^T as a contiguous tensor; free when a is already a transposed view of one."""
    if a.t().is_contiguous():
        return a.t()
    if a.is_contiguous() and _compiled(torch.float32, a):
        out = _empty(a.shape[1], a.shape[0], dtype=a.dtype)
        launch(_kernels().transpose, _np(a), _np(out))
        return out
    return a.t().contiguous()


def spmm_t(
    pattern: CSRArrays,
    vals: torch.Tensor,
    xt: torch.Tensor,
    rows: int,
    bias: torch.Tensor | None = None,
    pattern_t: CSRArrays | None = None,
) -> torch.Tensor:
    """bias[:, None] + W @ xt, (rows, batch), for W = CSR(pattern, vals[pattern.perm] if the
    pattern has a permutation else vals); xt is (columns of W, batch), and the result has its
    dtype (a bfloat16 result is summed in float32, then rounded). Given W^T's pattern too, a
    layer with few rows is computed column by column (see numba_kernels.spmm_by_columns)."""
    xt = xt.contiguous()
    if _compiled(vals.dtype, xt):
        if pattern_t is not None and pattern.perm is None and rows <= FEW_ROWS and xt.numel() >= FEW_ROWS_INPUT:
            chunks = 4 * torch.get_num_threads()
            partial = _empty(chunks, rows, xt.shape[1])
            crow_t, col_t, perm = pattern_t.numpy()
            launch(_kernels().spmm_by_columns, crow_t, col_t, perm, _np(vals), _np(xt), _np(partial))
            out = partial.sum(0)
            out = out + bias.detach()[:, None] if bias is not None else out
            return out.to(xt.dtype)
        out = _empty(rows, xt.shape[1], dtype=xt.dtype)
        crow, col, perm = pattern.numpy()
        bias_np = _np(bias if bias is not None else vals)
        use_perm, use_bias = pattern.perm is not None, bias is not None
        args = (crow, col, _np(vals), perm, use_perm, bias_np, use_bias, _np(xt), _np(out), _sums(out))
        launch(_kernels().spmm, *args)
        return out
    values = vals[pattern.perm] if pattern.perm is not None else vals
    matrix = _csr(pattern.crow, pattern.col, values.detach(), (rows, xt.shape[0]))
    out = torch.sparse.mm(matrix, xt.to(vals.dtype))
    out = out + bias.detach()[:, None] if bias is not None else out
    return out.to(xt.dtype)


def sddmm(
    pattern: CSRArrays, gt: torch.Tensor, xt: torch.Tensor, row_sums: bool = False, dtype: torch.dtype = torch.float32
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(gt @ xt^T) at the positions of the pattern, in pattern order, as `dtype` (the values');
    gt is (rows, batch). With row_sums, also gt.sum(1) (a Linear's bias gradient), as a second
    result. Sums run in float32 at least, whatever the activations' dtype."""
    gt, xt = gt.contiguous(), xt.contiguous()
    if _compiled(dtype, gt, xt):
        out = _empty(pattern.col.numel())
        sums = _empty(gt.shape[0] if row_sums else 0)
        crow, col, _ = pattern.numpy()
        launch(_kernels().sddmm, crow, col, _np(gt), _np(xt), _np(out), _np(sums), row_sums)
        return (out, sums) if row_sums else out
    gt, xt = gt.to(dtype), xt.to(dtype)  # torch.sparse computes in one dtype
    zeros = torch.zeros(pattern.col.numel(), dtype=dtype, device=xt.device)
    weights = _csr(pattern.crow, pattern.col, zeros, (gt.shape[0], xt.shape[0]))
    out = torch.sparse.sampled_addmm(weights, gt, xt.t().contiguous(), beta=0.0).values()
    return (out, gt.sum(1)) if row_sums else out


def backward_t(
    pattern: CSRArrays, pattern_t: CSRArrays, vals: torch.Tensor, gt: torch.Tensor, xt: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both backward products of y^T = W xt: (W^T gt, in gt's dtype; (gt xt^T) at W's
    positions, in W's order, in the values' dtype). With the numba kernels: the values are
    gathered into W^T's order, one pass over W^T's pattern computes both products, and the
    weight gradient is gathered back into W's order. (Reading and writing the values through
    the permutation inside the pass, at random places in arrays far larger than the caches,
    was 1.1-1.25x slower in a 333k x 333k layer; two plain gathers cost less.) spmm_t + sddmm
    otherwise."""
    gt, xt = gt.contiguous(), xt.contiguous()
    if _compiled(vals.dtype, gt, xt):
        nnz = pattern.col.numel()
        dxt = _empty(xt.shape[0], xt.shape[1], dtype=gt.dtype)
        in_t_order, dvals = _empty(nnz), _empty(nnz)  # the kernel overwrites each value with its gradient
        crow_t, col_t, perm = pattern_t.numpy()
        launch(_kernels().gather, _np(vals), perm, in_t_order.numpy())
        work = in_t_order.numpy()
        launch(_kernels().backward_t, crow_t, col_t, work, _np(gt), _np(xt), _np(dxt), work, _sums(dxt))
        launch(_kernels().gather, work, pattern_t.inverse(), dvals.numpy())
        return dxt, dvals
    return spmm_t(pattern_t, vals, gt, xt.shape[0]), sddmm(pattern, gt, xt, dtype=vals.dtype)


def inverse_dtype(nnz: int) -> torch.dtype:
    """Index type of the inverse permutation of `nnz` values: int32 when it fits (half the
    memory and the traffic of the gather that reads it)."""
    return torch.int32 if nnz < 2**31 else torch.int64


class CSRArrays:
    """A CSR pattern (crow, col) and, for a transposed pattern, the permutation that takes the
    original values to its order. Keeps numpy views for the kernels (made once per topology)."""

    def __init__(self, crow: torch.Tensor, col: torch.Tensor, perm: torch.Tensor | None = None):
        self.crow, self.col, self.perm = crow, col, perm
        self._numpy = None
        self._inverse = None

    def numpy(self):
        if self._numpy is None:
            self._numpy = (
                self.crow.numpy(),
                self.col.numpy(),
                (self.perm if self.perm is not None else self.crow).numpy(),
            )
        return self._numpy

    def inverse(self) -> np.ndarray:
        """The inverse permutation (this order -> the original), as numpy (see inverse_dtype)."""
        if self._inverse is None:
            if self.perm is None:
                raise ValueError("a pattern without a permutation has no inverse")
            n = self.perm.numel()
            dtype = inverse_dtype(n)
            inverse = torch.empty(n, dtype=dtype, device=self.perm.device)
            inverse[self.perm] = torch.arange(n, dtype=dtype, device=self.perm.device)
            self._inverse = inverse.numpy()
        return self._inverse


def _csr(crow, col, vals, shape) -> torch.Tensor:
    """A CSR tensor of arrays built by the csr backend (sorted, in range): skip the O(nnz)
    validation unless a caller turns it on with `torch.sparse.check_sparse_tensor_invariants`."""
    check = torch.sparse.check_sparse_tensor_invariants.is_enabled()
    return torch.sparse_csr_tensor(crow, col, vals, shape, check_invariants=check)


__all__ = ["CSRArrays", "backend", "backward_t", "retain_freed_memory", "sddmm", "spmm_t", "transposed"]
