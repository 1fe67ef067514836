"""CPU kernels for the csr backend (numba), and the torch.sparse reference they replace.

All three products of a sparse Linear are loops over the rows of a CSR pattern whose inner
work is a contiguous vector of the batch, when activations are laid out (features, batch):

    spmm(crow, col, vals, xt) -> out,   out[r] = sum_k vals[k] * xt[col[k]]       (y^T = W x^T)
    the same with W^T's pattern                                                 (dx^T = W^T g^T)
    sddmm(crow, col, gt, xt) -> vals,   vals[k] = gt[r] . xt[col[k]]             (dW at live positions)

Rows are independent, so they run in parallel; each nnz costs one batch-length SIMD
multiply-add, with no index search. `torch.sparse` (MKL spmm + `sampled_addmm`) is the
portable fallback and the test oracle; `backend()` says which is used.
"""

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


if numba is not None:
    _f32 = numba.float32

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _spmm(crow, col, vals, perm, use_perm, bias, use_bias, xt, out):  # pragma: no cover  (compiled)
        """out[r] = bias[r] + sum_k vals[k] xt[col[k]] (vals[perm[k]] with use_perm: W^T from
        W's values). Four nonzeros per pass over the batch vector, accumulated in place in the
        output row (a per-row scratch array costs an allocation per row)."""
        batch = xt.shape[1]
        for r in numba.prange(crow.shape[0] - 1):
            start = bias[r] if use_bias else _f32(0.0)
            for b in range(batch):
                out[r, b] = start
            k, end = crow[r], crow[r + 1]
            while k + 3 < end:
                if use_perm:
                    v0, v1, v2, v3 = vals[perm[k]], vals[perm[k + 1]], vals[perm[k + 2]], vals[perm[k + 3]]
                else:
                    v0, v1, v2, v3 = vals[k], vals[k + 1], vals[k + 2], vals[k + 3]
                c0, c1, c2, c3 = col[k], col[k + 1], col[k + 2], col[k + 3]
                for b in range(batch):
                    out[r, b] += (v0 * xt[c0, b] + v1 * xt[c1, b]) + (v2 * xt[c2, b] + v3 * xt[c3, b])
                k += 4
            while k < end:
                v0 = vals[perm[k]] if use_perm else vals[k]
                c0 = col[k]
                for b in range(batch):
                    out[r, b] += v0 * xt[c0, b]
                k += 1

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _transpose(a, out):  # pragma: no cover  (compiled)
        """out = a^T in 8x8 tiles (constant trip counts: the compiler turns a tile into vector
        shuffles), then the ragged edges element by element. 2-3x faster than torch's copy."""
        n, m = a.shape
        n8, m8 = n - n % 8, m - m % 8
        tiles_j = m8 // 8
        for t in numba.prange((n8 // 8) * tiles_j):
            i0 = (t // tiles_j) * 8
            j0 = (t % tiles_j) * 8
            for j in range(8):
                for i in range(8):
                    out[j0 + j, i0 + i] = a[i0 + i, j0 + j]
        for i in range(n8, n):
            for j in range(m):
                out[j, i] = a[i, j]
        for j in range(m8, m):
            for i in range(n8):
                out[j, i] = a[i, j]

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _sddmm(crow, col, gt, xt, out, row_sums, use_row_sums):  # pragma: no cover  (compiled)
        """out[k] = gt[r] . xt[col[k]]: four dot products per pass share the loads of gt[r];
        float32 accumulators (a float64 one halves the SIMD width). With use_row_sums, also
        row_sums[r] = sum(gt[r]) (the bias gradient), while gt[r] is in cache."""
        batch = xt.shape[1]
        for r in numba.prange(crow.shape[0] - 1):
            if use_row_sums:
                total = _f32(0.0)
                for b in range(batch):
                    total += gt[r, b]
                row_sums[r] = total
            k, end = crow[r], crow[r + 1]
            while k + 3 < end:
                c0, c1, c2, c3 = col[k], col[k + 1], col[k + 2], col[k + 3]
                a0, a1, a2, a3 = _f32(0.0), _f32(0.0), _f32(0.0), _f32(0.0)
                for b in range(batch):
                    g = gt[r, b]
                    a0 += g * xt[c0, b]
                    a1 += g * xt[c1, b]
                    a2 += g * xt[c2, b]
                    a3 += g * xt[c3, b]
                out[k], out[k + 1], out[k + 2], out[k + 3] = a0, a1, a2, a3
                k += 4
            while k < end:
                c0 = col[k]
                a0 = _f32(0.0)
                for b in range(batch):
                    a0 += gt[r, b] * xt[c0, b]
                out[k] = a0
                k += 1


_synced = threading.local()  # numba's thread count is per calling thread


def _launch(kernel, *args) -> None:
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


def transposed(a: torch.Tensor) -> torch.Tensor:
    """a^T as a contiguous tensor; free when a is already a transposed view of one."""
    if a.t().is_contiguous():
        return a.t()
    if backend() == "numba" and a.is_contiguous() and a.device.type == "cpu" and a.dtype == torch.float32:
        out = torch.empty(a.shape[1], a.shape[0], dtype=a.dtype)
        _launch(_transpose, a.detach().numpy(), out.numpy())
        return out
    return a.t().contiguous()


def spmm_t(
    pattern: CSRArrays,
    vals: torch.Tensor,
    xt: torch.Tensor,
    rows: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """bias[:, None] + W @ xt, (rows, batch), for W = CSR(pattern, vals[pattern.perm] if the
    pattern has a permutation else vals); xt is (columns of W, batch)."""
    xt = xt.contiguous()
    if backend() == "numba" and xt.device.type == "cpu" and xt.dtype == torch.float32:
        out = torch.empty(rows, xt.shape[1], dtype=xt.dtype)
        crow, col, perm = pattern.numpy()
        bias_np = (bias if bias is not None else vals).detach().numpy()
        _launch(
            _spmm,
            crow,
            col,
            vals.detach().numpy(),
            perm,
            pattern.perm is not None,
            bias_np,
            bias is not None,
            xt.numpy(),
            out.numpy(),
        )
        return out
    values = vals[pattern.perm] if pattern.perm is not None else vals
    out = torch.sparse.mm(_csr(pattern.crow, pattern.col, values, (rows, xt.shape[0])), xt)
    return out + bias.detach()[:, None] if bias is not None else out


def sddmm(
    pattern: CSRArrays, gt: torch.Tensor, xt: torch.Tensor, row_sums: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(gt @ xt^T) at the positions of the pattern, in pattern order; gt is (rows, batch).
    With row_sums, also gt.sum(1) (a Linear's bias gradient), as a second result."""
    gt, xt = gt.contiguous(), xt.contiguous()
    if backend() == "numba" and xt.device.type == "cpu" and xt.dtype == torch.float32:
        out = torch.empty(pattern.col.numel(), dtype=xt.dtype)
        sums = torch.empty(gt.shape[0] if row_sums else 0, dtype=xt.dtype)
        crow, col, _ = pattern.numpy()
        _launch(_sddmm, crow, col, gt.numpy(), xt.numpy(), out.numpy(), sums.numpy(), row_sums)
        return (out, sums) if row_sums else out
    zeros = torch.zeros(pattern.col.numel(), dtype=xt.dtype, device=xt.device)
    weights = _csr(pattern.crow, pattern.col, zeros, (gt.shape[0], xt.shape[0]))
    out = torch.sparse.sampled_addmm(weights, gt, xt.t().contiguous(), beta=0.0).values()
    return (out, gt.sum(1)) if row_sums else out


class CSRArrays:
    """A CSR pattern (crow, col) and, for a transposed pattern, the permutation that takes the
    original values to its order. Keeps numpy views for the kernels (made once per topology)."""

    def __init__(self, crow: torch.Tensor, col: torch.Tensor, perm: torch.Tensor | None = None):
        self.crow, self.col, self.perm = crow, col, perm
        self._numpy = None

    def numpy(self):
        if self._numpy is None:
            self._numpy = (
                self.crow.numpy(),
                self.col.numpy(),
                (self.perm if self.perm is not None else self.crow).numpy(),
            )
        return self._numpy


def _csr(crow, col, vals, shape) -> torch.Tensor:
    """A CSR tensor of arrays built by the csr backend (sorted, in range): skip the O(nnz)
    validation unless a caller turns it on with `torch.sparse.check_sparse_tensor_invariants`."""
    check = torch.sparse.check_sparse_tensor_invariants.is_enabled()
    return torch.sparse_csr_tensor(crow, col, vals, shape, check_invariants=check)


__all__ = ["CSRArrays", "backend", "sddmm", "spmm_t", "transposed"]
