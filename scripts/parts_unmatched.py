"""How much do the part queries the matching leaves without a part cost a trained encoder's
masks? For the first 1,000 test shapes of a finished mask-supervised parts cell: the part mIoU
(Hungarian matching, background included), the share of pixels (all, and foreground) whose argmax
is a query matched to no true part, and the mIoU with those queries' masks set to zero (their
pixels go to the matched queries):

    python scripts/parts_unmatched.py runs/parts-long/articulated/parts-sup/seed0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from neuroplast.experiments.parts import trained_run
from neuroplast.models.parts import hungarian_match, part_miou
from neuroplast.train import RunConfig, load_toml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cell", type=Path, help="a finished parts cell (its config.toml and checkpoint)")
    parser.add_argument("--samples", type=int, default=1000)
    args = parser.parse_args()

    config = RunConfig(**load_toml(args.cell / "config.toml")).validate()
    run = trained_run(config, args.cell)
    count = min(args.samples, len(run.data.y_test))
    x, true = run.data.x_test[:count], run.data.extras["test_part_masks"][:count]
    with torch.no_grad():
        masks = run.model.parts(x.to(run.device)).masks.cpu()
    match = hungarian_match(masks, true)  # (B, channels): the query of each true channel, -1 if absent
    matched = torch.zeros(masks.shape[:2], dtype=torch.bool)
    rows, channels = (match >= 0).nonzero(as_tuple=True)
    matched[rows, match[rows, channels]] = True
    winner = masks.argmax(1)
    unmatched = ~matched.gather(1, winner.flatten(1)).view_as(winner)
    foreground = true[:, 0] < 0.5
    print(f"part mIoU {part_miou(masks, true).mean():.3f}")
    print(f"pixels won by an unmatched query: {unmatched.double().mean():.4f} of all, "
          f"{unmatched[foreground].double().mean():.4f} of the foreground")  # fmt: skip
    dropped = masks * matched[:, :, None, None]
    print(f"part mIoU with the unmatched queries' masks set to zero: {part_miou(dropped, true).mean():.3f}")


if __name__ == "__main__":
    main()
