"""How hard are the articulated shapes' joint angles to read from one image?

A plain CNN (conv32-conv64-fc128, about 420k parameters) regresses the unit (sin, cos) of every
joint angle, nothing else, on the 28x28 articulated shapes; the test error (degrees, over the
joints an image can show) after each epoch, against the best constant answer (each joint's
circular mean over the training set). It bounds what a joint head on a small encoder can reach
with a given amount of data and training:

    python scripts/joint_angle_probe.py --train 50000 --epochs 8
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from neuroplast.data.articulated import FAMILIES, joint_permutations, load_articulated, visible_joints
from neuroplast.models.parts import angle_error_degrees, permuted_joints


def unit(angles: torch.Tensor) -> torch.Tensor:
    return torch.stack([angles.sin(), angles.cos()], -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=50000, help="training shapes")
    parser.add_argument("--test", type=int, default=2000, help="test shapes")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    data = load_articulated(size=28, train=args.train, test=args.test)
    x, x_test = data.x_train.view(-1, 1, 28, 28), data.x_test.view(-1, 1, 28, 28)
    families = list(FAMILIES)
    angles = data.extras["train_joint_angles"]
    valid = visible_joints(data.extras["train_joint_valid"], data.y_train, families)
    perms = joint_permutations(families)[data.y_train]
    test_angles = data.extras["test_joint_angles"]
    shown = visible_joints(data.extras["test_joint_valid"], data.y_test, families)
    test_perms = joint_permutations(families)[data.y_test]
    joints = angles.shape[1]

    weights = valid.float()
    mean = F.normalize((unit(angles) * weights[..., None]).sum(0), dim=-1)
    constant = float(angle_error_degrees(mean.expand(len(x_test), -1, -1), test_angles, shown, test_perms))
    print(f"best constant answer: {constant:.1f} degrees")

    net = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 49, 128), nn.ReLU(), nn.Linear(128, 2 * joints),
    )  # fmt: skip
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    for epoch in range(args.epochs):
        start = time.perf_counter()
        for rows in torch.randperm(len(x)).split(128):
            predicted = F.normalize(net(x[rows]).view(-1, joints, 2), dim=-1)
            # each sample against the relabelling of its joints that fits best (left/right limbs)
            true, mask = permuted_joints(angles[rows], valid[rows], perms[rows])
            error = ((predicted[:, None] - unit(true)).square().sum(-1) * mask).sum(-1).min(1).values
            loss = error.sum() / valid[rows].sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            predicted = F.normalize(net(x_test).view(-1, joints, 2), dim=-1)
        error = float(angle_error_degrees(predicted, test_angles, shown, test_perms))
        print(f"epoch {epoch + 1}: {error:.1f} degrees ({time.perf_counter() - start:.0f} s)", flush=True)
    for f, name in enumerate(families):
        rows = data.y_test == f
        error = float(angle_error_degrees(predicted[rows], test_angles[rows], shown[rows], test_perms[rows]))
        print(f"  {name}: {error:.1f} degrees")


if __name__ == "__main__":
    main()
