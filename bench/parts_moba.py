"""The part-query encoder on 784 pixel tokens: dense attention against MoBA (`moba-parts`),
speed and accuracy, in one process.

    python bench/parts_moba.py [--batch 32] [--repeats 5] [--train 2000] [--epochs 3] [--seeds 0]
                               [--threads 2] [--out results.md]

1. Speed: one training step (forward, every loss, backward) of the encoder at one token per
   pixel on 28x28 articulated shapes, batch `--batch`, median of `--repeats` after a warm-up:
   dense attention against MoBA (4x4-pixel tiles of 16 tokens, 3 per query, own tile included).
2. Accuracy: both trained on `--train` articulated shapes for `--epochs` (AdamW 2e-3, cosine,
   batch 32), scored on 2,000 in-distribution test shapes, per seed. `--train 0` skips this part.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import Report, machine

from neuroplast.models import build_model
from neuroplast.train import RunConfig
from neuroplast.train.trainer import train

MOBA = {"block_size": 16, "top_k": 3}


def step_seconds(attention: str, batch: int, repeats: int) -> float:
    torch.manual_seed(0)
    options = {"patch_size": 1, "positions": False, "attention": attention, **MOBA}
    model = build_model("parts", (1, 28, 28), 5, parts=options)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 5, (batch,))
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        loss, _ = model.training_loss(x, y)
        loss.backward()
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train", type=int, default=2000, help="training shapes (0: speed only)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", default="0", help="comma-separated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the tables to this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dense, moba = (step_seconds(a, args.batch, args.repeats) for a in ("dense", "moba"))
    report = Report(args.out)
    report.add(
        f"Part-query encoder, 784 pixel tokens (28x28), batch {args.batch}, {args.threads} threads; {machine()}", ""
    )
    report.table(["attention", "s / training step", "speed-up"])
    report.row("dense", f"{dense:.3f}", "1.00x")
    report.row("MoBA (16-token tiles, top 3)", f"{moba:.3f}", f"{dense / moba:.2f}x")
    if args.train:
        report.add("", f"Trained on {args.train} shapes for {args.epochs} epochs:", "")
        report.table(["seed", "dense acc. (%)", "MoBA acc. (%)", "MoBA − dense (pp)", "dense s/epoch", "MoBA s/epoch"])
        for seed in (int(s) for s in args.seeds.split(",")):
            results = {}
            for name, model in (("dense", "parts"), ("moba", "moba-parts")):
                config = RunConfig(
                    dataset="articulated",
                    model=model,
                    attention="dense",
                    patch_size=1,
                    articulated_size=28,
                    articulated_train=args.train,
                    articulated_test=2000,
                    method="dense",
                    optimizer="adamw",
                    lr=0.002,
                    weight_decay=0.05,
                    batch_size=32,
                    epochs=args.epochs,
                    seed=seed,
                    **MOBA,
                ).validate()
                summary = train(config, progress=False, log=None)
                results[name] = (summary["final_test_accuracy"], summary["seconds"] / args.epochs)
            (da, ds), (ma, ms) = results["dense"], results["moba"]
            report.row(seed, f"{100 * da:.2f}", f"{100 * ma:.2f}", f"{100 * (ma - da):+.2f}", f"{ds:.0f}", f"{ms:.0f}")
    report.save()


if __name__ == "__main__":
    main()
