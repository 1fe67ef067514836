"""Forward+backward time of one sparse Linear layer: dense, masked, neuroplast csr (on its
torch.sparse fallback and on its numba kernels) and sparselab.

    python bench/sparse_linear.py [--reps 7] [--threads 2] [--out results.md]

Batch 128; both backward products (dx and dW) are computed, as in a hidden layer. In each cell
the implementations take turns, round after round (`--reps` rounds, each sample >= 20 ms of
repeated steps), all in this one process; times are medians over rounds and each ratio is the
median of the per-round ratios, so they compare like with like even while a shared machine
drifts. Before timing, the csr layers' outputs are checked against the masked layer's. `sparselab` (PyPI, 0.2.2) is optional: without it its column is skipped.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from common import Report, machine
from torch import nn

from neuroplast.sparse import kernels, sparsify

SHAPES = [(4096, 4096), (1000, 784)]  # (out, in)
SPARSITIES = [0.90, 0.95, 0.99]
BATCH = 128


class TorchSparseKernels(nn.Module):
    """A csr layer run on the pure torch.sparse path (the fallback and test oracle)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer


def fwd_bwd_step(layer: nn.Module, x: torch.Tensor, grad_y: torch.Tensor) -> None:
    x.grad = None
    for p in layer.parameters():
        p.grad = None
    if isinstance(layer, TorchSparseKernels):
        os.environ["NEUROPLAST_KERNELS"] = "torch"
        try:
            layer.layer(x).backward(grad_y)
        finally:
            del os.environ["NEUROPLAST_KERNELS"]
        return
    layer(x).backward(grad_y)


def time_cell(
    layers: dict[str, nn.Module], x: torch.Tensor, reps: int, min_sample_s: float = 0.02
) -> dict[str, list[float]]:
    """ms per fwd+bwd of each layer, one sample per round. The layers take turns within every
    round, so drift of a shared machine hits all of them alike; a sample repeats the step for
    >= min_sample_s."""
    grad_y = torch.randn(x.shape[0], layers["dense"](x).shape[1])
    inner = {}
    for kind, layer in layers.items():
        for _ in range(3):
            fwd_bwd_step(layer, x, grad_y)  # warm-up (and numba compilation)
        start = time.perf_counter()
        fwd_bwd_step(layer, x, grad_y)
        inner[kind] = max(1, int(min_sample_s / max(time.perf_counter() - start, 1e-6)))
    samples: dict[str, list[float]] = {kind: [] for kind in layers}
    for _ in range(reps):
        for kind, layer in layers.items():
            start = time.perf_counter()
            for _ in range(inner[kind]):
                fwd_bwd_step(layer, x, grad_y)
            samples[kind].append((time.perf_counter() - start) / inner[kind] * 1e3)
    return samples


def paired_ratio(slow: list[float], fast: list[float]) -> float:
    """Median over rounds of slow/fast measured in the same round."""
    return statistics.median(s / f for s, f in zip(slow, fast))


def check_same_results(layers: dict[str, nn.Module], x: torch.Tensor) -> None:
    """The masked and csr layers hold the same live weights: their outputs must agree."""
    with torch.no_grad():
        reference = layers["masked"](x)
        for kind in ("csr", "csr-torch"):
            layer = layers[kind].layer if isinstance(layers[kind], TorchSparseKernels) else layers[kind]
            out = layer(x)
            if not torch.allclose(out, reference, atol=1e-4, rtol=1e-4):
                raise SystemExit(
                    f"{kind} disagrees with the masked layer: max error {float((out - reference).abs().max())}"
                )


def build(kind: str, n_out: int, n_in: int, sparsity: float) -> nn.Module:
    torch.manual_seed(0)
    if kind == "sparselab":
        import sparselab
        import sparselab.ops

        # sparselab caches W^T by id(W); a new layer at a freed layer's address would hit a
        # stale entry (its documented limitation), so start each layer with an empty cache.
        sparselab.ops._transpose_cache.clear()
        return sparselab.SparseLinear(n_in, n_out, sparsity=sparsity)
    model = nn.Sequential(nn.Linear(n_in, n_out))
    if kind != "dense":
        backend = "masked" if kind == "masked" else "csr"
        sparsify(model, 1 - sparsity, "uniform", backend=backend, generator=torch.Generator().manual_seed(0))
    return TorchSparseKernels(model) if kind == "csr-torch" else model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="also write the table (markdown) to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import sparselab  # noqa: F401

        kinds = ["dense", "masked", "csr-torch", "csr", "sparselab"]
    except ImportError:
        print("sparselab is not installed (pip install sparselab==0.2.2): its column is skipped")
        kinds = ["dense", "masked", "csr-torch", "csr"]
    if kernels.backend() != "numba":
        print("numba kernels unavailable: the csr column runs on torch.sparse too")

    report = Report(args.out)
    report.add(
        f"fwd+bwd (dx and dW), batch {BATCH}, fp32, {torch.get_num_threads()} threads, median of {args.reps}; "
        f"torch {torch.__version__}; {machine()}",
        "",
    )
    report.table(
        ["layer (out x in)", "sparsity", "dense ms", "masked ms", "csr, torch.sparse ms", "csr, numba ms"]
        + (["sparselab ms", "csr vs dense", "csr vs sparselab"] if "sparselab" in kinds else ["csr vs dense"])
    )
    for n_out, n_in in SHAPES:
        for sparsity in SPARSITIES:
            x = torch.randn(BATCH, n_in, requires_grad=True)
            layers = {kind: build(kind, n_out, n_in, sparsity) for kind in kinds}
            check_same_results(layers, x)
            samples = time_cell(layers, x, args.reps)
            ms = {kind: statistics.median(values) for kind, values in samples.items()}
            ratios = [paired_ratio(samples["dense"], samples["csr"])]
            if "sparselab" in kinds:
                ratios.append(paired_ratio(samples["sparselab"], samples["csr"]))
            cells = [f"{ms[k]:.2f}" for k in kinds] + [f"{r:.2f}x" for r in ratios]
            report.row(f"{n_out} x {n_in}", f"{sparsity:.0%}", *cells)
    report.save()


if __name__ == "__main__":
    main()
