"""The dot-product test of an adjoint: ``|<K x, y> − <x, K^T y>| / (|<K x, y>| + eps)``."""
from __future__ import annotations

import torch

from .base import Grid, as_grid


def dottest(op, grid: Grid, batch: int = 1, seed: int = 0, eps: float = 1e-30) -> float:
    """Relative error of ``<K x, y>`` against ``<x, K^T y>`` for random ``x``, ``y`` in the op's dtype.

    ``x`` lives on the input grid ``grid``, ``y`` on the output grid ``op.output_grid(*grid)`` (smaller for a
    strided operator, whose adjoint is given the input grid).
    """
    n1, n2 = as_grid(grid)
    p = next(op.parameters(), None)
    dtype = p.dtype if p is not None else torch.float64
    device = p.device if p is not None else None
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, op.in_channels, n1, n2, generator=gen, dtype=dtype).to(device)
    y = torch.randn(batch, op.out_channels, *op.output_grid(n1, n2), generator=gen, dtype=dtype).to(device)
    with torch.no_grad():
        lhs = float((op.forward(x) * y).sum())
        rhs = float((x * op.adjoint(y, grid=(n1, n2))).sum())
    return abs(lhs - rhs) / (abs(lhs) + eps)
