"""The dense operator: full ``k x k`` coupling of all channels (a ``nn.Conv2d`` with stride 1)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import ConvOperator
from .functional import conv_same, conv_same_adjoint, kernel_symbol


class DenseConv(ConvOperator):
    """``(K x)[o] = Σ_i W[o, i] ⋆ x[i]`` with ``W`` of shape ``(c_out, c_in, k, k)``.

    Notes
    -----
    Weights ``k² c_in c_out``; multiply-adds per pixel the same. Symbol
    ``K̂(ω) = Σ_{p,q} W[:, :, p, q] e^{i(ω₁(p−r) + ω₂(q−r))}``, ``r = k // 2``.
    """

    kind = "dense"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, boundary: str = "zeros"):
        super().__init__(in_channels, out_channels, kernel_size, boundary)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv2d's default

    def _forward(self, x):
        return conv_same(x, self.weight, self.boundary)

    def _adjoint(self, y):
        return conv_same_adjoint(y, self.weight, self.boundary)

    def _symbol(self, n1, n2):
        return kernel_symbol(self.weight, n1, n2)

    def macs_per_pixel(self):
        return self.kernel_size ** 2 * self.in_channels * self.out_channels
