"""ShuffleNetV2 (Ma et al. 2018) in its small-image variant, with a width multiplier: a baseline.

Small-image variant: the stem is a stride-1 3x3 convolution without max pooling, then three stages of
(4, 8, 4) units, each stage starting with a stride-2 unit, a last 1x1 layer, global pooling and a linear
classifier. Widths at multiplier ``w``: ``make_divisible(w c, round_to)`` for ``c`` in (116, 232, 464) (the
"1x" widths), and for the stem's 24 and the last layer's 1024, which are scaled as well so that small FLOP
budgets can be met;
``round_to`` must be even (a unit splits its channels in two halves).
"""
from __future__ import annotations

import torch
from torch import nn

from operators import channel_shuffle
from operators.base import check_positive_int

from .layers import ClassifierHead
from .width import check_width_mult, make_divisible

STAGE_REPEATS = (4, 8, 4)
STAGE_WIDTHS = (116, 232, 464)


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def depthwise_bn(channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False), nn.BatchNorm2d(channels)
    )


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit, ``c_in -> c_out`` channels, ``b = c_out / 2`` per branch.

    Stride 1 (``c_in = c_out``): split ``x = [x₁, x₂]``, ``y = shuffle([x₁, R(x₂)])``. Stride 2:
    ``y = shuffle([L(x), R(x)])`` with ``L`` = depthwise 3x3 stride 2 + BN, 1x1 + BN + ReLU, and
    ``R`` = 1x1 + BN + ReLU, depthwise 3x3 (stride ``s``) + BN, 1x1 + BN + ReLU.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels % 2:
            raise ValueError(f"ShuffleNetV2 unit needs an even number of output channels, got {out_channels}")
        if stride == 1 and in_channels != out_channels:
            raise ValueError(f"a stride-1 ShuffleNetV2 unit keeps its width, got {in_channels} -> {out_channels}")
        b = out_channels // 2
        self.stride = stride
        r_in = in_channels if stride == 2 else b
        self.left = (
            nn.Sequential(depthwise_bn(in_channels, 2), conv_bn_relu(in_channels, b)) if stride == 2 else None
        )
        self.right = nn.Sequential(conv_bn_relu(r_in, b), depthwise_bn(b, stride), conv_bn_relu(b, b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.left is None:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.right(x2)), dim=1)
        else:
            out = torch.cat((self.left(x), self.right(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """Small-image ShuffleNetV2: ``(B, in_channels, n1, n2) -> (B, num_classes)``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, round_to: int = 4):
        super().__init__()
        in_channels = check_positive_int("in_channels", in_channels)
        num_classes = check_positive_int("num_classes", num_classes)
        w = check_width_mult(width_mult)
        if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 2 or round_to % 2:
            raise ValueError(f"round_to must be a positive even integer, got {round_to!r}")
        c = make_divisible(24 * w, round_to)
        layers = [conv_bn_relu(in_channels, c, 3)]
        for repeats, width in zip(STAGE_REPEATS, STAGE_WIDTHS):
            out = make_divisible(width * w, round_to)
            for i in range(repeats):
                layers.append(ShuffleUnit(c, out, 2 if i == 0 else 1))
                c = out
        last = make_divisible(1024 * w, round_to)
        layers.append(conv_bn_relu(c, last))
        self.features = nn.Sequential(*layers)
        self.head = ClassifierHead(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
