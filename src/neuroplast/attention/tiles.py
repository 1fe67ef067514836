"""MoBA with per-query-block routing, as tiles: every query block against its chosen key blocks.

With `routing="block"` all queries of a block attend to the same k key blocks (the block's mean
query chose them), so a query block and its k blocks form one small dense attention problem:
its queries (a view, no gather) against the k blocks' keys and values, gathered once per query
block. All the problems run in one call of PyTorch's fused attention, with no per-pair groups,
no plan and no log-sum-exp merge; its backward pass is PyTorch's, and the gathers' backward
adds each key block's gradients up. Only a short last block needs a mask (its padding keys).
Memory beyond the inputs: k gathered copies of the keys and values.

On CPU each query block is one sequence of the call's batch (its backward pass is 1.6x faster
than with the query blocks as heads: 638 against 1033 ms at 16K tokens); on a GPU a query
block is one "head" of a (batch x head) sequence, as the GPU kernels launch at most 65535
sequences.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def attention(q, k, v, block_size, chosen, force_own_block, scale) -> torch.Tensor:
    """q (B, H, N, D); k, v (B, Hkv, N, D), H a multiple of Hkv; chosen (B, H, blocks, c), each
    query block's key blocks besides its own (`select_query_blocks`); with `force_own_block` the
    own block is read too. Returns (B, H, N, D)."""
    batch, heads, n, dim = q.shape
    kv_heads = k.shape[1]
    blocks = math.ceil(n / block_size)
    pad = blocks * block_size - n
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    device = q.device
    if force_own_block:
        own = torch.arange(blocks, device=device).expand(batch, heads, blocks)[..., None]
        chosen = torch.cat([own, chosen], dim=-1)
    picks = chosen.shape[-1]
    # (sequences, per sequence): a query block per sequence on CPU, per "head" on a GPU
    sequences, per = (batch * heads * blocks, 1) if device.type == "cpu" else (batch * heads, blocks)
    # the key block (of B * Hkv * blocks) of each pick; query head h reads key head h // (H / Hkv)
    key_head = torch.arange(batch, device=device)[:, None] * kv_heads + torch.arange(heads, device=device) // (
        heads // kv_heads
    )
    index = (key_head[:, :, None, None] * blocks + chosen).reshape(-1)
    keys, values = (
        x.reshape(batch * kv_heads * blocks, block_size, dim).index_select(0, index).view(sequences, per, -1, dim)
        for x in (k, v)
    )
    mask = None
    if pad:  # the short last block's padding keys are never read
        real = torch.arange(block_size, device=device) < block_size - pad
        mask = ((chosen != blocks - 1)[..., None] | real).reshape(sequences, per, 1, picks * block_size)
    queries = q.reshape(sequences, per, block_size, dim)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
    return out.view(batch, heads, blocks * block_size, dim)[:, :, :n]
