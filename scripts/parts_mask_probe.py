"""How far mask supervision takes the part-query encoder on the articulated shapes, and why.

    python scripts/parts_mask_probe.py [--epochs 5] [--train 10000] [--matching hungarian|fixed]
                                       [--depth 2] [--mask-weight 1.0] [--pixel-rank 8] [--seed 0]

1. The ceiling of masks with one logit per patch: the true part masks averaged over p x p patches
   and scored against themselves (part mIoU after Hungarian matching, background included), for
   p = 1, 2, 4.
2. The encoder (no joint head) trained with mask supervision as in the parts study (AdamW 2e-3,
   weight decay 0.05, cosine, batch 128, 28x28 shapes, K = 8 queries): the test part mIoU, FG-ARI
   and accuracy after every epoch, then the train mIoU and the IoU per true part channel.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from neuroplast.data.articulated import load_articulated
from neuroplast.models.parts import (
    MASK_MATCHINGS,
    PartQueryEncoder,
    _hard,
    foreground_ari,
    hungarian_match,
    part_miou,
    soft_iou,
)

SCORED = 500  # test shapes scored after every epoch


def per_channel_iou(masks: torch.Tensor, true: torch.Tensor) -> list[tuple[int, int, float]]:
    """(channel, samples where it is present, mean IoU of its matched hard mask)."""
    pred, hard_true = _hard(masks), _hard(true)
    match = hungarian_match(pred, hard_true)
    iou = soft_iou(pred, hard_true).gather(1, match.clamp_min(0)[:, None]).squeeze(1)
    rows = []
    for channel in range(true.shape[1]):
        present = match[:, channel] >= 0
        if present.any():
            rows.append((channel, int(present.sum()), float(iou[present, channel].mean())))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train", type=int, default=10000)
    parser.add_argument("--matching", choices=MASK_MATCHINGS, default="hungarian")
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--mask-weight", type=float, default=1.0)
    parser.add_argument("--pixel-rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = load_articulated(size=28, train=args.train, test=2000, seed=0)
    true_test = data.extras["test_part_masks"][:SCORED].float()
    for p in (1, 2, 4):
        pooled = F.avg_pool2d(true_test, p).repeat_interleave(p, -2).repeat_interleave(p, -1)
        print(f"true masks pooled to {p}x{p} patches: part mIoU {float(part_miou(pooled, true_test).mean()):.3f}")

    torch.manual_seed(args.seed)
    model = PartQueryEncoder(
        (1, 28, 28),
        data.num_classes,
        depth=args.depth,
        mask_weight=args.mask_weight,
        pixel_rank=args.pixel_rank,
        mask_matching=args.matching,
    )
    x, y, part_masks = data.x_train, data.y_train, data.extras["train_part_masks"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    batch = 128
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs * math.ceil(len(y) / batch))
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        model.train()
        order = torch.randperm(len(y))
        for i in range(0, len(y), batch):
            b = order[i : i + batch]
            loss, _ = model.training_loss(x[b], y[b], {"part_masks": part_masks[b]})
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        with torch.no_grad():
            masks = model.parts(data.x_test[:SCORED]).masks
            accuracy = float((model(data.x_test).argmax(1) == data.y_test).float().mean())
        miou = float(part_miou(masks, true_test).mean())
        ari = float(foreground_ari(masks, data.extras["test_part_labels"][:SCORED]).nanmean())
        seconds = time.perf_counter() - start
        print(
            f"epoch {epoch}: test part mIoU {miou:.3f}  FG-ARI {ari:.3f}  accuracy {100 * accuracy:.1f}%  {seconds:.0f} s"
        )
    with torch.no_grad():
        train_masks = model.parts(x[:SCORED]).masks
    print(f"train part mIoU {float(part_miou(train_masks, part_masks[:SCORED].float()).mean()):.3f}")
    for channel, present, iou in per_channel_iou(masks, true_test):
        name = "background" if channel == 0 else f"part {channel}"
        print(f"  {name}: IoU {iou:.3f} over {present} test shapes")


if __name__ == "__main__":
    main()
