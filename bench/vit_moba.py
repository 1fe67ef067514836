"""Dense vs MoBA attention in a ViT on Fashion-MNIST: accuracy and training seconds per epoch.

    python bench/vit_moba.py [--epochs 5] [--train 60000] [--patches 2,1] [--seeds 0,1] [--hybrid 1]
                             [--models dense,moba,hybrid] [--threads 2] [--out results.md]

For each patch size (2: 14x14 = 196 tokens, 1: 28x28 = 784 tokens) the same ViT (dim 64, depth
4, 4 heads, mean pooling, AdamW 1e-3, cosine, batch 128) is trained with dense attention and
with MoBA (non-causal, own block forced, blocks = square tiles of the patch grid: 14 tokens (2x7)
at patch 2, 16 tokens (4x4) at patch 1; top-3), one after the other in this process, once per
seed (`--seeds`; the models of a seed start from the same seed). The table gives the mean test
accuracy over the seeds, each seed's, and the mean of the per-seed differences from dense.
`--train N` trains on the first N training images (all 10,000 test images are always scored).
`--hybrid L` adds the hybrid to `--models`: MoBA with its last L layers on dense attention. `--models`
picks which of dense, moba, hybrid (last layer dense unless `--hybrid` says otherwise) and block
(MoBA with per-query-block routing: each tile of queries picks its blocks by its mean query) to
train; without dense in the same run the table has no differences or speed-ups.
Each epoch of each run is reported on stderr as it ends; the table comes on stdout at the end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace

import torch
from common import Report, machine

from neuroplast.data import load_dataset
from neuroplast.train import RunConfig
from neuroplast.train.trainer import train

BLOCKS = {1: 16, 2: 14, 4: 7}  # patch size -> MoBA block (a square-ish tile of the patch grid)
MODELS = ("dense", "moba", "hybrid", "block")


def progress_lines(run: str):
    """The trainer's log lines (the run, then each epoch as it ends), tagged with the run, on stderr."""
    return lambda line: print(f"[{run}] {line}", file=sys.stderr, flush=True)


def record_into(seconds: list[float]):
    return lambda record: seconds.append(record["train_seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train", type=int, default=60_000, help="training images used")
    parser.add_argument("--patches", default="2,1")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; each model runs once per seed")
    parser.add_argument(
        "--hybrid", type=int, default=0, help="the hybrid's dense last layers; > 0 also adds the hybrid to --models"
    )
    parser.add_argument(
        "--models", default="dense,moba", help="comma-separated: dense, moba, hybrid, block (default: dense,moba)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    try:
        seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds: {args.seeds!r} is not a comma-separated list of integers")
    names = list(dict.fromkeys(name.strip() for name in args.models.split(",") if name.strip()))
    if not names:
        parser.error(f"--models: none given; choose from {', '.join(MODELS)}")
    for name in names:
        if name not in MODELS:
            parser.error(f"--models: unknown model {name!r}; choose from {', '.join(MODELS)}")
    for patch in args.patches.split(","):
        if not patch.strip().isdecimal() or int(patch) not in BLOCKS:
            parser.error(f"--patches: unsupported patch size {patch!r}; choose from {', '.join(map(str, BLOCKS))}")
    depth = RunConfig(model="vit").validate().vit_depth
    if not 0 <= args.hybrid < depth:
        parser.error(f"--hybrid: {args.hybrid} dense layers; choose from 0 to {depth - 1} (the ViT has {depth})")
    if args.hybrid and "hybrid" not in names:
        names.append("hybrid")
    hybrid_layers = args.hybrid or 1
    # (attention, dense last layers, routing, row name)
    models = [
        {
            "dense": ("dense", 0, "token", "dense"),
            "moba": ("moba", 0, "token", "moba"),
            "hybrid": ("moba", hybrid_layers, "token", f"moba, last {hybrid_layers} dense"),
            "block": ("moba", 0, "block", "moba, block routing"),
        }[name]
        for name in names
    ]
    torch.set_num_threads(args.threads)
    data = load_dataset("fashion-mnist")
    data = replace(data, x_train=data.x_train[: args.train], y_train=data.y_train[: args.train])
    if args.epochs == 1:
        timing = "s/epoch = median training time of the one epoch over the seeds (it includes warm-up)"
    else:
        timing = "s/epoch = median training time of the epochs after the first, over all seeds"
    report = Report(args.out)
    report.add(
        f"Fashion-MNIST ({len(data.y_train)} training images, 10,000 test), ViT dim 64 depth 4 heads 4, "
        f"{args.epochs} epoch{'s' * (args.epochs != 1)}, AdamW 1e-3, batch 128, {torch.get_num_threads()} threads, "
        f"seeds {args.seeds}; {timing}; {machine()}",
        "",
    )
    report.table(
        ["tokens", "attention", "block x top-k", "test accuracy (%)", "per seed", "vs dense (pp)", "s/epoch"]
        + ["MoBA speed-up"]
    )
    for patch in [int(p) for p in args.patches.split(",")]:
        accuracies: dict[str, list[float]] = {}
        seconds: dict[str, list[float]] = {}
        tokens = (28 // patch) ** 2
        for seed in seeds:
            for attention, full_layers, routing, name in models:
                config = RunConfig(
                    dataset="fashion-mnist",
                    model="vit",
                    method="dense",
                    attention=attention,
                    full_layers=full_layers,
                    routing=routing,
                    patch_size=patch,
                    block_size=BLOCKS[patch],
                    top_k=args.top_k,
                    epochs=args.epochs,
                    batch_size=128,
                    optimizer="adamw",
                    lr=1e-3,
                    weight_decay=0.05,
                    lr_schedule="cosine",
                    seed=seed,
                )
                epoch_seconds: list[float] = []
                summary = train(
                    config,
                    progress=sys.stdout.isatty(),
                    log=progress_lines(f"{tokens} tokens, {name}, seed {seed}"),
                    dataset=data,
                    on_epoch_end=record_into(epoch_seconds),
                )
                accuracies.setdefault(name, []).append(100 * summary["final_test_accuracy"])
                seconds.setdefault(name, []).extend(epoch_seconds[1:] or epoch_seconds)
        dense_seconds = statistics.median(seconds["dense"]) if "dense" in seconds else None
        for name, accuracy in accuracies.items():
            per_epoch = statistics.median(seconds[name])
            shape = f"{BLOCKS[patch]} x {args.top_k}" if name != "dense" else "—"
            per_seed = " / ".join(f"{a:.2f}" for a in accuracy)
            if name == "dense" or dense_seconds is None:
                difference = speed = ""
            else:
                difference = f"{statistics.mean(a - d for a, d in zip(accuracy, accuracies['dense'])):+.2f}"
                speed = f"{dense_seconds / per_epoch:.2f}x"
            mean = f"{statistics.mean(accuracy):.2f}"
            report.row(tokens, name, shape, mean, per_seed, difference, f"{per_epoch:.1f}", speed)
    report.save()


if __name__ == "__main__":
    main()
