"""MoBA's gather path: attention cost proportional to the chosen blocks, on any device.

- Every (query, chosen block) pair joins the group of its (batch x head, key block). A group is
  one dense problem: its queries, gathered, against its block's keys and values, gathered once.
  Groups are sorted by size and taken a chunk at a time; the groups of a chunk are padded to the
  largest of them (sizes sorted, so little padding) and the chunk is a pair of batched matmuls
  forward (five backward). A chunk holds about CHUNK_SCORES scores, so the temporaries stay
  small and warm in cache, and memory beyond the inputs is bounded by the chunk and the pairs.
- Pairs that may read only part of their block (the own block when causal, the short last
  block) form groups of their own, in chunks of their own; only those chunks mask scores.
- On CPU the own blocks (forced in causal mode) skip the groups: seen as (batch x head, block,
  block length) views, q, k and v already hold them as one block-diagonal attention, which
  PyTorch's fused CPU attention kernel computes, token-causal when causal, without any gather.
- The parts of each query are merged exactly by log-sum-exp. The backward pass recomputes the
  scores from the merged log-sum-exp (as FlashAttention does), with no autograd graph through
  the gathers and the merge.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.profiler import record_function

CHUNK_SCORES = 1 << 20  # score elements per chunk of groups (4 MiB in fp32)
GPU_CHUNK_FACTOR = 64  # ... times this on a GPU (256 MiB): fewer, larger launches
ROW_ALIGNMENT = 8  # a chunk's groups are padded to a multiple of this many queries
FUSED_OWN_DEVICES = ("cpu",)  # where the own blocks run in PyTorch's fused attention kernel


def fused_own(device: torch.device) -> bool:
    return device.type in FUSED_OWN_DEVICES and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def pairs(n, bh, block_size, chosen, valid, causal, with_own):
    """Every (query, chosen block) pair, and with `with_own` every query's own block too, as
    (batch x head, query, key block, last key) tensors; the last key a pair may read counts
    from its block's start: the query itself in its own block when causal, else the block's
    last real key (short for the short last block)."""
    device = chosen.device
    count = valid.shape[-1]
    flat = valid.reshape(-1).nonzero().squeeze(1)  # (head, query, slot) flattened
    key_block = chosen.reshape(-1).index_select(0, flat)  # index_select: faster than advanced indexing
    head, query = flat // (n * count), flat // count % n
    own = torch.zeros_like(query, dtype=torch.bool)
    if with_own:
        all_queries = torch.arange(n, device=device).repeat(bh)
        head = torch.cat([torch.arange(bh, device=device).repeat_interleave(n), head])
        query = torch.cat([all_queries, query])
        key_block = torch.cat([all_queries // block_size, key_block])
        own = torch.cat([torch.ones(bh * n, dtype=torch.bool, device=device), own])
    last_key = torch.clamp(n - key_block * block_size, max=block_size) - 1
    if causal:
        last_key = torch.where(own, query - key_block * block_size, last_key)
    return head, query, key_block, last_key


class Plan:
    """The groups of one call, chunk by chunk. `rows` (slots,) is the query row (of BH*N) in each
    slot of the padded groups, `padding` (slots,) marks the slots that only pad a group (they
    read row 0 and count for nothing), `limit` (slots,) the last key of its block a slot may
    read (-1 for padding), `block` the key block (of BH*blocks) of each group; `chunks` lists
    (first slot, first group, groups, rows per group, masked)."""

    def __init__(self, n, bh, block_size, chosen, valid, causal, own_in_groups, device):
        blocks = math.ceil(n / block_size)
        groups = bh * blocks
        head, query, key_block, last_key = pairs(n, bh, block_size, chosen, valid, causal, own_in_groups)
        # groups [0, groups) read part of their block, [groups, 2 groups) all of it
        group = head * blocks + key_block + torch.where(last_key < block_size - 1, 0, groups)
        counts = torch.bincount(group, minlength=2 * groups)
        # masked groups first, each kind largest first, empty groups last
        partial = torch.arange(2 * groups, device=device) < groups
        key = counts + torch.where(partial & (counts > 0), counts.max() + 1, 0)
        order = torch.argsort(key, descending=True, stable=True)
        sizes = counts[order].tolist()
        masked_groups, filled = int((partial & (counts > 0)).sum()), int((counts > 0).sum())
        budget = CHUNK_SCORES * (1 if device.type == "cpu" else GPU_CHUNK_FACTOR)
        self.chunks, group_slot = [], []
        first, slots = 0, 0
        while first < filled:  # a chunk: groups of one kind, padded to the first (largest)
            masked = first < masked_groups
            rows = -(-sizes[first] // ROW_ALIGNMENT) * ROW_ALIGNMENT
            stop = min(first + max(1, budget // (rows * block_size)), masked_groups if masked else filled)
            self.chunks.append((slots, first, stop - first, rows, masked))
            group_slot.extend(range(slots, slots + (stop - first) * rows, rows))
            slots += (stop - first) * rows
            first = stop
        used = len(group_slot)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=device)
        pair_rank = rank.index_select(0, group)
        by_rank = torch.argsort(pair_rank, stable=True)
        pair_rank, pair_row = pair_rank.index_select(0, by_rank), (head * n + query).index_select(0, by_rank)
        start = torch.cumsum(counts[order], 0) - counts[order]
        within = torch.arange(pair_rank.numel(), device=device) - start.index_select(0, pair_rank)
        slot_of_pair = torch.tensor(group_slot, dtype=torch.long, device=device).index_select(0, pair_rank) + within
        self.rows = torch.zeros(slots, dtype=torch.long, device=device)
        self.rows[slot_of_pair] = pair_row
        self.padding = torch.ones(slots, dtype=torch.bool, device=device)
        self.padding[slot_of_pair] = False
        self.limit = torch.full((slots,), -1, dtype=torch.long, device=device)
        self.limit[slot_of_pair] = last_key.index_select(0, by_rank)
        self.block = order[:used] % groups
        self.slots = slots


def _mask_scores(s: torch.Tensor, limit: torch.Tensor) -> None:
    """Scores of keys past each slot's limit (future keys, the short last block's padding,
    padding slots) become -inf, in place."""
    keys = torch.arange(s.shape[-1], device=s.device)
    s.masked_fill_(keys > limit[..., None], float("-inf"))


def _own_parts(n: int, block_size: int) -> list[tuple[int, int, int, int]]:
    """(first token, first block, blocks, block length): the full blocks, then a short last one."""
    full = n // block_size
    parts = [(0, 0, full, block_size)] if full else []
    if n % block_size:
        parts.append((full * block_size, full, 1, n % block_size))
    return parts


def _tokens(x: torch.Tensor, part) -> torch.Tensor:
    """x (BH, N, ...) -> the part's tokens as a (BH, blocks, length, ...) view."""
    start, _, count, length = part
    return x[:, start : start + count * length].unflatten(1, (count, length))


def _keys(xb: torch.Tensor, part) -> torch.Tensor:
    """xb (BH, blocks, block_size, ...) -> the part's blocks as a (BH, blocks, length, ...) view."""
    _, first, count, length = part
    return xb[:, first : first + count, :length]


def _sequences(x: torch.Tensor) -> torch.Tensor:
    """(BH, blocks, length, ...) -> (BH * blocks, 1, length, ...): one single-head sequence per
    block for the fused kernel, whose outputs are laid out (batch, length, heads, ...); with one
    head that is the layout of q, so nothing is copied on the way in or out."""
    return x.reshape(-1, 1, *x.shape[2:])


def _own_forward(q, kb, vb, n, block_size, causal) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query to its own block: (out (BH, N, D), log-sum-exp (BH, N)). q (BH,
    N, D) is already scaled; kb, vb (BH, blocks, block_size, D)."""
    parts = _own_parts(n, block_size)
    results = [
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            *(_sequences(x) for x in (_tokens(q, part), _keys(kb, part), _keys(vb, part))), 0.0, causal, scale=1.0
        )
        for part in parts
    ]
    if len(parts) == 1 and parts[0][3] == block_size:  # whole blocks only: laid out as q
        out, lse = results[0]
        return out.reshape(q.shape), lse.reshape(q.shape[:2])
    out, lse = q.new_empty(q.shape), q.new_empty(q.shape[:2])
    for part, (o, l) in zip(parts, results, strict=True):
        for whole, piece in ((out, o), (lse, l)):
            target = _tokens(whole, part)
            target.copy_(piece.view(target.shape))
    return out, lse


def _own_backward(dout, q, kb, vb, out, lse, n, block_size, causal) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The own blocks' share of the gradients, dq (BH, N, D), dkb and dvb (BH, blocks,
    block_size, D), from the merged output and log-sum-exp (split-softmax gradient)."""
    parts = _own_parts(n, block_size)
    results = [
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            *(_sequences(_tokens(x, part)) for x in (dout, q)),
            *(_sequences(_keys(x, part)) for x in (kb, vb)),
            *(_sequences(_tokens(x, part)).contiguous() for x in (out, lse)),
            0.0,
            causal,
            scale=1.0,
        )
        for part in parts
    ]
    if len(parts) == 1 and parts[0][3] == block_size:
        dq, dkb, dvb = results[0]
        return dq.reshape(q.shape), dkb.reshape(kb.shape), dvb.reshape(vb.shape)
    dq, dkb, dvb = q.new_zeros(q.shape), kb.new_zeros(kb.shape), vb.new_zeros(vb.shape)
    for part, pieces in zip(parts, results, strict=True):
        for target, piece in zip((_tokens(dq, part), _keys(dkb, part), _keys(dvb, part)), pieces, strict=True):
            target.copy_(piece.view(target.shape))
    return dq, dkb, dvb


def _rows(x: torch.Tensor, index: torch.Tensor, groups: int) -> torch.Tensor:
    """x's rows at index (slots,), as (groups, slots / groups, ...). index_select copies whole
    rows; advanced indexing (x[index]) goes element by element, 10x slower here."""
    return x.index_select(0, index).view(groups, -1, *x.shape[1:])


def _by_head(x: torch.Tensor, bh: int) -> torch.Tensor:
    """(BH * m, ...) -> (BH, m, ...): rows (BH*N) by token, blocks (BH*blocks) by block."""
    return x.view(bh, -1, *x.shape[1:])


def _groups_forward(q_rows, kb, vb, plan: Plan, out_slots, lse_slots) -> None:
    """Every group's attention to its block, chunk by chunk: each slot's output and log-sum-exp
    into out_slots (slots, D) and lse_slots (slots,). q_rows is already scaled."""
    dim = q_rows.shape[1]
    for start, first, count, rows, masked in plan.chunks:
        stop, block = start + count * rows, plan.block[first : first + count]
        s = torch.bmm(_rows(q_rows, plan.rows[start:stop], count), kb.index_select(0, block).transpose(1, 2))
        if masked:
            _mask_scores(s, plan.limit[start:stop].view(count, rows))
        peak = s.amax(-1, keepdim=True)
        if masked:
            peak = peak.masked_fill_(peak == float("-inf"), 0.0)  # padding slots: no key at all
        p = s.sub_(peak).exp_()
        total = p.sum(-1, keepdim=True)
        out = torch.bmm(p, vb.index_select(0, block), out=out_slots[start:stop].view(count, rows, dim))
        out.div_(total.clamp_min_(torch.finfo(total.dtype).tiny))
        torch.add(peak, total.log_(), out=lse_slots[start:stop].view(count, rows, 1))


def _merge(target, own_out, own_lse, out_slots, lse_slots) -> tuple[torch.Tensor, torch.Tensor]:
    """The parts of each query merged, (out (BH*N, D), lse (BH*N,)): L = logsumexp_p l_p, o =
    sum_p exp(l_p - L) o_p, over its own part and the slots whose row (target) it is. Writes
    over own_out and out_slots."""
    top = own_lse.clone().scatter_reduce_(0, target, lse_slots, reduce="amax")
    total = (own_lse - top).exp_().index_add_(0, target, (lse_slots - top[target]).exp_())
    lse = top.add_(total.log_())
    out = own_out.mul_((own_lse - lse).exp_()[:, None])
    out.index_add_(0, target, out_slots.mul_((lse_slots - lse[target]).exp_()[:, None]))
    return out, lse


class _GatherFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_rows, kb, vb, plan: Plan, own, scale):
        """q_rows (BH*N, D); kb, vb (BH*blocks, block_size, D), zero-padded; own: (n, causal)
        when the own blocks run fused, else None."""
        bh_n, dim = q_rows.shape
        block_size = kb.shape[1]
        q_rows = q_rows * scale  # scaled once, not every score
        out_slots = q_rows.new_empty(plan.slots, dim)
        lse_slots = q_rows.new_empty(plan.slots)
        with record_function("moba: groups"):
            _groups_forward(q_rows, kb, vb, plan, out_slots, lse_slots)
        lse_slots.masked_fill_(plan.padding, float("-inf"))  # padding slots weigh nothing
        with record_function("moba: own blocks"):
            if own is None:
                own_out, own_lse = q_rows.new_zeros(bh_n, dim), q_rows.new_full((bh_n,), float("-inf"))
            else:
                n, causal = own
                bh = bh_n // n
                own_out, own_lse = _own_forward(*(_by_head(x, bh) for x in (q_rows, kb, vb)), n, block_size, causal)
                own_out, own_lse = own_out.reshape(bh_n, dim), own_lse.reshape(bh_n)
        with record_function("moba: merge"):
            out, lse = _merge(plan.rows, own_out, own_lse, out_slots, lse_slots)
        ctx.save_for_backward(q_rows, kb, vb, out, lse)
        ctx.plan, ctx.own, ctx.scale = plan, own, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q_rows, kb, vb, out, lse = ctx.saved_tensors
        plan, own = ctx.plan, ctx.own
        bh_n, dim = q_rows.shape
        block_size = kb.shape[1]
        dout = dout.contiguous()
        with record_function("moba: own blocks, backward"):
            if own is None:
                dq, dkb, dvb = torch.zeros_like(q_rows), torch.zeros_like(kb), torch.zeros_like(vb)
            else:  # the own blocks' gradients are the starting point
                n, causal = own
                bh = bh_n // n
                dq, dkb, dvb = _own_backward(
                    *(_by_head(x, bh) for x in (dout, q_rows, kb, vb, out, lse)), n, block_size, causal
                )
                dq, dkb, dvb = dq.reshape(bh_n, dim), dkb.reshape(kb.shape), dvb.reshape(vb.shape)
        delta = torch.bmm(dout.view(-1, 1, dim), out.view(-1, dim, 1)).view(-1)  # rowwise dout . out
        with record_function("moba: groups, backward"):
            for start, first, count, rows, masked in plan.chunks:
                stop, block = start + count * rows, plan.block[first : first + count]
                index = plan.rows[start:stop]
                q_chunk, do_chunk = _rows(q_rows, index, count), _rows(dout, index, count)
                keys, values = kb.index_select(0, block), vb.index_select(0, block)
                s = torch.bmm(q_chunk, keys.transpose(1, 2))
                if masked:
                    _mask_scores(s, plan.limit[start:stop].view(count, rows))
                lse_chunk = _rows(lse, index, count).masked_fill_(
                    plan.padding[start:stop].view(count, rows), float("inf")
                )
                p = s.sub_(lse_chunk[..., None]).exp_()  # padding slots: p = 0
                ds = torch.bmm(do_chunk, values.transpose(1, 2)).sub_(_rows(delta, index, count)[..., None]).mul_(p)
                dq.index_add_(0, index, torch.bmm(ds, keys).view(-1, dim))
                dkb.index_add_(0, block, torch.bmm(ds.transpose(1, 2), q_chunk))
                dvb.index_add_(0, block, torch.bmm(p.transpose(1, 2), do_chunk))
        return dq.mul_(ctx.scale), dkb, dvb, None, None, None


def attention(q, k, v, block_size, chosen, valid, causal, force_own_block, scale) -> torch.Tensor:
    """MoBA's gather path: q, k, v (B, H, N, D) with as many key heads as query heads; chosen,
    valid from the routing. Returns (B, H, N, D)."""
    batch, heads, n, dim = q.shape
    if n == 0:
        return torch.zeros_like(q)
    bh, blocks = batch * heads, math.ceil(n / block_size)
    fused = force_own_block and fused_own(q.device)
    with record_function("moba: plan"):
        plan = Plan(n, bh, block_size, chosen, valid, causal, force_own_block and not fused, q.device)
    kb, vb = (_blocks(x, block_size).reshape(bh * blocks, block_size, dim) for x in (k, v))
    out = _GatherFunction.apply(q.reshape(bh * n, dim), kb, vb, plan, (n, causal) if fused else None, scale)
    return out.view(batch, heads, n, dim)


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, H, N, D) -> (B*H, blocks, block_size, D), zero-padded."""
    batch, heads, n, dim = x.shape
    blocks = math.ceil(n / block_size)
    if blocks * block_size != n:
        x = F.pad(x, (0, 0, 0, blocks * block_size - n))
    return x.reshape(batch * heads, blocks, block_size, dim)
