"""Pointwise (1x1) convolution: couples channels only (the reaction part of a diffusion-reaction step)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import ConvOperator
from .functional import conv_same, conv_same_adjoint


class PointwiseConv(ConvOperator):
    """``(K x)[:, n] = P x[:, n]`` at every pixel ``n``.

    Notes
    -----
    Weight ``(c_out, c_in, 1, 1)`` (``nn.Conv2d``'s layout); weights and multiply-adds per pixel
    ``c_in c_out``. ``kernel_size`` must be 1 and the boundary plays no role. Symbol: ``K̂(ω) = P`` at every
    frequency, so the singular values are those of ``P``, each ``n1 n2`` times.
    """

    kind = "pointwise"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, boundary: str = "zeros"):
        if kernel_size != 1:
            raise ValueError(f"PointwiseConv is a 1x1 convolution: kernel_size must be 1, got {kernel_size!r}")
        super().__init__(in_channels, out_channels, kernel_size, boundary)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 1, 1))
        nn.init.uniform_(self.weight, -1 / math.sqrt(in_channels), 1 / math.sqrt(in_channels))

    def _forward(self, x):
        return conv_same(x, self.weight, self.boundary)

    def _adjoint(self, y):
        return conv_same_adjoint(y, self.weight, self.boundary)

    def _symbol(self, n1, n2):
        p = self.weight[:, :, 0, 0]
        cdtype = torch.complex128 if p.dtype == torch.float64 else torch.complex64
        return p.to(cdtype).expand(n1, n2, -1, -1)

    def _symbol_norms(self, n1, n2):
        return torch.linalg.matrix_norm(self.weight[:, :, 0, 0], ord=2).expand(n1, n2)

    def macs_per_pixel(self):
        return self.in_channels * self.out_channels
