"""The numba kernels of the csr backend (see `sparse/kernels.py`, which calls them): imported
only when a csr product first runs with the numba backend, so `import neuroplast` does not load
numba."""

from __future__ import annotations

import numba
from llvmlite import ir as _ir
from numba.core import cgutils as _cgutils
from numba.extending import intrinsic as _intrinsic
from numba.extending import overload as _overload

PREFETCH_AHEAD = 8  # nonzeros: the activation row needed this many nonzeros later is requested now

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
def spmm(crow, col, vals, perm, use_perm, bias, use_bias, xt, out, acc):  # pragma: no cover  (compiled)
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
def transpose(a, out):  # pragma: no cover  (compiled)
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
def sddmm(crow, col, gt, xt, out, row_sums, use_row_sums):  # pragma: no cover  (compiled)
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


@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def backward_t(crow_t, col_t, vals_t, gt, xt, dxt, dvals_t, acc):  # pragma: no cover  (compiled)
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
def gather(source, index, out):  # pragma: no cover  (compiled)
    """out[p] = source[index[p]]: independent loads, which the CPU overlaps by itself."""
    for p in numba.prange(out.shape[0]):
        out[p] = source[index[p]]


@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def spmm_by_columns(crow_t, col_t, perm, vals, xt, partial):  # pragma: no cover  (compiled)
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
