"""Depthwise convolution: one ``k x k`` stencil per channel, no channel coupling (the spatial part of diffusion)."""
from __future__ import annotations

import torch
from torch import nn

from .base import ConvOperator
from .functional import conv_same, conv_same_adjoint, kernel_symbol


class DepthwiseConv(ConvOperator):
    """``(K x)_j = s_j ⋆ x_j`` for ``c = c_in = c_out`` channels.

    Notes
    -----
    Weight ``(c, 1, k, k)``; weights and multiply-adds per pixel ``k² c``. Symbol
    ``K̂(ω) = diag(ŝ_j(ω))``, so the singular values are ``|ŝ_j(ω)|`` and ``‖K‖ = max_{ω,j} |ŝ_j(ω)|``;
    adjoint: each stencil flipped.
    """

    kind = "depthwise"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, boundary: str = "zeros"):
        super().__init__(in_channels, out_channels, kernel_size, boundary)
        if in_channels != out_channels:
            raise ValueError(f"DepthwiseConv needs in_channels == out_channels, got {in_channels} and {out_channels}")
        k = self.kernel_size
        self.weight = nn.Parameter(torch.empty(in_channels, 1, k, k))
        nn.init.uniform_(self.weight, -1 / k, 1 / k)  # nn.Conv2d's default: ±1/sqrt(fan_in)

    def _forward(self, x):
        return conv_same(x, self.weight, self.boundary, self.in_channels)

    def _adjoint(self, y):
        return conv_same_adjoint(y, self.weight, self.boundary, self.in_channels)

    def stencil_symbols(self, n1: int, n2: int) -> torch.Tensor:
        """``ŝ_j(ω)`` for every channel: complex ``(n1, n2, c)``."""
        return kernel_symbol(self.weight, n1, n2)[..., 0]

    def _symbol(self, n1, n2):
        return torch.diag_embed(self.stencil_symbols(n1, n2))

    def _symbol_norms(self, n1, n2):
        return self.stencil_symbols(n1, n2).abs().amax(-1)

    def macs_per_pixel(self):
        return self.kernel_size ** 2 * self.in_channels
