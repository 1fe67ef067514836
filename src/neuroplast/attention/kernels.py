"""CPU kernels for MoBA (numba): one query at a time, over exactly the keys it selected.

The `gather` path of `moba_attention` groups queries into dense tiles so that every product is
a batched matmul; its bookkeeping (sorting the query/block pairs, gathering tiles, merging the
parts by log-sum-exp, and the autograd of all of it) costs more than the arithmetic when heads
are narrow and blocks small, as in a ViT over pixel sequences (head dim 16, blocks of 16).
These kernels skip the bookkeeping: each (batch x head) is one independent task that walks its
queries and, for each, the keys of its selected blocks (token-causal inside the own block when
causal), with a softmax over exactly those keys. The backward pass recomputes the scores from
the saved log-sum-exp (as FlashAttention does); a task per (batch x key/value head) walks the
query heads that share it and accumulates dk, dv itself, so threads never write to the same rows.

The kernels read and write the layout of the attention projections: q (B, N, H, D), keys and
values in one (B, N, 2, Hkv, D) tensor, the output (B, N, H, D), so a module passes its
`linear(x).view(...)` results as they are and gets gradients in the same layout (no transposes,
no copies). Each task first copies its keys and values into local (N, D) rows."""

from __future__ import annotations

import numpy as np
import torch

from neuroplast.compiled import backend, launch


def available() -> bool:
    return backend() == "numba"


def usable(x: torch.Tensor) -> bool:
    """Whether the kernels can take tensors like x (numba present, CPU)."""
    return x.device.type == "cpu" and available()


ROUTE_CHUNK_SCORES = 1 << 19  # routing scores per chunk of queries (2 MiB in fp32; 8 MiB routed 1.1-1.3x slower)


def _kernels():
    """The numba kernels (`attention/numba_kernels.py`), imported, and so compiled or read from
    numba's cache, when they first run."""
    from neuroplast.attention import numba_kernels

    return numba_kernels


def packed(q: torch.Tensor) -> torch.Tensor:
    """q (B, H, N, D) as the kernels read it: (B, N, H, D), C-contiguous (free when q is already
    a head view of a (B, N, H * D) projection)."""
    return q.transpose(1, 2).contiguous()


def route(q: torch.Tensor, centroids: torch.Tensor, block_size: int, count: int, causal: bool, force_own_block: bool):
    """The top-`count` routing of `select_blocks`: q (B, H, N, D) and centroids (B, Hkv, blocks,
    D), float32, on CPU. The scores are matmuls over a chunk of queries at a time (about
    ROUTE_CHUNK_SCORES of them, so they stay in cache), the top blocks a numba pass over each
    chunk. Returns (chosen, valid), each (B, H, N, count)."""
    batch, heads, n, dim = q.shape
    kv_heads, blocks = centroids.shape[1], centroids.shape[2]
    chosen = torch.empty(batch * heads, n, count, dtype=torch.long)
    grouped = q.view(batch, kv_heads, heads // kv_heads, n, dim)  # query heads by their key head
    centroids = centroids[:, :, None]  # (B, Hkv, 1, blocks, D)
    step = max(1, ROUTE_CHUNK_SCORES // (batch * heads * blocks))
    step = max(1, step // block_size) * block_size  # whole blocks of queries
    for first in range(0, n, step):
        queries = grouped[:, :, :, first : first + step].transpose(-1, -2)
        scores = torch.matmul(centroids, queries).view(batch * heads, blocks, -1)  # block-major
        picks = chosen[:, first : first + scores.shape[2]]
        launch(_kernels().top_blocks, scores.numpy(), first, block_size, causal, force_own_block, picks.numpy())
    valid = chosen >= 0
    return chosen.clamp_min_(0).view(batch, heads, n, count), valid.view(batch, heads, n, count)


def selections(chosen: torch.Tensor, valid: torch.Tensor, block_size: int, force_own_block: bool):
    """(sel, count) for the kernels: sel (B * H, N, S) int32 holds each query's blocks in
    increasing order (its own block among them when forced), count (B * H, N) how many are real."""
    batch, heads, n, c = chosen.shape
    sel = torch.empty(batch * heads, n, c + int(force_own_block), dtype=torch.int32)
    count = torch.empty(batch * heads, n, dtype=torch.int32)
    flat = lambda x: x.reshape(batch * heads, n, c).contiguous().numpy()  # noqa: E731
    blocks = -(-n // block_size)
    launch(
        _kernels().selections,
        flat(chosen),
        flat(valid),
        block_size,
        blocks,
        force_own_block,
        sel.numpy(),
        count.numpy(),
    )
    return sel, count


class MoBAFunction(torch.autograd.Function):
    """Attention of q over the selected keys, in the numba kernels: q (B, N, H, D) and kv
    (B, N, 2, Hkv, D) (keys, values), C-contiguous; the output is (B, N, H, D)."""

    @staticmethod
    def forward(ctx, q, kv, sel, count, block_size: int, causal: bool, scale: float):
        batch, n, heads, _ = q.shape
        out = torch.empty_like(q)
        lse = torch.empty(batch * heads, n, dtype=q.dtype)
        scales = np.array([scale, 0], dtype=q.numpy().dtype)  # the inputs' dtype (see numba_kernels.forward)
        args = (sel.numpy(), count.numpy(), block_size, causal, scales, out.numpy(), lse.numpy())
        launch(_kernels().forward, q.numpy(), kv.numpy(), *args)
        ctx.save_for_backward(q, kv, sel, count, out, lse)
        ctx.args = (block_size, causal, scales)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, kv, sel, count, out, lse = ctx.saved_tensors
        block_size, causal, scales = ctx.args
        dout = dout.contiguous()
        dq, dkv = torch.empty_like(q), torch.empty_like(kv)
        batch, n, _, dim = q.shape
        dk, dv = (torch.empty(batch * kv.shape[3], n, dim, dtype=q.dtype) for _ in range(2))  # scratch
        args = (sel.numpy(), count.numpy(), block_size, causal, scales, out.numpy(), lse.numpy(), dout.numpy())
        launch(_kernels().backward, q.numpy(), kv.numpy(), *args, dq.numpy(), dkv.numpy(), dk.numpy(), dv.numpy())
        return dq, dkv, None, None, None, None, None


def attention(q, kv, block_size, chosen, valid, causal, force_own_block, scale) -> torch.Tensor:
    """MoBA attention through the kernels, in their layout: q (B, N, H, D), kv (B, N, 2, Hkv, D),
    C-contiguous, one floating dtype; (chosen, valid) the routing, (B, H, N, c). Returns
    (B, N, H, D)."""
    if not (q.is_contiguous() and kv.is_contiguous()) or q.dtype != kv.dtype:
        raise ValueError("the MoBA kernels take C-contiguous q and kv of one dtype")
    batch, n, heads, _ = q.shape
    if (
        tuple(chosen.shape[:3]) != (batch, heads, n)
        or heads % kv.shape[3]
        or kv.shape[:2] != q.shape[:2]
        or kv.shape[4] != q.shape[3]
    ):
        raise ValueError(
            f"q {tuple(q.shape)}, kv {tuple(kv.shape)} and routing {tuple(chosen.shape)} do not fit together"
        )
    sel, count = selections(chosen, valid, block_size, force_own_block)
    return MoBAFunction.apply(q, kv, sel, count, block_size, causal, float(scale))
