"""MoBA through FlexAttention (`torch.nn.attention.flex_attention`): the GPU path, exact per-token
routing with sparse tiles.

A BlockMask marks tiles of 128 queries x 128 keys, and a tile of queries must read the union of
what its queries chose: with per-token routing over the raw sequence, that union is nearly every
block. So the queries are rearranged first, as FlashMoBA does ("gather and densify"): every
(query, chosen block) pair, the forced own block included, becomes one row, and the rows of a
(batch, head) are sorted by key block. A tile of 128 rows then reads one or two key blocks. Each
row may read the keys [lo, hi] of its block (hi: the query itself in its own block when causal,
the last real key otherwise); `mask_mod` encodes exactly that, and tiles every row of which reads
a whole key tile are "full" (no mask_mod). FlexAttention returns each row's output and
log-sum-exp; the rows of a query are merged exactly by log-sum-exp with ordinary differentiable
ops, so autograd (FlexAttention's backward on GPU, through the log-sum-exp too) gives the
gradients.

On CPU, FlexAttention has no backward, and eager mode computes every score of the rearranged
rows: there the path is for inference and for tests against the reference.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch
import torch.nn.functional as F

from neuroplast.attention.gather import pairs

TILE = 128  # FlexAttention's tile, queries and keys
RECOMPILE_LIMIT = 64  # compiled versions of flex_attention kept (shapes x dtypes x grad modes)

_compiled = None


def available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def preferred(q: torch.Tensor) -> bool:
    """Whether "auto" takes this path: on CUDA, with FlexAttention and a Triton to compile it."""
    if q.device.type != "cuda" or not available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if not available():
        raise ValueError(f"implementation 'flex' needs torch.nn.attention.flex_attention (torch {torch.__version__})")
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError(
            "implementation 'flex' has no backward on CPU (FlexAttention is inference-only there); "
            "use 'gather', 'kernel' or 'auto' to train"
        )


def rows(n, block_size, chosen, valid, causal, force_own_block):
    """The rearranged rows, (BH, P) each, P the most pairs of any (batch, head): the query of
    each row (0 for padding rows), and the first and last key it may read (lo > hi: padding).
    Rows are sorted by key block within each (batch, head). P depends on the shapes only (how
    many blocks each position may choose), not on the routing, so a compiled kernel keeps its
    shapes from step to step."""
    bh = chosen.shape[0] * chosen.shape[1]
    device = chosen.device
    head, query, block, last_key = pairs(n, bh, block_size, chosen, valid, causal, force_own_block)
    lo = block * block_size
    hi = lo + last_key
    # sort by (head, block, query): a stable sort by block, then by head
    order = torch.argsort(block * n + query, stable=True)
    order = order[torch.argsort(head[order], stable=True)]
    head, query, lo, hi = head[order], query[order], lo[order], hi[order]
    counts = torch.bincount(head, minlength=bh)
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    rank = torch.arange(head.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[head]
    row_query = torch.zeros(bh, width, dtype=torch.long, device=device)
    row_lo = torch.ones(bh, width, dtype=torch.int32, device=device)
    row_hi = torch.zeros(bh, width, dtype=torch.int32, device=device)
    row_query[head, rank] = query
    row_lo[head, rank] = lo.to(torch.int32)
    row_hi[head, rank] = hi.to(torch.int32)
    return row_query, row_lo, row_hi


def block_mask(row_lo: torch.Tensor, row_hi: torch.Tensor, n: int, batch: int, heads: int, block_size: int):
    """The BlockMask of the rearranged rows: a (query tile, key tile) pair is listed when some
    row of the query tile reads some key of the key tile, and is full when every row of the
    query tile reads all of the key tile."""
    from torch.nn.attention.flex_attention import BlockMask

    bh, width = row_lo.shape
    device = row_lo.device
    q_tiles, kv_tiles = math.ceil(width / TILE), math.ceil(n / TILE)
    padded = q_tiles * TILE - width
    lo = F.pad(row_lo, (0, padded), value=1).long()
    hi = F.pad(row_hi, (0, padded), value=0).long()
    real = lo <= hi
    first, last = lo // TILE, hi // TILE
    touched = torch.zeros(bh, q_tiles, kv_tiles + 1, dtype=torch.bool, device=device)
    covering = torch.zeros(bh, q_tiles, kv_tiles + 1, dtype=torch.int32, device=device)
    q_tile = (torch.arange(q_tiles * TILE, device=device) // TILE).expand(bh, -1)
    for offset in range(math.ceil(block_size / TILE) + 1):  # the most key tiles one row can touch
        tile = first + offset
        hit = real & (tile <= last)
        tile = torch.where(hit, tile, kv_tiles)  # misses land in a spare column
        touched[torch.arange(bh, device=device)[:, None], q_tile, tile] = True
        whole = hit & (lo <= tile * TILE) & (hi >= torch.clamp((tile + 1) * TILE, max=n) - 1)
        covering.view(bh, -1).scatter_add_(1, q_tile * (kv_tiles + 1) + tile, whole.to(torch.int32))
    touched, covering = touched[..., :kv_tiles], covering[..., :kv_tiles]
    full = covering == TILE  # every row of the tile (padding rows read nothing: never full)
    partial = touched & ~full

    def indices(marked: torch.Tensor):
        count = marked.sum(-1, dtype=torch.int32)
        order = torch.argsort((~marked).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return count.view(batch, heads, q_tiles), order.view(batch, heads, q_tiles, kv_tiles)

    lo_rows, hi_rows = row_lo.view(batch, heads, width), row_hi.view(batch, heads, width)

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= lo_rows[b, h, q_idx]) & (kv_idx <= hi_rows[b, h, q_idx])

    return BlockMask.from_kv_blocks(
        *indices(partial), *indices(full), BLOCK_SIZE=(TILE, TILE), mask_mod=mask_mod, seq_lengths=(width, n)
    )


def _attend(q_rows, k, v, mask, scale):
    from torch.nn.attention import flex_attention as fa

    global _compiled
    function = fa.flex_attention
    limit = contextlib.nullcontext()
    if q_rows.device.type != "cpu":  # compiled once per shape and grad mode; new masks do not recompile
        if _compiled is None:
            _compiled = torch.compile(fa.flex_attention, dynamic=False)
        function = _compiled
        # past the default 8 compiled versions (a benchmark over lengths, forward and backward, or
        # several models) torch would run flex_attention eagerly, every score materialised
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
        limit = config.patch(**{name: RECOMPILE_LIMIT})
    with limit, warnings.catch_warnings():  # on CPU, eager is the documented way (no log-sum-exp when compiled)
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        if hasattr(fa, "AuxRequest"):
            out, aux = function(q_rows, k, v, block_mask=mask, scale=scale, return_aux=fa.AuxRequest(lse=True))
            return out, aux.lse
        return function(q_rows, k, v, block_mask=mask, scale=scale, return_lse=True)


def moba_flex(q, k, v, block_size, chosen, valid, causal, force_own_block, scale) -> torch.Tensor:
    """MoBA by FlexAttention over the rearranged rows, merged by log-sum-exp. q, k, v (B, H, N, D)
    with as many key heads as query heads."""
    batch, heads, n, dim = q.shape
    if n == 0:
        return torch.zeros_like(q)
    if q.device.type == "cpu":  # no gradient is wanted here (`check`), and torch refuses any
        q, k, v = q.detach(), k.detach(), v.detach()
    row_query, row_lo, row_hi = rows(n, block_size, chosen, valid, causal, force_own_block)
    bh, width = row_query.shape
    mask = block_mask(row_lo, row_hi, n, batch, heads, block_size)
    q_rows = q.reshape(bh, n, dim).gather(1, row_query[..., None].expand(-1, -1, dim))
    out_rows, lse_rows = _attend(q_rows.view(batch, heads, width, dim), k, v, mask, scale)
    # merge the rows of each query: L = logsumexp of their l, o = sum exp(l - L) o
    real = (row_lo <= row_hi).reshape(-1)
    target = (torch.arange(bh, device=q.device)[:, None] * n + row_query).reshape(-1)[real]
    working = torch.promote_types(q.dtype, torch.float32)
    lse = lse_rows.reshape(-1)[real].to(working)
    part = out_rows.reshape(-1, dim)[real].to(working)
    top = lse.new_full((bh * n,), float("-inf")).scatter_reduce(0, target, lse.detach(), reduce="amax")
    total = lse.new_zeros(bh * n).index_add(0, target, (lse - top[target]).exp())
    merged = top + total.log()
    out = part.new_zeros(bh * n, dim).index_add(0, target, part * (lse - merged[target]).exp()[:, None])
    return out.view(batch, heads, n, dim).to(q.dtype)
