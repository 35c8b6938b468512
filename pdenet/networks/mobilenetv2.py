"""MobileNetV2 (Sandler et al. 2018) in its small-image variant, with a width multiplier: a baseline.

Small-image variant (as commonly used for CIFAR): the stem is a stride-1 3x3 convolution and the second
stage keeps stride 1, so a 32x32 input reaches the last stages at 4x4 instead of 1x1. Inverted-residual
settings ``(t, c, n, s)`` (expansion, width, repeats, first stride)::

    (1, 16, 1, 1) (6, 24, 2, 1) (6, 32, 3, 2) (6, 64, 4, 2) (6, 96, 3, 1) (6, 160, 3, 2) (6, 320, 1, 1)

Width multiplier ``w``: every width ``c`` becomes ``make_divisible(w c, round_to)``. Unlike the reference
code, the last 1x1 layer (1280 channels at ``w = 1``) is scaled as well, so that small FLOP budgets can be
met (at 4x4 its 320 x 1280 coupling alone costs 13 MFLOPs per image).
"""
from __future__ import annotations

import torch
from torch import nn

from operators.base import check_positive_int

from .layers import ClassifierHead
from .width import check_width_mult, make_divisible

SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def conv_bn(in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
            activation: bool = True) -> nn.Sequential:
    """``ReLU6(BN(conv(x)))`` (or without the ReLU6) with 'same' padding and no bias."""
    layers = [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if activation:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """``y = [x +] BN(P₂ ReLU6(BN(D_s ReLU6(BN(P₁ x)))))``.

    ``P₁``: 1x1 expansion ``c_in -> t c_in`` (omitted for ``t = 1``), ``D_s``: depthwise 3x3 with stride ``s``,
    ``P₂``: linear 1x1 projection to ``c_out``; the residual is added when ``s = 1`` and ``c_in = c_out``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        layers = [] if expansion == 1 else [conv_bn(in_channels, hidden)]
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), conv_bn(hidden, out_channels, activation=False)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """Small-image MobileNetV2: ``(B, in_channels, n1, n2) -> (B, num_classes)``.

    ``round_to`` is the divisor all widths are rounded to (8 in the reference code; smaller values give
    finer FLOP steps when matching a budget).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, round_to: int = 8,
                 dropout: float = 0.2):
        super().__init__()
        in_channels = check_positive_int("in_channels", in_channels)
        num_classes = check_positive_int("num_classes", num_classes)
        w = check_width_mult(width_mult)
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        c = make_divisible(32 * w, round_to)
        layers = [conv_bn(in_channels, c, 3)]
        for t, width, n, s in SETTINGS:
            out = make_divisible(width * w, round_to)
            for i in range(n):
                layers.append(InvertedResidual(c, out, s if i == 0 else 1, t))
                c = out
        last = make_divisible(1280 * w, round_to)
        layers.append(conv_bn(c, last))
        self.features = nn.Sequential(*layers)
        self.head = ClassifierHead(last, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
