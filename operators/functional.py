"""Same-size ("stride 1") cross-correlations and their exact adjoints for both boundary conditions.

For a kernel ``W`` of shape ``(c_out, c_in/g, k, k)`` with odd ``k`` and ``r = k // 2``::

    (K x)[o, n] = sum_{i, p, q} W[o, i, p, q] x[i, n + (p - r, q - r)]

where ``x`` outside the grid is zero (``"zeros"``) or wrapped around (``"circular"``). The adjoint is the
same-size cross-correlation with the kernel flipped in space and transposed in channels (within each
group), which is exact for both boundary conditions because the padding is symmetric.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BOUNDARIES = ("zeros", "circular")


def check_boundary(boundary: str) -> str:
    if boundary not in BOUNDARIES:
        raise ValueError(f"unknown boundary condition {boundary!r}; expected one of {BOUNDARIES}")
    return boundary


def pad_same(x: torch.Tensor, radius: int, boundary: str) -> torch.Tensor:
    """Pad the last two axes by ``radius`` on each side: zeros or periodic wrap-around."""
    if radius == 0:
        return x
    mode = "constant" if boundary == "zeros" else "circular"
    return F.pad(x, (radius, radius, radius, radius), mode=mode)


def conv_same(x: torch.Tensor, weight: torch.Tensor, boundary: str, groups: int = 1) -> torch.Tensor:
    """``K x``: same-size cross-correlation of ``x`` (B, c_in, n1, n2) with ``weight`` (c_out, c_in/g, k, k)."""
    k = weight.shape[-1]
    if boundary == "zeros":
        return F.conv2d(x, weight, padding=k // 2, groups=groups)
    return F.conv2d(pad_same(x, k // 2, boundary), weight, groups=groups)


def adjoint_weight(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Kernel of ``K^T``: flipped in space, input and output channels swapped within each group."""
    c_out, cig, k1, k2 = weight.shape
    w = weight.reshape(groups, c_out // groups, cig, k1, k2).transpose(1, 2)
    return w.reshape(groups * cig, c_out // groups, k1, k2).flip(-1, -2)


def conv_same_adjoint(y: torch.Tensor, weight: torch.Tensor, boundary: str, groups: int = 1) -> torch.Tensor:
    """``K^T y`` for ``K = conv_same(., weight, boundary, groups)``; ``y`` is (B, c_out, n1, n2)."""
    return conv_same(y, adjoint_weight(weight, groups), boundary, groups)


def kernel_symbol(weight: torch.Tensor, n1: int, n2: int) -> torch.Tensor:
    """Fourier symbol of a same-size cross-correlation on an ``n1 x n2`` periodic grid.

    ``K̂(ω)[o, i] = Σ_{p,q} W[o, i, p, q] exp(i(ω₁(p − r) + ω₂(q − r)))`` with ``ω = 2π(m₁/n₁, m₂/n₂)``;
    returns a complex tensor of shape ``(n1, n2, c_out, c_in_per_group)``. A plane wave
    ``v e^{iω·n}`` is mapped to ``K̂(ω) v e^{iω·n}``.
    """
    k1, k2 = weight.shape[-2:]
    cdtype = torch.complex128 if weight.dtype == torch.float64 else torch.complex64
    real = torch.float64 if cdtype == torch.complex128 else torch.float32
    dev = weight.device
    m1 = torch.arange(n1, device=dev, dtype=real)
    m2 = torch.arange(n2, device=dev, dtype=real)
    p = torch.arange(k1, device=dev, dtype=real) - k1 // 2
    q = torch.arange(k2, device=dev, dtype=real) - k2 // 2
    e1 = torch.polar(torch.ones(n1, k1, device=dev, dtype=real), 2 * torch.pi * m1[:, None] * p[None, :] / n1)
    e2 = torch.polar(torch.ones(n2, k2, device=dev, dtype=real), 2 * torch.pi * m2[:, None] * q[None, :] / n2)
    return torch.einsum("oipq,xp,yq->xyoi", weight.to(cdtype), e1, e2)
