"""Depthwise-separable convolution (MobileNet's block): ``K = P D``, a ``k x k`` stencil per channel, then 1x1."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import ConvOperator
from .functional import adjoint_weight, conv_same, conv_same_adjoint, kernel_symbol


class SeparableConv(ConvOperator):
    """``(K x)_o = Σ_i P[o, i] (d_i ⋆ x_i)``.

    Notes
    -----
    ``depthwise`` ``(c_in, 1, k, k)``: one stencil ``d_i`` per input channel; ``pointwise``
    ``(c_out, c_in, 1, 1)``: the 1x1 coupling ``P``. Weights and multiply-adds per pixel
    ``k² c_in + c_in c_out``. Symbol ``K̂(ω) = P diag(d̂_i(ω))``; adjoint ``K^T = D^T P^T``.
    """

    kind = "separable"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, boundary: str = "zeros"):
        super().__init__(in_channels, out_channels, kernel_size, boundary)
        k = self.kernel_size
        self.depthwise = nn.Parameter(torch.empty(in_channels, 1, k, k))
        self.pointwise = nn.Parameter(torch.empty(out_channels, in_channels, 1, 1))
        nn.init.uniform_(self.depthwise, -1 / k, 1 / k)  # nn.Conv2d's default: ±1/sqrt(fan_in)
        nn.init.uniform_(self.pointwise, -1 / math.sqrt(in_channels), 1 / math.sqrt(in_channels))

    def _forward(self, x):
        return F.conv2d(conv_same(x, self.depthwise, self.boundary, self.in_channels), self.pointwise)

    def _adjoint(self, y):
        return conv_same_adjoint(F.conv2d(y, adjoint_weight(self.pointwise)), self.depthwise, self.boundary,
                                 self.in_channels)

    def _symbol(self, n1, n2):
        d_hat = kernel_symbol(self.depthwise, n1, n2)[..., 0]  # (n1, n2, c_in)
        return self.pointwise[:, :, 0, 0].to(d_hat.dtype) * d_hat[..., None, :]

    def macs_per_pixel(self):
        return self.kernel_size ** 2 * self.in_channels + self.in_channels * self.out_channels
