"""CPU kernels for MoBA (numba): one query at a time, over exactly the keys it selected.

The `gather` path of `moba_attention` groups queries into dense tiles so that every product is
a batched matmul; its bookkeeping (sorting the query/block pairs, gathering tiles, merging the
parts by log-sum-exp, and the autograd of all of it) costs more than the arithmetic when heads
are narrow and blocks small, as in a ViT over pixel sequences (head dim 16, blocks of 16).
These kernels skip the bookkeeping: each (batch x head) is one independent task that walks its
queries and, for each, the keys of its selected blocks (token-causal inside the own block when
causal), with a softmax over exactly those keys. The backward pass recomputes the scores from
the saved log-sum-exp (as FlashAttention does) and accumulates dk, dv inside the task, so
threads never write to the same rows.
"""

from __future__ import annotations

import numpy as np
import torch

from neuroplast.compiled import backend, launch, numba


def available() -> bool:
    return backend() == "numba"


def usable(x: torch.Tensor) -> bool:
    """Whether the kernels can take tensors like x (numba present, CPU)."""
    return x.device.type == "cpu" and available()


# fast-math without the no-infinities/no-NaNs assumptions: infinities and NaNs follow IEEE rules
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

if numba is not None:

    @numba.njit(cache=True, nogil=True, inline="always")
    def _keys(block, own, t, block_size, n, causal):  # pragma: no cover  (compiled)
        """The keys [start, end) that query t reads in `block`: the whole block (the last one may
        be short), up to t itself in its own block when causal."""
        start = block * block_size
        end = min(start + block_size, n)
        if causal and block == own:
            end = t + 1
        return start, end

    @numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
    def _forward(q, k, v, sel, count, block_size, causal, scales, out, lse):  # pragma: no cover  (compiled)
        tasks, n, dim = q.shape
        # scale and zero in the inputs' dtype: a Python float, or float32 * int, would make the
        # arithmetic float64
        scale, zero = scales[0], scales[1]
        width = sel.shape[2] * block_size
        for task in numba.prange(tasks):
            scores = np.empty(width, q.dtype)
            acc = np.empty(dim, q.dtype)
            for t in range(n):
                own = t // block_size
                used = 0
                for s in range(count[task, t]):  # pass 1: the scores of the selected keys
                    start, end = _keys(sel[task, t, s], own, t, block_size, n, causal)
                    for j in range(start, end):
                        dot = zero
                        for d in range(dim):
                            dot += q[task, t, d] * k[task, j, d]
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
                            acc[d] += p * v[task, j, d]
                for d in range(dim):
                    out[task, t, d] = acc[d] / total
                lse[task, t] = m + np.log(total)

    @numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
    def _backward(q, k, v, sel, count, block_size, causal, scales, out, lse, dout, dq, dk, dv):  # pragma: no cover
        tasks, n, dim = q.shape
        scale, zero = scales[0], scales[1]
        for task in numba.prange(tasks):
            acc = np.empty(dim, q.dtype)
            for j in range(n):
                for d in range(dim):
                    dk[task, j, d] = zero
                    dv[task, j, d] = zero
            for t in range(n):
                own = t // block_size
                delta = zero
                for d in range(dim):
                    delta += dout[task, t, d] * out[task, t, d]
                    acc[d] = zero
                for s in range(count[task, t]):
                    start, end = _keys(sel[task, t, s], own, t, block_size, n, causal)
                    for j in range(start, end):
                        dot = zero
                        dp = zero
                        for d in range(dim):
                            dot += q[task, t, d] * k[task, j, d]
                            dp += dout[task, t, d] * v[task, j, d]
                        p = np.exp(dot * scale - lse[task, t])
                        ds = p * (dp - delta) * scale
                        for d in range(dim):
                            dv[task, j, d] += p * dout[task, t, d]
                            acc[d] += ds * k[task, j, d]
                            dk[task, j, d] += ds * q[task, t, d]
                for d in range(dim):
                    dq[task, t, d] = acc[d]


if numba is not None:

    @numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
    def _route(q, centroids_t, block_size, causal, force_own_block, chosen):  # pragma: no cover  (compiled)
        """For each query t, the c = chosen.shape[2] eligible blocks with the highest q . centroid,
        best first (ties: the lower block); chosen = -1 where fewer than c blocks are eligible.
        centroids_t is (tasks, D, blocks): a query's scores are computed along the blocks."""
        tasks, n, dim = q.shape
        blocks, c = centroids_t.shape[2], chosen.shape[2]
        for task in numba.prange(tasks):
            scores = np.empty(blocks, q.dtype)
            top_block = np.empty(c, np.int64)
            top_score = np.empty(c, q.dtype)
            for t in range(n):
                own = t // block_size
                limit = own if causal else blocks  # causal: blocks entirely in the past
                for b in range(limit):
                    scores[b] = 0.0
                for d in range(dim):
                    qd = q[task, t, d]
                    for b in range(limit):
                        scores[b] += qd * centroids_t[task, d, b]
                filled = 0  # the list so far, best first, in locals: one compare per block
                for b in range(limit):
                    if force_own_block and b == own:
                        continue
                    score = scores[b]
                    if filled == c and score <= top_score[c - 1]:
                        continue
                    i = min(filled, c - 1)  # insert, keeping the list sorted best first
                    while i > 0 and score > top_score[i - 1]:
                        top_block[i] = top_block[i - 1]
                        top_score[i] = top_score[i - 1]
                        i -= 1
                    top_block[i] = b
                    top_score[i] = score
                    filled = min(filled + 1, c)
                for i in range(c):
                    chosen[task, t, i] = top_block[i] if i < filled else -1

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _selections(chosen, valid, block_size, blocks, force_own_block, sel, count):  # pragma: no cover  (compiled)
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


def route(q: torch.Tensor, centroids: torch.Tensor, block_size: int, count: int, causal: bool, force_own_block: bool):
    """The top-`count` routing of `select_blocks` in one pass per query (no (N x blocks) score
    matrix, no sort): q (B, H, N, D) and centroids (B, H, blocks, D), float32, on CPU."""
    batch, heads, n, dim = q.shape
    blocks = centroids.shape[2]
    qf = q.reshape(batch * heads, n, dim).contiguous()
    cf = centroids.reshape(batch * heads, blocks, dim).transpose(1, 2).contiguous()
    chosen = torch.empty(batch * heads, n, count, dtype=torch.long)
    launch(_route, qf.numpy(), cf.numpy(), block_size, causal, force_own_block, chosen.numpy())
    valid = chosen >= 0
    chosen = chosen.clamp_min(0)
    return chosen.view(batch, heads, n, count), valid.view(batch, heads, n, count)


def selections(chosen: torch.Tensor, valid: torch.Tensor, block_size: int, force_own_block: bool):
    """(sel, count) for the kernels: sel (tasks, N, S) int32 holds each query's blocks in
    increasing order (its own block among them when forced), count (tasks, N) how many are real."""
    batch, heads, n, c = chosen.shape
    sel = torch.empty(batch * heads, n, c + int(force_own_block), dtype=torch.int32)
    count = torch.empty(batch * heads, n, dtype=torch.int32)
    flat = lambda x: x.reshape(batch * heads, n, c).contiguous().numpy()  # noqa: E731
    blocks = -(-n // block_size)
    launch(_selections, flat(chosen), flat(valid), block_size, blocks, force_own_block, sel.numpy(), count.numpy())
    return sel, count


class MoBAFunction(torch.autograd.Function):
    """Attention of q over the selected keys, in the numba kernels; q, k, v (tasks, N, D)."""

    @staticmethod
    def forward(ctx, q, k, v, sel, count, block_size: int, causal: bool, scale: float):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:2], dtype=q.dtype)
        scales = np.array([scale, 0], dtype=q.numpy().dtype)  # the inputs' dtype (see _forward)
        args = (sel.numpy(), count.numpy(), block_size, causal, scales, out.numpy(), lse.numpy())
        launch(_forward, q.numpy(), k.numpy(), v.numpy(), *args)
        ctx.save_for_backward(q, k, v, sel, count, out, lse)
        ctx.args = (block_size, causal, scales)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, sel, count, out, lse = ctx.saved_tensors
        block_size, causal, scales = ctx.args
        dout = dout.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        args = (sel.numpy(), count.numpy(), block_size, causal, scales, out.numpy(), lse.numpy(), dout.numpy())
        launch(_backward, q.numpy(), k.numpy(), v.numpy(), *args, dq.numpy(), dk.numpy(), dv.numpy())
        return dq, dk, dv, None, None, None, None, None


def moba_kernel(q, k, v, block_size, chosen, valid, causal, force_own_block, scale) -> torch.Tensor:
    """MoBA attention through the numba kernels; q, k, v (B, H, N, D) with KV heads expanded."""
    batch, heads, n, dim = q.shape
    sel, count = selections(chosen, valid, block_size, force_own_block)
    flat = lambda x: x.reshape(batch * heads, n, dim)  # noqa: E731
    out = MoBAFunction.apply(flat(q), flat(k), flat(v), sel, count, block_size, causal, float(scale))
    return out.view(batch, heads, n, dim)
