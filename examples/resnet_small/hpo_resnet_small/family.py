"""The ``resnet_small`` family: a conv stem, ``blocks`` residual blocks (the first keeps the image
size, each later one halves it), global average pooling, dropout and a linear classifier.

Its hyperparameters, with the values a spec may give them (checked by ``hpo create-study``):
- ``blocks``: 1 to 6 residual blocks;
- ``width``: channels of each block, 4 to 512: one number for every block, or a list (one per block);
- ``dropout``: before the classifier, in [0, 1).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hpo.nn.family import Family, Param, integer, number
from hpo.nn.layers import per_layer


class Block(nn.Module):
    """conv 3x3 - batch-norm - relu - conv 3x3 - batch-norm, plus the input (1x1 projected when
    the width or the size changes), then relu."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))
        self.skip = (nn.Identity() if stride == 1 and c_in == c_out else
                     nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def build(hp: dict[str, Any], *, in_shape: tuple[int, ...], out_features: int) -> nn.Module:
    """The network for images of ``in_shape`` (channels, height, width) and ``out_features`` classes."""
    n = int(hp["blocks"])
    widths = [int(w) for w in per_layer(hp["width"], n, "width")]
    layers: list[nn.Module] = [nn.Conv2d(in_shape[0], widths[0], 3, padding=1, bias=False),
                               nn.BatchNorm2d(widths[0]), nn.ReLU()]
    c = widths[0]
    for i, w in enumerate(widths):
        layers.append(Block(c, w, stride=1 if i == 0 else 2))
        c = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(float(hp["dropout"])), nn.Linear(c, out_features)]
    return nn.Sequential(*layers)


family = Family(
    name="resnet_small",
    hyperparameters={
        "blocks": Param(integer(1, 6), 2),
        "width": Param(integer(4, 512), 16, per_layer="blocks"),
        "dropout": Param(number(0, 1, high_open=True), 0.0),
    },
    build=build,
    image_input=True,
    description="a small residual CNN for RGB images (blocks x width, dropout)",
)
