"""Grouped convolution: ``g`` independent dense blocks, optionally followed by a ShuffleNet channel shuffle."""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import ConvOperator, check_positive_int
from .functional import conv_same, conv_same_adjoint, kernel_symbol
from .spectral import max_symbol_norm


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's shuffle of dim 1: view ``c`` as ``(groups, c/groups)``, transpose, flatten.

    Output channel ``j·groups + i`` is input channel ``i·(c/groups) + j``. The inverse (and transpose) is
    ``channel_shuffle(., c // groups)``.
    """
    b, c = x.shape[:2]
    return x.reshape(b, groups, c // groups, *x.shape[2:]).transpose(1, 2).reshape(x.shape)


class GroupedConv(ConvOperator):
    """``g`` dense ``k x k`` blocks on disjoint channel groups, then (optionally) a channel shuffle.

    Notes
    -----
    Weight ``(c_out, c_in/g, k, k)``: output channels ``[a c_out/g, (a+1) c_out/g)`` see only input
    channels ``[a c_in/g, (a+1) c_in/g)``. Weights and multiply-adds per pixel ``k² c_in c_out / g``.
    Symbol: block diagonal of the groups' dense symbols, rows permuted by the shuffle
    (``K = Π blockdiag(K_a)``, ``Π`` a permutation), so ``‖K‖ = max_a ‖K_a‖`` and the adjoint is
    ``blockdiag(K_a^T) Π^T``.
    """

    kind = "grouped"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, boundary: str = "zeros",
                 groups: int = 1, shuffle: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, boundary)
        self.groups = check_positive_int("groups", groups)
        if in_channels % self.groups or out_channels % self.groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        if not isinstance(shuffle, bool):
            raise TypeError(f"shuffle must be a bool, got {type(shuffle).__name__}")
        self.shuffle = shuffle
        k = self.kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // self.groups, k, k))
        bound = 1 / math.sqrt(in_channels // self.groups * k * k)  # nn.Conv2d's default
        nn.init.uniform_(self.weight, -bound, bound)

    def _forward(self, x):
        y = conv_same(x, self.weight, self.boundary, self.groups)
        return channel_shuffle(y, self.groups) if self.shuffle else y

    def _adjoint(self, y):
        if self.shuffle:
            y = channel_shuffle(y, self.out_channels // self.groups)
        return conv_same_adjoint(y, self.weight, self.boundary, self.groups)

    def _symbol(self, n1, n2):
        blocks = kernel_symbol(self.weight, n1, n2)  # (n1, n2, c_out, c_in/g)
        rows, cols = self.out_channels // self.groups, self.in_channels // self.groups
        sym = blocks.new_zeros(n1, n2, self.out_channels, self.in_channels)
        for a in range(self.groups):
            sym[..., a * rows:(a + 1) * rows, a * cols:(a + 1) * cols] = blocks[..., a * rows:(a + 1) * rows, :]
        if self.shuffle:
            sym = channel_shuffle(sym.permute(2, 0, 1, 3)[None], self.groups)[0].permute(1, 2, 0, 3)
        return sym

    def _max_symbol_norm(self, n1, n2):
        """``max_a max_ω ‖K̂_a(ω)‖₂``: the shuffle permutes rows and leaves the singular values alone."""
        return max(max_symbol_norm(w, n1, n2) for w in self.weight.chunk(self.groups, dim=0))

    def macs_per_pixel(self):
        return self.kernel_size ** 2 * self.in_channels * self.out_channels // self.groups

    def extra_repr(self):
        return f"{super().extra_repr()}, groups={self.groups}, shuffle={self.shuffle}"
