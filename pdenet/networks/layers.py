"""Small layers shared by the networks: 2x average-pooling downsampling and the classifier head."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def downsample2x(x: torch.Tensor) -> torch.Tensor:
    """``(B, c, n1, n2) -> (B, c, ⌈n1/2⌉, ⌈n2/2⌉)``: mean over each 2 x 2 window (clipped at an odd edge).

    The output size is that of a 3x3 convolution with stride 2 and padding 1, so that 28x28 inputs go
    28 -> 14 -> 7 -> 4 -> 2 -> 1 like 32x32 ones go 32 -> 16 -> 8 -> 4 -> 2 -> 1.
    """
    return F.avg_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)


class ClassifierHead(nn.Module):
    """Global average pooling and a linear classifier: ``(B, c, n1, n2) -> (B, num_classes)``."""

    def __init__(self, channels: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(x.mean(dim=(2, 3))))


def check_operator_kwargs(operator_kwargs) -> dict:
    """``None`` -> ``{}``; a mapping -> a plain dict copy; anything else -> ``TypeError``."""
    if operator_kwargs is None:
        return {}
    if not isinstance(operator_kwargs, dict):
        raise TypeError(f"operator_kwargs must be a dict or None, got {type(operator_kwargs).__name__}")
    return dict(operator_kwargs)


def make_stem(in_channels: int, out_channels: int, stem_operator: str, operator,
              operator_kwargs: dict) -> nn.Sequential:
    """Opening layer ``ReLU(BN(K x))`` with ``K`` a stride-1 3x3 operator of kind ``stem_operator``.

    ``K`` takes the network's ``operator_kwargs`` when it is of the network's own kind; otherwise only
    the boundary condition carries over (the other keywords belong to the other kind).
    """
    from operators.registry import make_operator

    if stem_operator == operator:
        kwargs = operator_kwargs
    else:
        kwargs = {k: v for k, v in operator_kwargs.items() if k == "boundary"}
    return nn.Sequential(
        make_operator(stem_operator, in_channels, out_channels, **kwargs),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )
