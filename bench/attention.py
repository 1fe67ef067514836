"""MoBA vs dense attention: forward and forward+backward time, fp32, in one process.

    python bench/attention.py [--lengths 1024,4096,16384] [--reps 5] [--threads 2] [--out results.md]

8 heads, head dim 64, block 128, top-3 blocks, batch 1; causal and non-causal. Dense is
`torch.nn.functional.scaled_dot_product_attention`; MoBA is neuroplast's gather implementation
(routing included). Implementations take turns round after round; times are medians and each
ratio is the median of per-round ratios. On CUDA (`--device cuda`) it runs in bf16 and adds
longer sequences with `--lengths`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from neuroplast.attention import moba_attention

HEADS, HEAD_DIM, BLOCK, TOP_K = 8, 64, 128, 3


def run(kind: str, q, k, v, causal: bool, backward: bool) -> None:
    if kind == "dense":
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        out = moba_attention(q, k, v, BLOCK, TOP_K, causal=causal, implementation="gather")
    if backward:
        out.backward(torch.ones_like(out))
        for t in (q, k, v):
            t.grad = None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_pair(q, k, v, causal: bool, backward: bool, reps: int, device) -> dict[str, list[float]]:
    samples = {"dense": [], "moba": []}
    context = torch.enable_grad() if backward else torch.no_grad()
    with context:
        for kind in samples:
            run(kind, q, k, v, causal, backward)  # warm-up
        for _ in range(reps):
            for kind in samples:
                sync(device)
                start = time.perf_counter()
                run(kind, q, k, v, causal, backward)
                sync(device)
                samples[kind].append((time.perf_counter() - start) * 1e3)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lines = [
        f"batch 1, {HEADS} heads, head dim {HEAD_DIM}, block {BLOCK}, top-{TOP_K}, {dtype}, {device}, "
        f"{torch.get_num_threads()} threads, median of {args.reps}; torch {torch.__version__}",
        "",
        "| sequence | mask | pass | dense ms | MoBA ms | MoBA vs dense |",
        "|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for n in [int(x) for x in args.lengths.split(",")]:
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, generator=g).to(device, dtype) for _ in range(3))
        for causal in (True, False):
            for backward in (False, True):
                for t in (q, k, v):
                    t.requires_grad_(backward)
                samples = time_pair(q, k, v, causal, backward, args.reps, device)
                ratio = statistics.median(d / m for d, m in zip(samples["dense"], samples["moba"]))
                row = (
                    f"| {n} | {'causal' if causal else 'non-causal'} | {'fwd+bwd' if backward else 'fwd'} | "
                    f"{statistics.median(samples['dense']):.1f} | {statistics.median(samples['moba']):.1f} | {ratio:.2f}x |"
                )
                lines.append(row)
                print(row, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
