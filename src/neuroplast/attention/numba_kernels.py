"""The numba kernels of MoBA (see `attention/kernels.py`, which calls them): imported only when
the kernels first run, so importing the package does not load numba."""

from __future__ import annotations

import numba
import numpy as np

# fast-math without the no-infinities/no-NaNs assumptions: infinities and NaNs follow IEEE rules
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


@numba.njit(cache=True, nogil=True, inline="always")
def _keys(block, own, t, block_size, n, causal):  # pragma: no cover  (compiled)
    """The keys [start, end) that query t reads in `block`: the whole block (the last one may
    be short), up to t itself in its own block when causal."""
    start = block * block_size
    end = min(start + block_size, n)
    if causal and block == own:
        end = t + 1
    return start, end


@numba.njit(cache=True, nogil=True, inline="always")
def _head_rows(kv, b, g, keys, values):  # pragma: no cover  (compiled)
    """Copy the keys and the values of batch b, key/value head g into keys, values (N, D)."""
    for j in range(kv.shape[1]):
        for d in range(kv.shape[4]):
            keys[j, d] = kv[b, j, 0, g, d]
            values[j, d] = kv[b, j, 1, g, d]


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def forward(q, kv, sel, count, block_size, causal, scales, out, lse):  # pragma: no cover  (compiled)
    """q, out (B, N, H, D); kv (B, N, 2, Hkv, D): keys at [:, :, 0], values at [:, :, 1];
    lse (B * H, N). One task per (batch, query head); it copies its keys, values and each
    query into local rows first, so the inner loops read unit-stride memory."""
    batch, n, heads, dim = q.shape
    group = heads // kv.shape[3]
    # scale and zero in the inputs' dtype: a Python float, or float32 * int, would make the
    # arithmetic float64
    scale, zero = scales[0], scales[1]
    width = sel.shape[2] * block_size
    for task in numba.prange(batch * heads):
        b, h = task // heads, task % heads
        g = h // group
        keys = np.empty((n, dim), q.dtype)
        values = np.empty((n, dim), q.dtype)
        _head_rows(kv, b, g, keys, values)
        query = np.empty(dim, q.dtype)
        scores = np.empty(width, q.dtype)
        acc = np.empty(dim, q.dtype)
        for t in range(n):
            own = t // block_size
            for d in range(dim):
                query[d] = q[b, t, h, d]
            used = 0
            for s in range(count[task, t]):  # pass 1: the scores of the selected keys
                start, end = _keys(sel[task, t, s], own, t, block_size, n, causal)
                for j in range(start, end):
                    dot = zero
                    for d in range(dim):
                        dot += query[d] * keys[j, d]
                    scores[used] = dot * scale
                    used += 1
            m = scores[0]
            for u in range(1, used):
                m = max(m, scores[u])
            total = zero
            for u in range(used):
                e = np.exp(scores[u] - m)
                scores[u] = e
                total += e
            for d in range(dim):
                acc[d] = zero
            used = 0
            for s in range(count[task, t]):  # pass 2: softmax weights times values
                start, end = _keys(sel[task, t, s], own, t, block_size, n, causal)
                for j in range(start, end):
                    p = scores[used]
                    used += 1
                    for d in range(dim):
                        acc[d] += p * values[j, d]
            for d in range(dim):
                out[b, t, h, d] = acc[d] / total
            lse[task, t] = m + np.log(total)


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def backward(q, kv, sel, count, block_size, causal, scales, out, lse, dout, dq, dkv, dk, dv):  # pragma: no cover
    """The gradients dq (as q) and dkv (as kv). One task per (batch, key/value head), which
    walks the query heads of its group: only it writes its rows of dkv. It reads local copies
    of its keys and values and sums their gradients in dk, dv (B * Hkv, N, D) before writing
    them to dkv."""
    batch, n, heads, dim = q.shape
    kv_heads = kv.shape[3]
    group = heads // kv_heads
    scale, zero = scales[0], scales[1]
    for task in numba.prange(batch * kv_heads):
        b, g = task // kv_heads, task % kv_heads
        keys = np.empty((n, dim), q.dtype)
        values = np.empty((n, dim), q.dtype)
        _head_rows(kv, b, g, keys, values)
        for j in range(n):
            for d in range(dim):
                dk[task, j, d] = zero
                dv[task, j, d] = zero
        acc = np.empty(dim, q.dtype)
        for h in range(g * group, (g + 1) * group):
            row = b * heads + h  # of sel, count, lse
            for t in range(n):
                own = t // block_size
                delta = zero
                for d in range(dim):
                    delta += dout[b, t, h, d] * out[b, t, h, d]
                    acc[d] = zero
                for s in range(count[row, t]):
                    start, end = _keys(sel[row, t, s], own, t, block_size, n, causal)
                    for j in range(start, end):
                        dot = zero
                        dp = zero
                        for d in range(dim):
                            dot += q[b, t, h, d] * keys[j, d]
                            dp += dout[b, t, h, d] * values[j, d]
                        p = np.exp(dot * scale - lse[row, t])
                        ds = p * (dp - delta) * scale
                        for d in range(dim):
                            dv[task, j, d] += p * dout[b, t, h, d]
                            acc[d] += ds * keys[j, d]
                            dk[task, j, d] += ds * q[b, t, h, d]
                for d in range(dim):
                    dq[b, t, h, d] = acc[d]
        for j in range(n):
            for d in range(dim):
                dkv[b, j, 0, g, d] = dk[task, j, d]
                dkv[b, j, 1, g, d] = dv[task, j, d]


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def top_blocks(scores, first, block_size, causal, force_own_block, chosen):  # pragma: no cover  (compiled)
    """For each query row t of scores (tasks, blocks, rows) (query first + t), the c =
    chosen.shape[2] eligible blocks with the highest score, best first (ties: the lower
    block); chosen (tasks, rows, c) = -1 where fewer than c blocks are eligible. The queries
    of one block share their eligible blocks, so they are taken together: block by block,
    each score is inserted into every query's running top c by compare-and-swap, branch-free
    and vectorized across the queries (a per-query scan mispredicts on random scores)."""
    tasks, blocks, rows = scores.shape
    c = chosen.shape[2]
    first_block = first // block_size
    segments = (first + rows - 1) // block_size - first_block + 1
    for job in numba.prange(tasks * segments):
        task, segment = job // segments, job % segments
        own = first_block + segment
        lo = max(0, own * block_size - first)
        m = min(rows, (own + 1) * block_size - first) - lo
        best = np.full((c, m), -np.inf, scores.dtype)
        pick = np.full((c, m), -1, np.int64)
        value = np.empty(m, scores.dtype)
        index = np.empty(m, np.int64)
        for i in range(own if causal else blocks):  # causal: blocks entirely in the past
            if force_own_block and i == own:
                continue
            for r in range(m):
                value[r] = scores[task, i, lo + r]
                index[r] = i
            for j in range(c):
                for r in range(m):
                    held, new = best[j, r], value[r]
                    held_block, new_block = pick[j, r], index[r]
                    swap = new > held  # strict: an equal score from a later block stays below
                    best[j, r] = new if swap else held
                    value[r] = held if swap else new
                    pick[j, r] = new_block if swap else held_block
                    index[r] = held_block if swap else new_block
        for r in range(m):
            for j in range(c):
                chosen[task, lo + r, j] = pick[j, r]


@numba.njit(parallel=True, cache=True, nogil=True)
def selections(chosen, valid, block_size, blocks, force_own_block, sel, count):  # pragma: no cover  (compiled)
    """sel[task, t] = the valid chosen blocks and the own block (when forced) in increasing
    order, then `blocks` as padding; count[task, t] = how many are real."""
    tasks, n, c = chosen.shape
    width = sel.shape[2]
    for task in numba.prange(tasks):
        for t in range(n):
            used = 0
            if force_own_block:
                sel[task, t, 0] = t // block_size
                used = 1
            for i in range(c):
                if not valid[task, t, i]:
                    continue
                b = chosen[task, t, i]
                j = used  # insertion sort of at most a few entries
                while j > 0 and sel[task, t, j - 1] > b:
                    sel[task, t, j] = sel[task, t, j - 1]
                    j -= 1
                sel[task, t, j] = b
                used += 1
            count[task, t] = used
            for j in range(used, width):
                sel[task, t, j] = blocks
