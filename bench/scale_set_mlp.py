"""Scale: a truly sparse SET-MLP of about 1,000,000 hidden neurons, one epoch on Fashion-MNIST.

    python bench/scale_set_mlp.py [--hidden 333333] [--layers 3] [--epsilon 20] [--batch 128] [--threads 2]
                                  [--precision float32|bfloat16]

The layers are built directly as CSR (ER-epsilon densities, SET's rule: nnz = epsilon (n_in +
n_out), capped at dense); no tensor of a layer's full shape ever exists. One epoch of SGD
(lr 0.01, momentum 0.9), then one SET topology update (zeta 0.3) timed on its own, then the
test accuracy. Peak memory is the process's max resident set size. `--precision bfloat16` trains
under `torch.autocast("cpu", dtype=torch.bfloat16)`: activations and their gradients are kept in
bfloat16 (half the bytes of every random row read), weights, their gradients and all sums in
float32; the test accuracy is measured the same way.

At this width every live weight reads one batch-length row of a (333k x batch) activation
matrix far larger than the CPU caches, so memory traffic, not arithmetic, sets the pace: the
kernels request rows a few nonzeros ahead, the backward pass reads each gradient row once for
both products, and the allocator keeps freed activations for reuse (`retain_freed_memory`)
on transparent huge pages instead of page-faulting 170 MB tensors into existence every step.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read by torch at its first allocation

import torch
import torch.nn.functional as F
from common import Report, machine
from torch import nn

from neuroplast.data import BatchIterator, load_dataset
from neuroplast.dst import DSTEngine, preset
from neuroplast.sparse import retain_freed_memory
from neuroplast.sparse.csr import CSRLinear
from neuroplast.sparse.topology import Topology
from neuroplast.train.config import PRECISIONS
from neuroplast.train.trainer import autocast


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=333_333)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--epsilon", type=float, default=20.0)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--limit", type=int, default=0, help="train on the first N images only (0: all)")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="float32",
        help="activation precision (bfloat16: under torch.autocast; weights stay float32)",
    )
    parser.add_argument("--out", help="also write the table (markdown) to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    data = load_dataset(args.dataset, flatten=True)
    widths = [data.num_features] + [args.hidden] * args.layers + [data.num_classes]
    start = time.perf_counter()
    blocks: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        nnz = min(n_in * n_out, round(args.epsilon * (n_in + n_out)))
        blocks.append(CSRLinear.random(n_in, n_out, nnz, generator))
        if i < len(widths) - 2:
            blocks.append(nn.ReLU())
    model = nn.Sequential(*blocks)
    topology = Topology.of_csr_layers(model)
    build_seconds = time.perf_counter() - start
    neurons = sum(widths[1:-1])
    nnz_total = sum(layer.nnz for layer in topology.layers.values())
    print(
        f"built {'-'.join(map(str, widths))} ({neurons:,} hidden neurons, {nnz_total:,} weights, "
        f"density {topology.density():.2e}) in {build_seconds:.1f}s; peak memory {peak_rss_gib():.2f} GiB; {machine()}",
        flush=True,
    )

    x_train, y_train = data.x_train, data.y_train
    if args.limit:
        x_train, y_train = x_train[: args.limit], y_train[: args.limit]
    batches = BatchIterator(x_train, y_train, args.batch, shuffle=True, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    topology.attach(optimizer)
    # One epoch: SET rewires after every epoch but the last, so no update fires inside the loop;
    # the update that a second epoch would start with is run (and timed) on its own below.
    engine = DSTEngine(topology, preset("set"), total_steps=len(batches), steps_per_epoch=len(batches))

    start = time.perf_counter()
    report_every = max(1, len(batches) // 20)
    with retain_freed_memory() as retained:
        for step, (xb, yb) in enumerate(batches, 1):
            with autocast(torch.device("cpu"), args.precision):
                loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            engine.step()
            if step % report_every == 0 or step == len(batches):
                elapsed = time.perf_counter() - start
                print(
                    f"  step {step}/{len(batches)}  loss {loss.item():.4f}  {elapsed / 60:.1f} min "
                    f"(eta {elapsed / step * (len(batches) - step) / 60:.1f} min)",
                    flush=True,
                )
        epoch_minutes = (time.perf_counter() - start) / 60
        epoch_peak = peak_rss_gib()

    start = time.perf_counter()
    record = engine.update()
    update_seconds = time.perf_counter() - start

    with torch.no_grad(), autocast(torch.device("cpu"), args.precision):
        model.eval()
        correct = sum(
            int((model(xb).argmax(1) == yb).sum()) for xb, yb in BatchIterator(data.x_test, data.y_test, 1000)
        )
    accuracy = correct / len(data.y_test)
    print(f"peak memory: {epoch_peak:.2f} GiB after the epoch, {peak_rss_gib():.2f} GiB at the end")
    report = Report(args.out)
    report.add("")
    report.table(
        ["activations", "hidden neurons", "weights", "epoch (min)", "SET update (s)", "peak memory (GiB)"]
        + ["test accuracy"]
    )
    report.row(
        args.precision,
        f"{neurons:,}",
        f"{nnz_total:,}",
        f"{epoch_minutes:.1f}",
        f"{update_seconds:.1f}",
        f"{peak_rss_gib():.2f}",
        f"{100 * accuracy:.2f}%",
    )
    report.add(
        f"(SET update: {sum(l.dropped for l in record.layers):,} connections dropped and regrown; "
        f"{torch.get_num_threads()} threads, {len(x_train):,} training images; freed memory "
        f"{'retained' if retained else 'returned to the system'})"
    )
    report.save()


if __name__ == "__main__":
    main()
