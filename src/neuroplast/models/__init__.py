"""Models for 28x28 / 32x32 images: softmax regression, the SET-MLP shape, a small CNN, a ViT
(dense or MoBA attention) and the part-query encoder (dense or MoBA attention)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

MODELS = ("linear", "mlp", "cnn", "vit", "parts", "moba-parts")


class Linear(nn.Module):
    """Softmax regression: one linear layer on the flattened image (7,850 parameters on 28x28)."""

    def __init__(self, in_features: int = 784, num_classes: int = 10):
        super().__init__()
        self.classifier = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x.flatten(1))


class MLP(nn.Module):
    """Fully connected classifier; default 784-1000-1000-1000-10 (the SET-MLP shape)."""

    def __init__(
        self,
        in_features: int = 784,
        hidden: Sequence[int] = (1000, 1000, 1000),
        num_classes: int = 10,
        dropout: float = 0.0,
    ):
        super().__init__()
        widths = [in_features, *hidden]
        blocks: list[nn.Module] = []
        for n_in, n_out in zip(widths[:-1], widths[1:]):
            blocks += [nn.Linear(n_in, n_out), nn.ReLU()]
            if dropout > 0:
                blocks.append(nn.Dropout(dropout))
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x.flatten(1)))


class CNN(nn.Module):
    """Two conv blocks (32, 64 channels, 3x3, max-pool) and a dense head (128 units by default;
    256 gives 1,070,794 parameters on 32x32x3, the size of the semi-decentralized papers' CNN);
    any HxW >= 8."""

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        dropout: float = 0.0,
        hidden: int = 128,
    ):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * side * side, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_model(
    name: str,
    image_shape: tuple[int, int, int],
    num_classes: int,
    hidden: Sequence[int] = (1000, 1000, 1000),
    dropout: float = 0.0,
    vit: dict | None = None,
    cnn_hidden: int = 128,
    parts: dict | None = None,
) -> nn.Module:
    """vit: keyword arguments of `ViT` (patch_size, dim, depth, heads, attention, ...); parts:
    keyword arguments of `PartQueryEncoder` (patch_size, dim, depth, heads, parts, attention, ...).
    "moba-parts" is the part-query encoder with MoBA attention (one token per pixel by default)."""
    c, h, w = image_shape
    if name == "linear":
        return Linear(c * h * w, num_classes)
    if name == "mlp":
        return MLP(c * h * w, hidden, num_classes, dropout)
    if name == "cnn":
        if h != w:
            raise ValueError(f"the CNN expects square images, got {h}x{w}")
        return CNN(c, h, num_classes, dropout, cnn_hidden)
    if name == "vit":
        return ViT(image_shape, num_classes, dropout=dropout, **(vit or {}))
    if name in ("parts", "moba-parts"):
        options = {"patch_size": 1 if name == "moba-parts" else 4, **(parts or {})}
        # at one token per pixel, learned positions would be 50k of the ~170k parameters at
        # 28x28, and the coordinate channels already say where each pixel is
        options.setdefault("positions", options["patch_size"] > 1)
        if name == "moba-parts":
            options["attention"] = "moba"
        return PartQueryEncoder(image_shape, num_classes, dropout=dropout, **options)
    raise ValueError(f"unknown model {name!r}; choose from: {', '.join(MODELS)}")


from neuroplast.models.parts import PartQueryEncoder  # noqa: E402  (after the models it sits beside)
from neuroplast.models.vit import ViT  # noqa: E402

__all__ = ["CNN", "MLP", "Linear", "MODELS", "PartQueryEncoder", "ViT", "build_model"]
