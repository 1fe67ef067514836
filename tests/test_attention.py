"""MoBA: the routing rules, both implementations against an independent per-query oracle, gradients."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import neuroplast.attention.gather as gather
import neuroplast.attention.moba as moba_impl
from neuroplast.attention import (
    MoBAOptions,
    MoBAttention,
    flex,
    inverse_order,
    kernels,
    key_convolution,
    moba_attention,
    tile_order,
)

# the implementations held to the reference; "gather-grouped-own" is gather as it runs off the
# CPU, with the own blocks in the groups instead of PyTorch's fused CPU attention kernel
FAST = ["gather", "gather-grouped-own", "kernel"]


def skip_without(implementation: str) -> None:
    if implementation == "kernel" and not kernels.available():
        pytest.skip("numba kernels not available")


def use(implementation: str, monkeypatch) -> str:
    """The implementation argument that runs a FAST variant (skipped where it cannot run)."""
    skip_without(implementation)
    if implementation == "gather-grouped-own":
        monkeypatch.setattr(gather, "FUSED_OWN_DEVICES", ())
        return "gather"
    return implementation


def assert_same_as_reference(implementation, q, k, v, *args, wrt=None, atol=None, rtol=None, **kwargs):
    """MoBA's output and its gradients (of a loss that weighs every output) with respect to `wrt`
    (default q, k, v) equal the reference implementation's."""
    results = {}
    for name in ("reference", implementation):
        out = moba_attention(q, k, v, *args, implementation=name, **kwargs)
        results[name] = (out, *torch.autograd.grad((out * out.detach().cos()).sum(), wrt or (q, k, v)))
    for fast, reference in zip(results[implementation], results["reference"], strict=True):
        torch.testing.assert_close(fast, reference, atol=atol, rtol=rtol)


def rand(*shape, seed=0, grad=True):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.requires_grad_(grad)


@torch.no_grad()
def oracle(q, k, v, block_size, top_k, causal, force_own):
    """MoBA written from the paper's rules, one query at a time (slow, obviously right)."""
    batch, heads, n, dim = q.shape
    k = k.repeat_interleave(heads // k.shape[1], 1)
    v = v.repeat_interleave(heads // v.shape[1], 1)
    blocks = math.ceil(n / block_size)
    out = torch.zeros(batch, heads, n, dim, dtype=q.dtype)
    for b in range(batch):
        for h in range(heads):
            centroids = torch.stack(
                [k[b, h, i * block_size : (i + 1) * block_size].float().mean(0) for i in range(blocks)]
            )
            for t in range(n):
                own = t // block_size
                scores = q[b, h, t].float() @ centroids.t()
                if causal:
                    candidates = [i for i in range(blocks) if (i + 1) * block_size <= t]
                elif force_own:
                    candidates = [i for i in range(blocks) if i != own]
                else:
                    candidates = list(range(blocks))
                count = top_k - 1 if force_own else top_k
                ranked = sorted(candidates, key=lambda i: -float(scores[i]))[: max(count, 0)]
                chosen = set(ranked) | ({own} if force_own else set())
                keys = [j for j in range(n) if j // block_size in chosen and (not causal or j <= t)]
                logits = (k[b, h, keys] @ q[b, h, t]) / math.sqrt(dim)
                out[b, h, t] = logits.softmax(0) @ v[b, h, keys]
    return out


CASES = [
    # n, block, top_k, causal, force_own, heads, kv_heads
    (37, 8, 3, True, True, 4, 2),  # odd length, short last block, GQA
    (29, 5, 2, True, True, 2, 2),
    (40, 8, 1, True, True, 2, 1),  # k = 1: own block only (block-diagonal causal)
    (50, 7, 3, False, False, 3, 1),  # non-causal, own block not forced
    (45, 9, 2, False, True, 2, 2),  # non-causal, own block forced
    (64, 16, 3, False, True, 1, 1),
    (5, 8, 2, True, True, 2, 1),  # one short block
    (9, 8, 3, False, False, 2, 2),  # a full block and a one-token block
]


@pytest.mark.parametrize("n,block,top_k,causal,force_own,heads,kv_heads", CASES)
@pytest.mark.parametrize("implementation", ["reference", *FAST])
def test_moba_matches_the_per_query_oracle(
    n, block, top_k, causal, force_own, heads, kv_heads, implementation, monkeypatch
):
    implementation = use(implementation, monkeypatch)
    q, k, v = rand(2, heads, n, 8, seed=1), rand(2, kv_heads, n, 8, seed=2), rand(2, kv_heads, n, 8, seed=3)
    out = moba_attention(q, k, v, block, top_k, causal=causal, force_own_block=force_own, implementation=implementation)
    torch.testing.assert_close(out, oracle(q, k, v, block, top_k, causal, force_own))


@pytest.mark.parametrize("n,block,top_k,causal,force_own,heads,kv_heads", CASES)
@pytest.mark.parametrize("conv", [None, 3])
@pytest.mark.parametrize("implementation", FAST)
def test_fast_gradients_equal_the_reference(
    n, block, top_k, causal, force_own, heads, kv_heads, conv, implementation, monkeypatch
):
    implementation = use(implementation, monkeypatch)
    q, k, v = rand(2, heads, n, 8, seed=4), rand(2, kv_heads, n, 8, seed=5), rand(2, kv_heads, n, 8, seed=6)
    weight = rand(kv_heads, 8, conv, seed=7) if conv else None
    inputs = (q, k, v) + ((weight,) if conv else ())
    assert_same_as_reference(implementation, q, k, v, block, top_k, causal, force_own, key_conv=weight, wrt=inputs)


@pytest.mark.parametrize("implementation", FAST)
def test_fast_paths_pass_gradcheck(implementation, monkeypatch):
    implementation = use(implementation, monkeypatch)
    q, k, v = rand(1, 2, 19, 4, seed=8), rand(1, 1, 19, 4, seed=9), rand(1, 1, 19, 4, seed=10)
    for causal in (True, False):
        assert torch.autograd.gradcheck(
            lambda q, k, v, causal=causal: moba_attention(q, k, v, 4, 2, causal, implementation=implementation),
            (q, k, v),
        )


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("implementation", ["reference", *FAST])
def test_top_k_covering_every_block_is_dense_attention(causal, implementation, monkeypatch):
    implementation = use(implementation, monkeypatch)
    q, k, v = rand(2, 4, 45, 8, seed=11), rand(2, 4, 45, 8, seed=12), rand(2, 4, 45, 8, seed=13)
    out = moba_attention(q, k, v, 8, 6, causal=causal, implementation=implementation)  # 6 blocks
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal))


@pytest.mark.parametrize("implementation", ["kernel", "gather", "reference"])
@pytest.mark.parametrize("causal,conv", [(True, None), (False, None), (False, 3)])
def test_packed_layout_equals_head_views(implementation, causal, conv, monkeypatch):
    """moba_attention_packed on (B, N, H, D) and (B, N, 2, Hkv, D) is moba_attention on the head
    views of them: the same output and the same gradients (the kernel reads the layout as it is)."""
    implementation = use(implementation, monkeypatch)
    q, kv = rand(2, 37, 4, 8, seed=40), rand(2, 37, 2, 2, 8, seed=41)
    weight = rand(2, 8, conv, seed=42) if conv else None
    options = MoBAOptions(8, 3, causal=causal, implementation=implementation)
    packed = moba_impl.moba_attention_packed(q, kv, options, key_conv=weight)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    heads = moba_attention(q.transpose(1, 2), k, v, 8, 3, causal=causal, key_conv=weight, implementation=implementation)
    torch.testing.assert_close(packed, heads.transpose(1, 2))
    wrt = (q, kv) + ((weight,) if conv else ())
    for a, b in zip(
        torch.autograd.grad((packed * packed.detach().cos()).sum(), wrt),
        torch.autograd.grad((heads.transpose(1, 2) * packed.detach().cos()).sum(), wrt),
        strict=True,
    ):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r"must be \(B, N, H, D\)"):
        moba_impl.moba_attention_packed(q, kv[:, :, 0], MoBAOptions(8, 3))


def test_causal_routing_never_looks_ahead():
    """Changing future tokens changes no earlier output (future blocks are never chosen, and the
    own block is masked token by token)."""
    q, k, v = (
        rand(1, 2, 40, 8, seed=14, grad=False),
        rand(1, 2, 40, 8, seed=15, grad=False),
        rand(1, 2, 40, 8, seed=16, grad=False),
    )
    before = moba_attention(q, k, v, 8, 2, implementation="gather")
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 21:] = rand(1, 2, 19, 8, seed=17, grad=False) * 10
    v2[:, :, 21:] = rand(1, 2, 19, 8, seed=18, grad=False)
    after = moba_attention(q, k2, v2, 8, 2, implementation="gather")
    torch.testing.assert_close(after[:, :, :21], before[:, :, :21])


def test_key_convolution_is_causal_and_identity_initialised_layers_change_nothing():
    k = rand(1, 2, 12, 4, seed=19, grad=False)
    weight = rand(2, 4, 3, seed=20, grad=False)
    y = key_convolution(k, weight, causal=True)
    expected = sum(weight[None, :, None, :, i] * F.pad(k, (0, 0, 2 - i, i))[:, :, :12] for i in range(3))
    torch.testing.assert_close(y, expected)
    torch.manual_seed(0)
    with_conv = MoBAttention(16, 4, block_size=4, top_k=2, key_conv=3, causal=True)
    torch.manual_seed(0)
    without = MoBAttention(16, 4, block_size=4, top_k=2, causal=True)
    x = torch.randn(2, 21, 16)
    torch.testing.assert_close(with_conv(x), without(x))


def test_tile_order_makes_each_block_a_square_tile():
    order = tile_order(6, 8, 2, 4)  # 3 x 2 tiles of 2 x 4 patches
    rows, cols = order // 8, order % 8
    for block in range(6):
        r, c = rows[block * 8 : (block + 1) * 8], cols[block * 8 : (block + 1) * 8]
        assert r.max() - r.min() == 1 and c.max() - c.min() == 3  # one 2 x 4 tile
    tokens = torch.arange(48)[None]
    assert torch.equal(tokens[:, order][:, inverse_order(order)], tokens)
    with pytest.raises(ValueError, match="do not divide"):
        tile_order(6, 8, 4, 4)


def test_module_with_tiles_and_every_block_equals_dense_attention():
    torch.manual_seed(0)
    moba = MoBAttention(16, 2, block_size=4, top_k=4, grid=(4, 4), tile=(2, 2))
    dense = MoBAttention(16, 2, block_size=4, top_k=4, full=True)
    dense.load_state_dict(moba.state_dict())
    x = torch.randn(3, 16, 16)
    torch.testing.assert_close(moba(x), dense(x), atol=1e-5, rtol=1e-5)


def test_bad_arguments_are_named():
    q = torch.randn(1, 3, 8, 4)
    k = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="not a multiple of 2 key/value heads"):
        moba_attention(q, k, k, 4, 2)
    with pytest.raises(
        ValueError, match="unknown implementation 'fast'; choose from: auto, flex, gather, kernel, reference"
    ):
        moba_attention(k, k, k, 4, 2, implementation="fast")
    with pytest.raises(ValueError, match="force_own_block=False needs causal=False"):
        moba_attention(k, k, k, 4, 2, causal=True, force_own_block=False)
    with pytest.raises(ValueError, match="not block_size 8"):
        MoBAttention(16, 2, block_size=8, top_k=2, grid=(4, 4), tile=(2, 2))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("variant", ["gather", "gather-grouped-own"])
def test_gather_group_by_group_equals_all_groups_at_once(monkeypatch, causal, variant):
    use(variant, monkeypatch)
    q, k, v = rand(2, 4, 45, 8, seed=21), rand(2, 2, 45, 8, seed=22), rand(2, 2, 45, 8, seed=23)
    whole = moba_attention(q, k, v, 8, 3, causal=causal, implementation="gather")
    grads = torch.autograd.grad(whole.sum(), (q, k, v))
    monkeypatch.setattr(gather, "CHUNK_SCORES", 1)  # one group per chunk
    split = moba_attention(q, k, v, 8, 3, causal=causal, implementation="gather")
    torch.testing.assert_close(split, whole)
    for a, b in zip(torch.autograd.grad(split.sum(), (q, k, v)), grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "causal,force_own,top_k", [(True, True, 3), (False, True, 3), (False, False, 2), (True, True, 9)]
)
@pytest.mark.parametrize("kv_heads,chunk", [(3, None), (1, 100), (3, 648)])
def test_routing_kernel_chooses_what_the_torch_routing_chooses(monkeypatch, causal, force_own, top_k, kv_heads, chunk):
    """The same blocks, also with grouped key heads and with the scores taken a few queries at a
    time (chunk: score elements per chunk; 100 makes chunks of one block of queries, 648 of two
    blocks, the last chunk short)."""
    skip_without("kernel")
    from neuroplast.attention import select_blocks

    if chunk is not None:
        monkeypatch.setattr(kernels, "ROUTE_CHUNK_SCORES", chunk)
    q, k = rand(2, 3, 53, 8, seed=30, grad=False), rand(2, kv_heads, 53, 8, seed=31, grad=False)
    picks = {}
    for which in ("numba", "torch"):
        monkeypatch.setenv("NEUROPLAST_KERNELS", which)
        chosen, valid = select_blocks(q, k, 6, top_k, causal, force_own)
        picks[which] = (torch.where(valid, chosen, -1), valid)
    assert torch.equal(picks["numba"][1], picks["torch"][1])
    assert torch.equal(picks["numba"][0], picks["torch"][0])


@pytest.mark.parametrize("causal,force_own", [(True, True), (False, True), (False, False)])
def test_routing_kernel_breaks_ties_towards_the_lower_block(monkeypatch, causal, force_own):
    """Equal gate scores everywhere: each query takes its lowest eligible blocks, in order."""
    skip_without("kernel")
    monkeypatch.setenv("NEUROPLAST_KERNELS", "numba")
    n, block, top_k = 40, 4, 4
    ones = torch.ones(1, 2, n, 8)
    chosen, valid = moba_impl.select_blocks(ones, ones, block, top_k, causal, force_own)
    count = top_k - 1 if force_own else top_k
    for t in range(n):
        own = t // block
        eligible = [b for b in range(n // block) if (b < own if causal else not (force_own and b == own))]
        expected = eligible[:count]
        for h in range(2):
            assert chosen[0, h, t][valid[0, h, t]].tolist() == expected


@pytest.mark.parametrize("causal,force_own", [(True, True), (False, True), (False, False)])
def test_kernel_selections_list_each_querys_blocks_in_order_with_the_own_block(causal, force_own):
    skip_without("kernel")
    n, block = 53, 6
    q, k = rand(2, 3, n, 8, seed=32, grad=False), rand(2, 3, n, 8, seed=33, grad=False)
    chosen, valid = moba_impl.select_blocks(q, k, block, 4, causal, force_own)
    sel, count = kernels.selections(chosen, valid, block, force_own)
    blocks = math.ceil(n / block)
    for task, (b, h) in enumerate((b, h) for b in range(2) for h in range(3)):
        for t in range(n):
            expected = set(chosen[b, h, t][valid[b, h, t]].tolist()) | ({t // block} if force_own else set())
            assert count[task, t] == len(expected)
            assert sel[task, t].tolist() == sorted(expected) + [blocks] * (sel.shape[2] - len(expected))


def test_auto_takes_the_kernel_for_small_tiles_and_gather_for_large_ones(monkeypatch):
    if not kernels.usable(torch.zeros(1)):
        pytest.skip("numba is not available")
    taken = []
    real_gather, real_kernel = moba_impl._gather, kernels.attention
    monkeypatch.setattr(moba_impl, "_gather", lambda *a: taken.append("gather") or real_gather(*a))
    monkeypatch.setattr(kernels, "attention", lambda *a: taken.append("kernel") or real_kernel(*a))
    small, large = rand(1, 2, 40, 16, seed=1), rand(1, 2, 200, 32, seed=2)
    moba_attention(small, small, small, 8, 2)  # blocks of 8, heads of 16
    moba_attention(large, large, large, 64, 2)  # blocks of 64, heads of 32
    assert taken == ["kernel", "gather"]


def skip_without_flex() -> None:
    if not flex.available():
        pytest.skip("FlexAttention is not available in this torch")


@pytest.mark.parametrize("n,block,top_k,causal,force_own,heads,kv_heads", CASES)
def test_flex_forward_matches_the_per_query_oracle(n, block, top_k, causal, force_own, heads, kv_heads):
    skip_without_flex()
    q, k, v = (rand(2, h, n, 8, seed=s, grad=False) for h, s in ((heads, 1), (kv_heads, 2), (kv_heads, 3)))
    out = moba_attention(q, k, v, block, top_k, causal=causal, force_own_block=force_own, implementation="flex")
    torch.testing.assert_close(out, oracle(q, k, v, block, top_k, causal, force_own))


@pytest.mark.parametrize("causal", [True, False])
def test_flex_with_every_block_is_dense_attention(causal):
    skip_without_flex()
    q, k, v = (rand(1, 2, 300, 8, seed=s, grad=False) for s in (11, 12, 13))
    out = moba_attention(q, k, v, 50, 6, causal=causal, implementation="flex")  # 6 blocks
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal))


@pytest.mark.parametrize("block,causal", [(128, True), (128, False), (48, True), (200, False)])
def test_flex_block_mask_lists_every_tile_a_row_reads_and_full_tiles_only_when_whole(block, causal):
    """Rows sorted by key block, 128-row tiles: a listed tile is read by some row, every read is
    in a listed tile, and a "full" tile (mask_mod skipped) is read whole by all of its rows."""
    skip_without_flex()
    n, batch, heads = 1000, 2, 2
    q, k = rand(batch, heads, n, 16, seed=30, grad=False), rand(batch, heads, n, 16, seed=31, grad=False)
    chosen, valid = moba_impl.select_blocks(q, k, block, 3, causal, True)
    row_query, lo, hi = flex.rows(n, block, chosen, valid, causal, True)
    # as many rows for another routing: the compiled kernel's shapes stay put from step to step
    other = moba_impl.select_blocks(rand(batch, heads, n, 16, seed=32, grad=False), k, block, 3, causal, True)
    assert flex.rows(n, block, *other, causal, True)[1].shape == lo.shape
    # each (batch x head) holds every query's own block and valid choices, sorted by block
    assert (lo <= hi).sum().item() == batch * heads * n + int(valid.sum())
    real_lo = torch.where(lo <= hi, lo, n)
    assert (real_lo[:, 1:] >= real_lo[:, :-1]).all()
    mask = flex.block_mask(lo, hi, n, batch, heads, block)
    width, tile = lo.shape[1], flex.TILE
    keys = torch.arange(n)
    reads = (keys >= lo[..., None]) & (keys <= hi[..., None])  # (BH, rows, keys)
    tiled = lambda x, key_padding: F.pad(  # noqa: E731
        F.pad(x, (0, -n % tile), value=key_padding), (0, 0, 0, -width % tile)
    ).view(batch * heads, -1, tile, n // tile + 1, tile)
    read_tiles = tiled(reads, False).any(-1).any(-2)  # (BH, q tiles, kv tiles)
    whole_tiles = tiled(reads, True).all(-1).all(-2)  # every row reads every real key
    listed = torch.zeros_like(read_tiles)
    full = torch.zeros_like(read_tiles)
    for target, count, index in (
        (listed, mask.kv_num_blocks, mask.kv_indices),
        (full, mask.full_kv_num_blocks, mask.full_kv_indices),
    ):
        count, index = count.reshape(batch * heads, -1), index.reshape(batch * heads, index.shape[-2], -1)
        for g in range(batch * heads):
            for t in range(count.shape[1]):
                target[g, t, index[g, t, : count[g, t]].long()] = True
    assert not (listed & full).any()
    assert torch.equal(listed | full, read_tiles)
    assert (whole_tiles[full]).all()
    assert listed.any() and (full.any() or block < tile)


def test_flex_refuses_to_train_on_cpu_and_auto_takes_it_where_preferred(monkeypatch):
    skip_without_flex()
    q = rand(1, 2, 40, 8, seed=40)
    with pytest.raises(ValueError, match="'flex' has no backward on CPU.*use 'gather', 'kernel' or 'auto'"):
        moba_attention(q, q, q, 8, 2, implementation="flex")
    taken = []
    real = flex.moba_flex
    monkeypatch.setattr(flex, "preferred", lambda q: True)
    monkeypatch.setattr(flex, "moba_flex", lambda *a: taken.append("flex") or real(*a))
    with torch.no_grad():
        out = moba_attention(q, q, q, 8, 2)
    assert taken == ["flex"]
    torch.testing.assert_close(out, moba_attention(q, q, q, 8, 2, implementation="reference"))


def test_flex_compiled_call_may_keep_more_versions_than_torchs_default(monkeypatch):
    """Off CPU, flex_attention runs compiled with room for RECOMPILE_LIMIT versions (shapes, grad
    modes), so a benchmark over many lengths never falls back to eager flex_attention."""
    skip_without_flex()
    from types import SimpleNamespace

    import torch._dynamo.config as dynamo_config

    seen = []

    def compiled(q, k, v, **kwargs):
        seen.append(dynamo_config.recompile_limit)
        out, lse = torch.zeros_like(q), q.new_zeros(q.shape[:-1])
        return (out, SimpleNamespace(lse=lse)) if "return_aux" in kwargs else (out, lse)

    monkeypatch.setattr(flex, "_compiled", None)
    monkeypatch.setattr(torch, "compile", lambda function, dynamic: compiled)
    q = torch.zeros(1, 1, 128, 8, device="meta")
    flex._attend(q, q, q, None, 1.0)
    assert seen == [flex.RECOMPILE_LIMIT] and dynamo_config.recompile_limit != flex.RECOMPILE_LIMIT


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("causal", [True, False])
def test_flex_on_cuda_gradients_equal_the_reference(causal):
    skip_without_flex()
    q, k, v = (rand(2, 4, 300, 16, seed=s, grad=False).float().cuda().requires_grad_() for s in (50, 51, 52))
    assert_same_as_reference("flex", q, k, v, 32, 3, causal, atol=2e-4, rtol=1e-3)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CUDA_CASES = [
    # n, block, top_k, causal, force_own, heads, kv_heads: several 128-row tiles, short last
    # blocks, GQA, non-causal with and without the forced own block
    (301, 24, 2, False, False, 2, 1),
    (299, 40, 3, False, True, 4, 2),
    (300, 32, 3, True, True, 4, 2),
]


@needs_cuda
@pytest.mark.parametrize("n,block,top_k,causal,force_own,heads,kv_heads", CUDA_CASES)
@pytest.mark.parametrize("implementation", ["flex", "gather"])
def test_cuda_paths_match_the_reference_in_float32(n, block, top_k, causal, force_own, heads, kv_heads, implementation):
    """On CUDA, flex (FlexAttention, compiled) and gather (the own blocks in the groups: no fused
    kernel there): outputs and gradients equal the reference's."""
    if implementation == "flex":
        skip_without_flex()
    q = rand(2, heads, n, 16, seed=70, grad=False).float().cuda().requires_grad_()
    k, v = (rand(2, kv_heads, n, 16, seed=s, grad=False).float().cuda().requires_grad_() for s in (71, 72))
    assert_same_as_reference(implementation, q, k, v, block, top_k, causal, force_own, atol=2e-4, rtol=1e-3)


@needs_cuda
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("implementation", ["flex", "gather"])
def test_cuda_bfloat16_forward_is_close_to_the_float32_reference(causal, implementation):
    """bf16 in, bf16 out (the benchmark's setting); the same routing as fp32 (the gate is computed
    in fp32), so only the attention arithmetic rounds."""
    if implementation == "flex":
        skip_without_flex()
    q, k, v = (rand(1, 4, 1000, 64, seed=s, grad=False).cuda().bfloat16() for s in (80, 81, 82))
    with torch.no_grad():
        out = moba_attention(q, k, v, 128, 3, causal=causal, force_own_block=True, implementation=implementation)
        exact = moba_attention(
            *(x.float() for x in (q, k, v)), 128, 3, causal=causal, force_own_block=True, implementation="reference"
        )
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), exact, atol=2e-2, rtol=2e-2)


@needs_cuda
@pytest.mark.parametrize("n,block,top_k,force_own", [(301, 24, 2, False), (299, 40, 3, True)])
def test_tiles_on_cuda_match_the_reference(n, block, top_k, force_own):
    """Block routing's tiles on CUDA: fp32 outputs and gradients equal the reference's, and the
    bf16 forward is close to the fp32 reference (PyTorch's fused attention in both)."""
    q = rand(2, 4, n, 16, seed=110, grad=False).float().cuda().requires_grad_()
    k, v = (rand(2, 2, n, 16, seed=s, grad=False).float().cuda().requires_grad_() for s in (111, 112))
    options = dict(causal=False, force_own_block=force_own, routing="block")
    assert_same_as_reference("tiles", q, k, v, block, top_k, atol=2e-4, rtol=1e-3, **options)
    with torch.no_grad():  # the fp32 reference of the bf16-rounded inputs: the same routing
        rounded = [x.bfloat16() for x in (q, k, v)]
        out = moba_attention(*rounded, block, top_k, implementation="tiles", **options)
        exact = moba_attention(*(x.float() for x in rounded), block, top_k, implementation="reference", **options)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), exact, atol=2e-2, rtol=2e-2)


@needs_cuda
def test_auto_takes_flex_on_cuda_and_a_moba_layer_trains_there_as_on_cpu():
    """`auto` resolves to flex on CUDA; a ViT-shaped MoBA layer (784 pixel tokens in 4x4 tiles)
    gives the same output and parameter gradients on CUDA as the reference on CPU."""
    skip_without_flex()
    pytest.importorskip("triton")
    assert moba_impl._resolve(MoBAOptions(8, 3), torch.zeros(1, 1, 8, 4, device="cuda")) == "flex"
    torch.manual_seed(0)
    cpu = MoBAttention(32, 2, block_size=16, top_k=3, grid=(28, 28), tile=(4, 4), implementation="reference")
    gpu = MoBAttention(32, 2, block_size=16, top_k=3, grid=(28, 28), tile=(4, 4)).cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(2, 784, 32, generator=torch.Generator().manual_seed(1))
    results = []
    for layer, inputs in ((cpu, x), (gpu, x.cuda())):
        out = layer(inputs)
        grads = torch.autograd.grad((out * out.detach().cos()).sum(), list(layer.parameters()))
        results.append([out.cpu(), *(g.cpu() for g in grads)])
    for on_gpu, on_cpu in zip(*reversed(results), strict=True):
        torch.testing.assert_close(on_gpu, on_cpu, atol=2e-4, rtol=1e-3)


F32_CASES = [
    # n, block, top_k, causal, force_own: odd lengths, short last blocks, block lengths that are
    # and are not multiples of the key alignment
    (300, 32, 3, True, True),
    (290, 20, 3, True, True),
    (301, 24, 2, False, False),
    (299, 40, 3, False, True),
    (256, 64, 1, True, True),
]


@pytest.mark.parametrize("n,block,top_k,causal,force_own", F32_CASES)
@pytest.mark.parametrize("implementation", FAST)
def test_float32_outputs_and_gradients_match_the_reference(
    n, block, top_k, causal, force_own, implementation, monkeypatch
):
    implementation = use(implementation, monkeypatch)
    q, k, v = (rand(2, 4, n, 16, seed=s, grad=False).float().requires_grad_() for s in (60, 61, 62))
    assert_same_as_reference(implementation, q, k, v, block, top_k, causal, force_own, atol=2e-5, rtol=1e-4)


def test_gather_labels_its_pieces_for_the_profiler():
    """`bench/attention.py --profile` reads these labels: each piece of the gather path, forward
    and backward, shows up once per call."""
    q, k, v = (rand(1, 2, 40, 8, seed=s) for s in (1, 2, 3))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = moba_attention(q, k, v, 8, 2, causal=True, implementation="gather")
        out.sum().backward()
    counts = {event.key: event.count for event in prof.key_averages()}
    pieces = ["routing", "plan", "groups", "own blocks", "merge", "groups, backward", "own blocks, backward"]
    assert {piece: counts.get(f"moba: {piece}") for piece in pieces} == dict.fromkeys(pieces, 1)


# per-query-block routing (non-causal): all queries of a block share the blocks its mean query chose

BLOCK_CASES = [
    # n, block, top_k, force_own, heads, kv_heads
    (37, 8, 3, True, 4, 2),  # short last block (of queries and of keys), GQA
    (50, 7, 3, False, 3, 1),
    (45, 9, 2, True, 2, 2),
    (64, 16, 1, True, 1, 1),  # k = 1: the own block only
    (9, 8, 3, False, 2, 2),  # a full block and a one-token block
    (37, 8, 7, True, 4, 2),  # top_k past the 5 blocks, own block forced: each block once
    (40, 8, 1, False, 2, 1),  # k = 1, no forced own block: one chosen block
]
BLOCK_IMPLEMENTATIONS = ["reference", "tiles", *FAST]


@torch.no_grad()
def block_oracle(q, k, v, block_size, top_k, force_own):
    """Per-query-block routing from its definition, one query block at a time: the mean of the
    block's real queries scores each key block's mean key; every query of the block attends to
    the chosen blocks' keys."""
    batch, heads, n, dim = q.shape
    k = k.repeat_interleave(heads // k.shape[1], 1)
    v = v.repeat_interleave(heads // v.shape[1], 1)
    blocks = math.ceil(n / block_size)
    out = torch.zeros(batch, heads, n, dim, dtype=q.dtype)
    span = lambda i: slice(i * block_size, min((i + 1) * block_size, n))  # noqa: E731
    for b in range(batch):
        for h in range(heads):
            centroids = torch.stack([k[b, h, span(j)].float().mean(0) for j in range(blocks)])
            for i in range(blocks):
                scores = q[b, h, span(i)].float().mean(0) @ centroids.t()
                candidates = [j for j in range(blocks) if not (force_own and j == i)]
                count = top_k - 1 if force_own else top_k
                chosen = set(sorted(candidates, key=lambda j: -float(scores[j]))[: max(count, 0)])
                chosen |= {i} if force_own else set()
                keys = [t for t in range(n) if t // block_size in chosen]
                logits = (q[b, h, span(i)] @ k[b, h, keys].t()) / math.sqrt(dim)
                out[b, h, span(i)] = logits.softmax(-1) @ v[b, h, keys]
    return out


@pytest.mark.parametrize("n,block,top_k,force_own,heads,kv_heads", BLOCK_CASES)
@pytest.mark.parametrize("implementation", BLOCK_IMPLEMENTATIONS)
def test_block_routing_matches_the_per_block_oracle(
    n, block, top_k, force_own, heads, kv_heads, implementation, monkeypatch
):
    implementation = use(implementation, monkeypatch)
    q, k, v = rand(2, heads, n, 8, seed=90), rand(2, kv_heads, n, 8, seed=91), rand(2, kv_heads, n, 8, seed=92)
    out = moba_attention(
        q, k, v, block, top_k, causal=False, force_own_block=force_own, implementation=implementation, routing="block"
    )
    torch.testing.assert_close(out, block_oracle(q, k, v, block, top_k, force_own))


def test_flex_forward_with_block_routing_matches_the_per_block_oracle():
    skip_without_flex()
    q, k, v = (rand(2, h, 37, 8, seed=s, grad=False) for h, s in ((4, 90), (2, 91), (2, 92)))
    out = moba_attention(q, k, v, 8, 3, causal=False, force_own_block=True, implementation="flex", routing="block")
    torch.testing.assert_close(out, block_oracle(q, k, v, 8, 3, True))


@pytest.mark.parametrize("n,block,top_k,force_own,heads,kv_heads", BLOCK_CASES)
@pytest.mark.parametrize("conv", [None, 3])
@pytest.mark.parametrize("implementation", ["tiles", *FAST])
def test_block_routing_gradients_equal_the_reference(
    n, block, top_k, force_own, heads, kv_heads, conv, implementation, monkeypatch
):
    implementation = use(implementation, monkeypatch)
    q, k, v = rand(2, heads, n, 8, seed=93), rand(2, kv_heads, n, 8, seed=94), rand(2, kv_heads, n, 8, seed=95)
    weight = rand(kv_heads, 8, conv, seed=96) if conv else None
    inputs = (q, k, v) + ((weight,) if conv else ())
    assert_same_as_reference(
        implementation, q, k, v, block, top_k, False, force_own, key_conv=weight, wrt=inputs, routing="block"
    )


@pytest.mark.parametrize("n,block,top_k,force_own", [(301, 24, 2, False), (299, 40, 3, True), (256, 64, 3, True)])
def test_tiles_float32_outputs_and_gradients_match_the_reference(n, block, top_k, force_own):
    q, k, v = (rand(2, 4, n, 16, seed=s, grad=False).float().requires_grad_() for s in (97, 98, 99))
    assert_same_as_reference("tiles", q, k, v, block, top_k, False, force_own, atol=2e-5, rtol=1e-4, routing="block")


@pytest.mark.parametrize("force_own", [True, False])
def test_block_routing_covering_every_block_is_dense_attention(force_own):
    q, k, v = rand(2, 4, 45, 8, seed=100), rand(2, 4, 45, 8, seed=101), rand(2, 4, 45, 8, seed=102)
    out = moba_attention(q, k, v, 8, 6, causal=False, force_own_block=force_own, routing="block")  # 6 blocks
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


def test_block_routing_shares_each_blocks_choice_and_auto_takes_tiles(monkeypatch):
    q, k = rand(1, 2, 61, 8, seed=103, grad=False), rand(1, 2, 61, 8, seed=104, grad=False)  # short last block
    chosen, valid = moba_impl.select_blocks(q, k, 8, 3, False, True, routing="block")
    per_block, _ = moba_impl.select_query_blocks(q, k, 8, 3, True)
    assert chosen.shape == (1, 2, 61, 2) and valid.all()
    for t in range(61):  # every query holds its block's choice
        assert torch.equal(chosen[:, :, t], per_block[:, :, t // 8])
    assert not (per_block == torch.arange(8)[:, None]).any()  # the forced own block is not chosen again
    by_token, _ = moba_impl.select_blocks(q, k, 8, 3, False, True)
    assert not torch.equal(chosen, by_token)  # a different rule: queries of a block disagree
    taken = []
    monkeypatch.setattr(moba_impl.tiles, "attention", lambda q, *a: taken.append("tiles") or torch.zeros_like(q))
    moba_attention(q, k, k, 8, 3, causal=False, routing="block")
    assert taken == ["tiles"]


@pytest.mark.parametrize("routing", ["token", "block"])
def test_no_tokens_give_no_output(routing):
    q = torch.zeros(1, 2, 0, 8)
    assert moba_attention(q, q, q, 8, 2, causal=False, routing=routing).shape == q.shape
    options = MoBAOptions(8, 2, causal=False, routing=routing)
    packed = moba_impl.moba_attention_packed(torch.zeros(1, 0, 2, 8), torch.zeros(1, 0, 2, 2, 8), options)
    assert packed.shape == (1, 0, 2, 8)


def test_block_routing_refuses_causal_attention_and_tiles_needs_it():
    q = rand(1, 2, 40, 8, seed=105)
    with pytest.raises(ValueError, match="routing 'block' needs causal=False.*use routing='token'"):
        moba_attention(q, q, q, 8, 2, causal=True, routing="block")
    with pytest.raises(ValueError, match="'tiles' needs routing='block'.*choose from: auto, flex"):
        moba_attention(q, q, q, 8, 2, causal=False, implementation="tiles")
    with pytest.raises(ValueError, match="unknown routing 'blocks'; choose from: token, block"):
        moba_attention(q, q, q, 8, 2, causal=False, routing="blocks")


def test_module_with_block_routing_computes_tiles_and_refuses_causal():
    torch.manual_seed(0)
    layer = MoBAttention(
        16, 2, block_size=4, top_k=2, grid=(4, 4), tile=(2, 2), routing="block", implementation="tiles"
    )
    x = torch.randn(2, 16, 16)
    taken = []
    real = moba_impl.tiles.attention
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(moba_impl.tiles, "attention", lambda *a: taken.append("tiles") or real(*a))
        out = layer(x)
    assert taken == ["tiles"] and "routing=block" in repr(layer)
    layer.options = dataclasses.replace(layer.options, implementation="reference")
    torch.testing.assert_close(out, layer(x))
    with pytest.raises(ValueError, match="routing 'block' needs causal=False"):
        MoBAttention(16, 2, block_size=4, top_k=2, causal=True, routing="block")
    with pytest.raises(ValueError, match="unknown routing 'x'; choose from: token, block"):
        MoBAttention(16, 2, block_size=4, top_k=2, routing="x")
