"""MoBA vs dense attention: forward and forward+backward time, fp32, in one process.

    python bench/attention.py [--lengths 1024,4096,16384] [--vit] [--routing token|block] [--reps 5]
                              [--threads 2] [--no-keep-memory] [--profile] [--out results.md]

Long sequences: 8 heads, head dim 64, block 128, top-3 blocks, batch 1; causal and non-causal.
`--vit` adds the shapes of the ViT's attention over Fashion-MNIST patches (batch 128, 4 heads,
head dim 16, non-causal, own block forced, top-3; 196 tokens in blocks of 14 and 784 in blocks
of 16), in the layout `MoBAttention` works in: q (batch, tokens, heads, dim) and keys and values
in one (batch, tokens, 2, heads, dim) tensor, as the projections give them; dense attention and
`gather` take head views of them, `kernel` reads them as they are (`moba_attention_packed`). Dense is `torch.nn.functional.scaled_dot_product_attention`; MoBA runs in both of
neuroplast's CPU implementations, `gather` (queries grouped by chosen block, batched matmuls)
and `kernel` (numba, query by query over the selected keys), routing included. Implementations
take turns round after round; times are medians and each ratio (dense / the faster MoBA) is the
median of per-round ratios. On CUDA (`--device cuda`) `gather` and `flex` (FlexAttention,
compiled) run, in bf16; `--lengths` can add longer sequences (e.g. 32768,65536,131072).
`--routing block` times per-query-block routing instead (non-causal only: each block of queries
picks its key blocks by its mean query): MoBA runs as `tiles` (one fused attention call over all
query blocks and their gathered key blocks) and, on CPU, as `kernel`; per-token `gather` runs
beside them (its own ratio in the last column), so that the two rules compare in one process.
`--profile` (CPU) then times `gather` piece by piece at the longest length (torch profiler: the
routing, the plan of the groups, the groups' attention, the own blocks, the merge, and their
backward passes), with the aten ops that take the most time.

Memory, for dense and MoBA alike: large tensors go on transparent huge pages
(`THP_MEM_ALLOC_ENABLE=1`, set before torch is imported), and glibc keeps freed memory in the
process (mallopt: no mmap below 1 GiB, no trimming), as a caching allocator such as jemalloc or
tcmalloc would, so a call reuses pages instead of faulting fresh ones in after the other
implementation's turn. `--no-keep-memory` leaves glibc's defaults.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read by torch at its first allocation

import torch
import torch.nn.functional as F
from common import Report, keep_freed_memory, machine

from neuroplast.attention import ROUTINGS, MoBAOptions, moba_attention, moba_attention_packed
from neuroplast.attention.moba import head_views

HEADS, HEAD_DIM, BLOCK, TOP_K = 8, 64, 128, 3
VIT_SHAPES = [(196, 14), (784, 16)]  # tokens, block (a square tile of the patch grid)


def heads_of(inputs):
    """(q, k, v) as (batch, heads, tokens, dim): the tensors themselves, or views of (q, kv)."""
    return inputs if len(inputs) == 3 else head_views(*inputs)


TOKEN_GATHER = "gather, per token"  # with --routing block: the per-token path, for comparison


def run(kind: str, inputs, causal: bool, backward: bool, block: int, routing: str = "token") -> None:
    if kind == TOKEN_GATHER:
        kind, routing = "gather", "token"
    options = dict(causal=causal, force_own_block=True, implementation=kind, routing=routing)
    if kind == "dense":
        out = F.scaled_dot_product_attention(*heads_of(inputs), is_causal=causal)
    elif kind == "kernel" and len(inputs) == 2:
        out = moba_attention_packed(*inputs, MoBAOptions(block, TOP_K, **options))
    else:
        q, k, v = heads_of(inputs)
        out = moba_attention(q, k, v, block, TOP_K, **options)
    if backward:
        out.backward(torch.ones_like(out))
        for t in inputs:
            t.grad = None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_all(
    kinds, inputs, causal: bool, backward: bool, reps: int, device, block: int, routing: str = "token"
) -> dict[str, list[float]]:
    samples = {kind: [] for kind in kinds}
    context = torch.enable_grad() if backward else torch.no_grad()
    with context:
        for kind in samples:
            run(kind, inputs, causal, backward, block, routing)  # warm-up
        for _ in range(reps):
            for kind in samples:
                sync(device)
                start = time.perf_counter()
                run(kind, inputs, causal, backward, block, routing)
                sync(device)
                samples[kind].append((time.perf_counter() - start) * 1e3)
    return samples


PIECES = ["routing", "plan", "groups", "own blocks", "merge", "groups, backward", "own blocks, backward"]


def profile_pieces(n: int, causal: bool, backward: bool, reps: int) -> list[str]:
    """`gather` at n tokens under the torch profiler: ms per call of each labelled piece of MoBA
    and of the aten ops that take the most time (self time), as lines of text."""
    g = torch.Generator(device="cpu").manual_seed(0)
    inputs = [torch.randn(1, HEADS, n, HEAD_DIM, generator=g).requires_grad_(backward) for _ in range(3)]
    with torch.enable_grad() if backward else torch.no_grad():
        run("gather", inputs, causal, backward, BLOCK)  # warm-up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(reps):
                run("gather", inputs, causal, backward, BLOCK)
            whole = (time.perf_counter() - start) * 1e3 / reps
    events = prof.key_averages()
    ms = {event.key: event.cpu_time_total / 1e3 / reps for event in events}
    pieces = ", ".join(f"{piece} {ms[f'moba: {piece}']:.1f}" for piece in PIECES if f"moba: {piece}" in ms)
    ops = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: e.self_cpu_time_total, reverse=True)
    top = ", ".join(f"{e.key[6:]} {e.self_cpu_time_total / 1e3 / reps:.1f}" for e in ops[:6])
    mode = f"{n} tokens, {'causal' if causal else 'non-causal'}, {'fwd+bwd' if backward else 'fwd'}"
    return [f"- {mode}: {whole:.1f} ms per call (mean of {reps}, profiled); {pieces}; most time in aten ops: {top}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--vit", action="store_true", help="also time the ViT's attention shapes")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--routing", default="token", help="token (each query picks its blocks) or block (per query block, non-causal)"
    )
    parser.add_argument("--no-keep-memory", action="store_true", help="leave glibc's allocation defaults")
    parser.add_argument("--profile", action="store_true", help="then time gather's pieces (CPU)")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.profile and torch.device(args.device).type != "cpu":
        parser.error(f"--profile times the CPU path; it needs --device cpu, not {args.device!r}")
    if args.routing not in ROUTINGS:
        parser.error(f"--routing: unknown routing {args.routing!r}; choose from {', '.join(ROUTINGS)}")
    if args.profile and args.routing != "token":
        parser.error("--profile times the gather path, which --routing token runs; drop --routing block")
    kept = not args.no_keep_memory and keep_freed_memory()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.routing == "block":
        kinds = ["dense", "tiles"] + (["kernel"] if device.type == "cpu" else []) + [TOKEN_GATHER]
    else:
        kinds = ["dense", "gather"] + (["kernel"] if device.type == "cpu" else ["flex"])
    per = "query block" if args.routing == "block" else "token"
    memory = "kept in the process" if kept else "returned (glibc defaults)"
    report = Report(args.out)
    report.add(
        f"{dtype}, {device}, {torch.get_num_threads()} threads, median of {args.reps}; torch {torch.__version__}; "
        f"top-{TOP_K}, own block forced, routing per {per}; freed memory {memory}; " + machine(device),
        "",
    )
    report.table(
        ["batch x heads x head dim", "sequence", "block", "mask", "pass"]
        + [f"{kind} ms" for kind in kinds]
        + ["MoBA vs dense"]
        + (["per token vs dense"] if TOKEN_GATHER in kinds else [])
    )
    cases = [
        (1, HEADS, HEAD_DIM, int(n), BLOCK, causal, False)
        for n in args.lengths.split(",")
        for causal in ((True, False) if args.routing == "token" else (False,))  # block routing: non-causal only
    ]
    if args.vit:
        cases += [(128, 4, 16, n, block, False, True) for n, block in VIT_SHAPES]
    for batch, heads, dim, n, block, causal, projected in cases:
        g = torch.Generator(device="cpu").manual_seed(0)
        shapes = [(batch, n, heads, dim), (batch, n, 2, heads, dim)] if projected else [(batch, heads, n, dim)] * 3
        inputs = [torch.randn(*shape, generator=g).to(device, dtype) for shape in shapes]
        for backward in (False, True):
            for t in inputs:
                t.requires_grad_(backward)
            samples = time_all(kinds, inputs, causal, backward, args.reps, device, block, args.routing)
            moba = [kind for kind in kinds[1:] if kind != TOKEN_GATHER]
            fastest = [min(values) for values in zip(*(samples[kind] for kind in moba))]
            ratio = statistics.median(d / m for d, m in zip(samples["dense"], fastest))
            times = " | ".join(f"{statistics.median(samples[kind]):.1f}" for kind in kinds)
            ratios = f"{ratio:.2f}x"
            if TOKEN_GATHER in kinds:
                token = statistics.median(d / m for d, m in zip(samples["dense"], samples[TOKEN_GATHER]))
                ratios += f" | {token:.2f}x"
            report.row(
                f"{batch} x {heads} x {dim}",
                n,
                block,
                "causal" if causal else "non-causal",
                "fwd+bwd" if backward else "fwd",
                times,
                ratios,
            )
    if args.profile:
        n = max(int(length) for length in args.lengths.split(","))
        report.add("", f"`gather` piece by piece (ms per call; block {BLOCK}, top-{TOP_K}):", "")
        for causal in (False, True):
            for backward in (False, True):
                report.add(*profile_pieces(n, causal, backward, args.reps))
    report.save()


if __name__ == "__main__":
    main()
