"""CPU kernels for the csr backend (numba), and the torch.sparse reference they replace.

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

from neuroplast.compiled import backend, numba
from neuroplast.compiled import launch as _launch

PREFETCH_AHEAD = 8  # nonzeros: the activation row needed this many nonzeros later is requested now


if numba is not None:
    from llvmlite import ir as _ir
    from numba.core import cgutils as _cgutils
    from numba.extending import intrinsic as _intrinsic
    from numba.extending import overload as _overload

    _f32 = numba.float32

    @_intrinsic
    def _prefetch(typingctx, flat, index):  # pragma: no cover  (compiled)
        """Ask the CPU to start loading flat[index] into cache (a hint: never faults). The
        products read one activation row per nonzero at a random place in a matrix far larger
        than the caches; requesting the row a few nonzeros ahead overlaps those misses."""
        sig = numba.types.void(flat, index)

        def codegen(context, builder, signature, args):
            array = context.make_array(signature.args[0])(context, builder, args[0])
            offset = context.cast(builder, args[1], signature.args[1], numba.types.intp)
            pointer = builder.gep(array.data, [offset])
            if not getattr(pointer.type, "is_opaque", False):  # LLVM with typed pointers
                pointer = builder.bitcast(pointer, _ir.IntType(8).as_pointer())
                name = "llvm.prefetch.p0i8"
            else:
                name = "llvm.prefetch.p0"
            i32 = _ir.IntType(32)
            fn = _cgutils.get_or_insert_function(
                builder.module, _ir.FunctionType(_ir.VoidType(), [pointer.type, i32, i32, i32]), name
            )
            builder.call(fn, [pointer, i32(0), i32(3), i32(1)])  # read, keep in all levels, data
            return context.get_dummy_value()

        return sig, codegen

    @_intrinsic
    def _bf16_to_f32(typingctx, bits):  # pragma: no cover  (compiled)
        """The float32 of a bfloat16 held as uint16: its bits are the float's upper half."""
        sig = numba.float32(bits)

        def codegen(context, builder, signature, args):
            i32 = _ir.IntType(32)
            return builder.bitcast(builder.shl(builder.zext(args[0], i32), i32(16)), _ir.FloatType())

        return sig, codegen

    @_intrinsic
    def _f32_to_bf16(typingctx, value):  # pragma: no cover  (compiled)
        """float32 -> bfloat16 bits (uint16), rounded to nearest even as torch rounds; a NaN
        stays a (quiet) NaN, where plain rounding could carry it into the sign bit."""
        sig = numba.uint16(value)

        def codegen(context, builder, signature, args):
            i32 = _ir.IntType(32)
            bits = builder.bitcast(args[0], i32)
            odd = builder.and_(builder.lshr(bits, i32(16)), i32(1))
            rounded = builder.lshr(builder.add(bits, builder.add(i32(0x7FFF), odd)), i32(16))
            nan = builder.icmp_unsigned(">", builder.and_(bits, i32(0x7FFFFFFF)), i32(0x7F800000))
            quiet = builder.or_(builder.lshr(bits, i32(16)), i32(0x40))
            return builder.trunc(builder.select(nan, quiet, rounded), _ir.IntType(16))

        return sig, codegen

    def _load(element):  # pragma: no cover  (compiled: see the overload)
        """An activation element as float32 (float32 as is; bfloat16, held as uint16, widened)."""

    @_overload(_load, inline="always")
    def _load_impl(element):
        if element == numba.types.uint16:
            return lambda element: _bf16_to_f32(element)
        return lambda element: element

    def _slot(out, r, t):  # pragma: no cover  (compiled: see the overload)
        """The row of acc where output row r is summed: r when out is float32 (acc is out
        itself), the running thread's t when out is bfloat16 (acc is a float32 scratch)."""

    @_overload(_slot, inline="always")
    def _slot_impl(out, r, t):
        if out.dtype == numba.types.uint16:
            return lambda out, r, t: t
        return lambda out, r, t: r

    def _flush(out, r, acc, t):  # pragma: no cover  (compiled: see the overload)
        """Round the row summed in acc[t] into out[r] (bfloat16; a float32 row was summed in
        place)."""

    @_overload(_flush, inline="always")
    def _flush_impl(out, r, acc, t):
        if out.dtype == numba.types.uint16:

            def to_bf16(out, r, acc, t):
                for b in range(out.shape[1]):
                    out[r, b] = _f32_to_bf16(acc[t, b])

            return to_bf16
        return lambda out, r, acc, t: None

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _spmm(crow, col, vals, perm, use_perm, bias, use_bias, xt, out, acc):  # pragma: no cover  (compiled)
        """out[r] = bias[r] + sum_k vals[k] xt[col[k]] (vals[perm[k]] with use_perm: W^T from
        W's values). Four nonzeros per pass over the batch vector, summed in place in the output
        row (acc is out, float32) or in the running thread's row of a float32 acc, then
        rounded into out (bfloat16)."""
        batch = xt.shape[1]
        flat = xt.reshape(-1)
        last = col.shape[0] - PREFETCH_AHEAD - 4
        for r in numba.prange(crow.shape[0] - 1):
            i = _slot(out, r, numba.get_thread_id())
            start = bias[r] if use_bias else _f32(0.0)
            for b in range(batch):
                acc[i, b] = start
            k, end = crow[r], crow[r + 1]
            while k + 3 < end:
                if k < last:
                    for q in range(4):
                        _prefetch(flat, col[k + PREFETCH_AHEAD + q] * batch)
                if use_perm:
                    v0, v1, v2, v3 = vals[perm[k]], vals[perm[k + 1]], vals[perm[k + 2]], vals[perm[k + 3]]
                else:
                    v0, v1, v2, v3 = vals[k], vals[k + 1], vals[k + 2], vals[k + 3]
                c0, c1, c2, c3 = col[k], col[k + 1], col[k + 2], col[k + 3]
                for b in range(batch):
                    acc[i, b] += (v0 * _load(xt[c0, b]) + v1 * _load(xt[c1, b])) + (
                        v2 * _load(xt[c2, b]) + v3 * _load(xt[c3, b])
                    )
                k += 4
            while k < end:
                v0 = vals[perm[k]] if use_perm else vals[k]
                c0 = col[k]
                for b in range(batch):
                    acc[i, b] += v0 * _load(xt[c0, b])
                k += 1
            _flush(out, r, acc, i)

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
        flat = xt.reshape(-1)
        last = col.shape[0] - PREFETCH_AHEAD - 4
        for r in numba.prange(crow.shape[0] - 1):
            if use_row_sums:
                total = _f32(0.0)
                for b in range(batch):
                    total += _load(gt[r, b])
                row_sums[r] = total
            k, end = crow[r], crow[r + 1]
            while k + 3 < end:
                if k < last:
                    for q in range(4):
                        _prefetch(flat, col[k + PREFETCH_AHEAD + q] * batch)
                c0, c1, c2, c3 = col[k], col[k + 1], col[k + 2], col[k + 3]
                a0, a1, a2, a3 = _f32(0.0), _f32(0.0), _f32(0.0), _f32(0.0)
                for b in range(batch):
                    g = _load(gt[r, b])
                    a0 += g * _load(xt[c0, b])
                    a1 += g * _load(xt[c1, b])
                    a2 += g * _load(xt[c2, b])
                    a3 += g * _load(xt[c3, b])
                out[k], out[k + 1], out[k + 2], out[k + 3] = a0, a1, a2, a3
                k += 4
            while k < end:
                c0 = col[k]
                a0 = _f32(0.0)
                for b in range(batch):
                    a0 += _load(gt[r, b]) * _load(xt[c0, b])
                out[k] = a0
                k += 1


if numba is not None:

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _backward_t(crow_t, col_t, vals_t, gt, xt, dxt, dvals_t, acc):  # pragma: no cover  (compiled)
        """Both backward products in one pass over W^T's rows (one per input feature j), with
        W^T's values vals_t in W^T's order: dxt[j] = sum_p vals_t[p] gt[col_t[p]] and
        dvals_t[p] = gt[col_t[p]] . xt[j] (dvals_t may be vals_t itself: each value is read
        before its gradient is written). Each live weight reads its gradient row once for
        both, where separate kernels read a random gradient row (dx) and a random activation
        row (dW): one random row per weight instead of two. xt[j] and the row where dxt[j] is
        summed (itself, acc being dxt, or the thread's row of a float32 acc when dxt is bfloat16)
        stay in cache for the whole row; the values are read and written in order."""
        batch = xt.shape[1]
        flat = gt.reshape(-1)
        last = col_t.shape[0] - PREFETCH_AHEAD - 4
        for j in numba.prange(crow_t.shape[0] - 1):
            i = _slot(dxt, j, numba.get_thread_id())
            for b in range(batch):
                acc[i, b] = _f32(0.0)
            p, end = crow_t[j], crow_t[j + 1]
            while p + 3 < end:
                if p < last:
                    for q in range(4):
                        _prefetch(flat, col_t[p + PREFETCH_AHEAD + q] * batch)
                i0, i1, i2, i3 = col_t[p], col_t[p + 1], col_t[p + 2], col_t[p + 3]
                w0, w1, w2, w3 = vals_t[p], vals_t[p + 1], vals_t[p + 2], vals_t[p + 3]
                a0, a1, a2, a3 = _f32(0.0), _f32(0.0), _f32(0.0), _f32(0.0)
                for b in range(batch):
                    x = _load(xt[j, b])
                    g0, g1, g2, g3 = _load(gt[i0, b]), _load(gt[i1, b]), _load(gt[i2, b]), _load(gt[i3, b])
                    acc[i, b] += (w0 * g0 + w1 * g1) + (w2 * g2 + w3 * g3)
                    a0 += g0 * x
                    a1 += g1 * x
                    a2 += g2 * x
                    a3 += g3 * x
                dvals_t[p], dvals_t[p + 1], dvals_t[p + 2], dvals_t[p + 3] = a0, a1, a2, a3
                p += 4
            while p < end:
                i0 = col_t[p]
                w0 = vals_t[p]
                a0 = _f32(0.0)
                for b in range(batch):
                    g0 = _load(gt[i0, b])
                    acc[i, b] += w0 * g0
                    a0 += g0 * _load(xt[j, b])
                dvals_t[p] = a0
                p += 1
            _flush(dxt, j, acc, i)

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _gather(source, index, out):  # pragma: no cover  (compiled)
        """out[p] = source[index[p]]: independent loads, which the CPU overlaps by itself."""
        for p in numba.prange(out.shape[0]):
            out[p] = source[index[p]]


if numba is not None:

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _spmm_by_columns(crow_t, col_t, perm, vals, xt, partial):  # pragma: no cover  (compiled)
        """partial[c] = the part of W xt from the c-th range of W's columns, walking W^T's rows.
        For a layer with few outputs (a classifier head): parallel over rows would give each
        thread a handful of rows and stream all of xt once per row; this reads xt once, and
        each thread's accumulator (rows x batch) stays in cache."""
        chunks, batch = partial.shape[0], xt.shape[1]
        n_in = crow_t.shape[0] - 1
        for c in numba.prange(chunks):
            for r in range(partial.shape[1]):
                for b in range(batch):
                    partial[c, r, b] = _f32(0.0)
            for j in range(c * n_in // chunks, (c + 1) * n_in // chunks):
                for p in range(crow_t[j], crow_t[j + 1]):
                    w, r = vals[perm[p]], col_t[p]
                    for b in range(batch):
                        partial[c, r, b] += w * _load(xt[j, b])


FEW_ROWS = 64  # layers with at most this many outputs use _spmm_by_columns in the forward pass ...
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
    return np.empty((numba.config.NUMBA_NUM_THREADS, out.shape[1]), dtype=np.float32)


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
        _launch(_transpose, _np(a), _np(out))
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
    layer with few rows is computed column by column (see _spmm_by_columns)."""
    xt = xt.contiguous()
    if _compiled(vals.dtype, xt):
        if pattern_t is not None and pattern.perm is None and rows <= FEW_ROWS and xt.numel() >= FEW_ROWS_INPUT:
            chunks = 4 * torch.get_num_threads()
            partial = _empty(chunks, rows, xt.shape[1])
            crow_t, col_t, perm = pattern_t.numpy()
            _launch(_spmm_by_columns, crow_t, col_t, perm, _np(vals), _np(xt), _np(partial))
            out = partial.sum(0)
            out = out + bias.detach()[:, None] if bias is not None else out
            return out.to(xt.dtype)
        out = _empty(rows, xt.shape[1], dtype=xt.dtype)
        crow, col, perm = pattern.numpy()
        bias_np = _np(bias if bias is not None else vals)
        use_perm, use_bias = pattern.perm is not None, bias is not None
        args = (crow, col, _np(vals), perm, use_perm, bias_np, use_bias, _np(xt), _np(out), _sums(out))
        _launch(_spmm, *args)
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
        _launch(_sddmm, crow, col, _np(gt), _np(xt), _np(out), _np(sums), row_sums)
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
        _launch(_gather, _np(vals), perm, in_t_order.numpy())
        work = in_t_order.numpy()
        _launch(_backward_t, crow_t, col_t, work, _np(gt), _np(xt), _np(dxt), work, _sums(dxt))
        _launch(_gather, work, pattern_t.inverse(), dvals.numpy())
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
